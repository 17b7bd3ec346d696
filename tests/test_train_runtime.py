"""The shared training parts: seeds, optimizers, stop flag, batch stream, metric window, recipe I/O, checkpointer."""

from __future__ import annotations

import os
import random
import signal
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from mergevq.commands.train_common import TrainCommand, keys_help, load_or_report, standalone_main
from mergevq.data.images import make_loader
from mergevq.train import distributed as du
from mergevq.train.checkpointer import Checkpointer
from mergevq.train.config_io import ConfigError, config_diff, load_dataclass, save_config
from mergevq.train.rng import derive_seed, reseed_globals, rng_state, set_rng_state
from mergevq.train.runtime import BatchStream, MetricWindow, StopFlag, build_optimizer, make_scaler

CPU = du.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_derive_seed_is_stable_63_bit_and_order_sensitive():
    a = derive_seed(0, 1, 2)
    assert a == derive_seed(0, 1, 2) and 0 <= a < 1 << 63
    assert len({derive_seed(0, 1, 2), derive_seed(0, 2, 1), derive_seed(1, 1, 2), derive_seed(0, 1)}) == 4
    torch.Generator().manual_seed(derive_seed(-1, 2**70))  # any integers give a usable seed


def test_rng_state_round_trip():
    reseed_globals(derive_seed(5))
    saved = rng_state()
    expected = (torch.rand(3), np.random.rand(), random.random())
    torch.rand(7), np.random.rand(4), random.random()
    set_rng_state(saved)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.random.rand() == expected[1] and random.random() == expected[2]


def test_build_optimizer_decays_matrices_only_when_asked():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model[1].bias.requires_grad_(False)
    opt = build_optimizer(model.parameters(), kind="adamw", lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == 3  # frozen bias left out
    opt = build_optimizer(
        model.parameters(), kind="adamw", lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, decay_matrices_only=True
    )
    decayed, plain = opt.param_groups
    assert [p.ndim for p in decayed["params"]] == [2] and decayed["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in plain["params"]) and plain["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="adam"):
        build_optimizer(model.parameters(), kind="sgd", lr=1.0, betas=(0.9, 0.9))


def test_stop_flag_records_the_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopFlag() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


class _Numbers(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> dict[str, int]:
        return {"i": i}


def _stream(epoch: int = 0, batch_in_epoch: int = 0) -> BatchStream:
    loader = make_loader(
        _Numbers(), batch_size=3, shuffle=True, num_workers=0, seed=1, drop_last=True, distributed=False
    )
    return BatchStream(loader, epoch=epoch, batch_in_epoch=batch_in_epoch)


def test_batch_stream_resumes_at_its_position():
    whole = _stream()
    seen = [whole.next()["i"].tolist() for _ in range(7)]  # crosses two epoch boundaries (3 batches per epoch)
    first = _stream()
    for _ in range(4):
        first.next()
    again = _stream(**{k: v for k, v in first.position().items() if k != "batches_per_epoch"})
    assert [again.next()["i"].tolist() for _ in range(3)] == seen[4:]
    assert seen[:3] != seen[3:6]  # each epoch has its own order


def test_metric_window_means_and_rate():
    window = MetricWindow(device=torch.device("cpu"), samples_per_step=8)
    for value in (1.0, 3.0):
        window.start_step()
        window.add({"loss": torch.tensor(value)}, scale=0.5)
        window.end_step()
    means = window.reduce()
    assert means.values == {"loss": 1.0} and means.samples_per_s > 0
    assert window.reduce().values == {} and window.run_samples_per_s is not None


@dataclass
class _Section:
    lr: float = 1.0
    betas: tuple[float, float] = (0.9, 0.99)


@dataclass
class _Recipe:
    name: str = "x"
    steps: int = 10
    optim: _Section = field(default_factory=_Section)
    notes: str = ""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")


def test_load_dataclass_layers_and_strict_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("steps: 5\noptim: {lr: 2e-4}\n")
    cfg = load_dataclass(_Recipe, path, overrides=["optim.betas=[0.5,0.9]"], defaults={"name": "base", "steps": 7})
    assert cfg == _Recipe(name="base", steps=5, optim=_Section(lr=2e-4, betas=(0.5, 0.9)))
    with pytest.raises(ConfigError, match=r"command line: unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        load_dataclass(_Recipe, path, overrides=["optim.lrr=1"])
    with pytest.raises(ConfigError, match="steps: must be >= 1"):
        load_dataclass(_Recipe, None, overrides=["steps=0"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_dataclass(_Recipe, tmp_path / "saved.yaml") == cfg
    diff = config_diff(
        {"steps": 5, "optim": {"lr": 1.0}, "notes": "a"}, {"steps": 6, "optim": {"lr": 1.0}, "notes": "b"}
    )
    assert diff == [("steps", 5, 6)]


def test_train_command_helpers(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("steps: 3\n")
    ran = []

    def run(args):
        config = load_or_report(lambda path, overrides: load_dataclass(_Recipe, path, overrides=overrides), args)
        if isinstance(config, int):
            return config
        ran.append((config, args.no_progress, args.dry))
        return 0

    command = TrainCommand(
        name="train-x",
        help="x",
        description="x",
        epilog=keys_help(_Recipe, source="here.py"),
        config_help="recipe",
        run=run,
        flags={"--dry": "do nothing"},
    )
    assert standalone_main(command, [str(tmp_path / "r.yaml"), "steps=4", "--no-progress", "--dry"]) == 0
    assert ran == [(_Recipe(steps=4), True, True)]
    assert standalone_main(command, [str(tmp_path / "r.yaml"), "--print-config"]) == 0
    assert "steps: 3" in capsys.readouterr().out
    assert standalone_main(command, [str(tmp_path / "r.yaml"), "--what"]) == 2
    assert "unknown option '--what'" in capsys.readouterr().err
    assert "optim.      lr, betas" in command.epilog


def test_checkpointer_round_trip(tmp_path):
    torch.manual_seed(0)
    model, stream = nn.Linear(3, 2), _stream()
    opt = build_optimizer(model.parameters(), kind="adam", lr=0.1, betas=(0.9, 0.9))
    scaler = make_scaler(torch.device("cpu"), "fp32")
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    stream.next()
    states = {"optimizer": opt, "scaler": scaler}
    saver = Checkpointer(
        tmp_path, info=CPU, modules={"model": model, "ema": model, "skip": None}, states=states, keep_last=1
    )
    path = saver.save(step=1, stream=stream, rank_extra={"mine": 7}, extra={"note": "x"})
    assert path is not None and sorted(f.name for f in path.glob("*.safetensors")) == [
        "ema.safetensors",
        "model.safetensors",
    ]
    expected = torch.rand(2)

    fresh = nn.Linear(3, 2)
    fresh_opt = build_optimizer(fresh.parameters(), kind="adam", lr=0.1, betas=(0.9, 0.9))
    states = {"optimizer": fresh_opt, "scaler": make_scaler(torch.device("cpu"), "fp32")}
    loader = Checkpointer(tmp_path, info=CPU, modules={"model": fresh, "ema": fresh}, states=states, keep_last=1)
    resumed = loader.resume()
    assert resumed is not None and (resumed.step, resumed.epoch, resumed.batch_in_epoch) == (1, 0, 1)
    assert resumed.rank_state["mine"] == 7 and resumed.state["note"] == "x"
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(2), expected)  # the RNG continues where the save left it

    def refuse(state, path):
        raise ConfigError("no")

    with pytest.raises(ConfigError):
        loader.resume(check=refuse)
