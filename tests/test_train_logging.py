"""Rank-0 logger: text and JSONL logs, image grids, TensorBoard when available and a notice when not."""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from PIL import Image

from mergevq.train.logging import TrainLogger, image_grid


def test_logs_scalars_and_images(tmp_path, capsys):
    with TrainLogger(output_dir=tmp_path, enabled=True, max_steps=10, start_step=0, progress=False) as log:
        log.scalars(step=3, values={"loss": 1.5, "lr": 1e-4})
        log.info("hello")
        png = log.images(step=3, tag="val", rows=[torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)])
    rows = [json.loads(line) for line in (tmp_path / "logs" / "train.jsonl").read_text().splitlines()]
    assert rows == [{"step": 3, "split": "train", "loss": 1.5, "lr": 1e-4}]
    text = (tmp_path / "logs" / "train.log").read_text()
    assert "step=3 [train] loss=1.5 lr=1.000e-04" in text and "hello" in text
    assert "hello" in capsys.readouterr().out
    assert png is not None and Image.open(png).size == (2 * 6 + 2, 2 * 6 + 2)
    assert list((tmp_path / "logs" / "tb").glob("events.out.tfevents.*"))


def test_without_tensorboard_a_notice_and_plain_logs(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with TrainLogger(output_dir=tmp_path, enabled=True, max_steps=10, start_step=0, progress=False) as log:
        log.scalars(step=1, values={"loss": 2.0})
    assert "TensorBoard is not installed" in capsys.readouterr().out
    assert not (tmp_path / "logs" / "tb").exists()
    assert (tmp_path / "logs" / "train.jsonl").read_text().strip()


def test_disabled_on_other_ranks(tmp_path):
    log = TrainLogger(output_dir=tmp_path, enabled=False, max_steps=10, start_step=0)
    log.scalars(step=1, values={"loss": 1.0})
    log.info("x")
    assert log.images(step=1, tag="t", rows=[torch.zeros(1, 3, 2, 2)]) is None
    log.close()
    assert not (tmp_path / "logs").exists()


def test_image_grid_layout_and_range():
    top = torch.full((3, 3, 2, 2), -1.0)
    bottom = torch.full((3, 3, 2, 2), 1.0)
    grid = image_grid([top, bottom])
    assert grid.size == (3 * 4 + 2, 2 * 4 + 2)
    pixels = torch.from_numpy(np.asarray(grid).copy())
    assert pixels[2, 2].tolist() == [0, 0, 0] and pixels[6, 2].tolist() == [255, 255, 255]
