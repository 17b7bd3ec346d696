"""Rank-0 training output: a tqdm progress bar, a plain-text log, a JSONL log, TensorBoard scalars and image grids.

Every method is a no-op on other ranks, so the loop calls them unconditionally. TensorBoard is optional: without the
``tensorboard`` package the logger says so once and writes the text and JSONL logs only.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

__all__ = ["TrainLogger", "image_grid"]


def image_grid(rows: list[torch.Tensor]) -> Image.Image:
    """Rows of images ``[N,3,H,W]`` in [-1, 1] (equal shapes) → one RGB image, rows stacked top to bottom."""
    if not rows:
        raise ValueError("image_grid needs at least one row")
    batch = torch.cat([r.detach().float().cpu().clamp(-1, 1) for r in rows], dim=0)
    n_rows, n_cols = len(rows), rows[0].shape[0]
    _, _, h, w = batch.shape
    pad = 2
    canvas = torch.ones(3, n_rows * (h + pad) + pad, n_cols * (w + pad) + pad)
    for i, img in enumerate(batch):
        r, c = divmod(i, n_cols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        canvas[:, top : top + h, left : left + w] = img
    levels = ((canvas + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(levels.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


class TrainLogger:
    """Writes ``output_dir/logs/{train.log, train.jsonl, tb/, images/}`` on the main process."""

    def __init__(
        self,
        *,
        output_dir: str | Path,
        enabled: bool,
        max_steps: int,
        start_step: int,
        tensorboard: bool = True,
        progress: bool = True,
    ) -> None:
        self.enabled = enabled
        self.log_dir = Path(output_dir) / "logs"
        self._text = None
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._text = open(self.log_dir / "train.log", "a", buffering=1)  # noqa: SIM115 - closed in close()
        self._jsonl = open(self.log_dir / "train.jsonl", "a", buffering=1)  # noqa: SIM115
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.info("TensorBoard is not installed (pip install tensorboard); writing text and JSONL logs only")
            else:
                self._tb = SummaryWriter(log_dir=str(self.log_dir / "tb"), purge_step=start_step)
        if progress:
            self._bar = tqdm(
                total=max_steps,
                initial=start_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=1.0,
                smoothing=0.1,
            )

    def info(self, message: str) -> None:
        """A line on the console (above the bar) and in ``train.log``."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)
        sys.stdout.flush()
        if self._text is not None:
            self._text.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def advance(self, *, step: int, postfix: dict[str, float] | None = None) -> None:
        """Move the progress bar to ``step`` completed steps."""
        if self._bar is None:
            return
        self._bar.update(step - self._bar.n)
        if postfix:
            self._bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)

    def scalars(self, *, step: int, values: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items()}
        assert self._jsonl is not None
        self._jsonl.write(json.dumps({"step": step, "split": prefix, **clean}) + "\n")
        if self._tb is not None:
            for key, value in clean.items():
                if math.isfinite(value):
                    self._tb.add_scalar(f"{prefix}/{key}", value, step)
        if self._text is not None:
            body = " ".join(f"{k}={_short(v)}" for k, v in clean.items())
            self._text.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} step={step} [{prefix}] {body}\n")

    def images(self, *, step: int, tag: str, rows: list[torch.Tensor]) -> Path | None:
        """Save a grid (rows of [N,3,H,W] in [-1, 1]) as a PNG and, if available, to TensorBoard."""
        if not self.enabled:
            return None
        grid = image_grid(rows)
        out = self.log_dir / "images" / f"{tag}_{step:08d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        grid.save(out)
        if self._tb is not None:
            array = torch.from_numpy(np.asarray(grid).copy()).permute(2, 0, 1)
            self._tb.add_image(tag, array, step)
        return out

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        for handle in (self._text, self._jsonl):
            if handle is not None:
                handle.close()
        self._text = self._jsonl = None

    def __enter__(self) -> TrainLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _short(value: float) -> str:
    value = float(value)
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"
