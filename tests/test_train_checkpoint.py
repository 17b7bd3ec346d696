"""Checkpoint files: round trip, weights_only loading, atomic commit, pruning, picking the newest."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from mergevq.train import checkpoint as ckpt


def weights(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    return {"model": model.state_dict(), "ema": model.state_dict(), "discriminator": nn.Linear(2, 1).state_dict()}


def opt_state() -> dict:
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p], lr=1e-3, betas=(0.5, 0.9))
    p.grad = torch.ones(3)
    opt.step()
    return opt.state_dict()


def save(root, step, seed=0, **kw):
    state = {"optimizer_g": opt_state(), "epoch": 1, "batch_in_epoch": 2, "ranks": [{"rng": torch.get_rng_state()}]}
    return ckpt.save_checkpoint(root, step=step, weights=weights(seed), state=state, meta={"preset": "x"}, **kw)


def test_round_trip_and_weights_only_state(tmp_path):
    path = save(tmp_path, 12, seed=3)
    assert path.name == "step_00000012"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["model.safetensors", "ema.safetensors", "discriminator.safetensors", "state.pt", "meta.json"]
    )
    state = ckpt.load_state(path)
    assert state["step"] == 12 and state["epoch"] == 1 and state["batch_in_epoch"] == 2
    assert state["optimizer_g"]["param_groups"][0]["betas"] == (0.5, 0.9)
    # Plain weights_only load works (no pickled classes inside)
    torch.load(path / "state.pt", weights_only=True)
    torch.manual_seed(3)
    expected = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    fresh = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ckpt.load_module(fresh, path, "model")
    for a, b in zip(expected.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="does not fit"):
        ckpt.load_module(nn.Linear(5, 3), path, "model")


def test_latest_picks_the_highest_step_and_ignores_partial_directories(tmp_path):
    for step in (3, 10, 7):
        save(tmp_path, step)
    # leftovers of a crash: a temporary directory, and a step directory without its state file
    (tmp_path / ".tmp-step_00000020-999").mkdir()
    (tmp_path / ".tmp-step_00000020-999" / "state.pt").write_bytes(b"partial")
    broken = tmp_path / "step_00000030"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"")
    with pytest.warns(UserWarning, match="incomplete"):
        latest = ckpt.find_latest(tmp_path)
    assert latest is not None and latest.step == 10
    assert ckpt.find_latest(tmp_path / "nothing") is None
    removed = ckpt.remove_stale(tmp_path)
    assert [p.name for p in removed] == [".tmp-step_00000020-999"]


def test_keep_last_n(tmp_path):
    for step in range(1, 6):
        save(tmp_path, step, keep_last=2)
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [4, 5]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # trash and temp cleaned up
    with pytest.raises(ValueError):
        ckpt.prune(tmp_path, keep_last=0)


def test_crash_mid_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    save(tmp_path, 5, seed=1)

    def exploding_save(obj, f, *args, **kwargs):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 6, seed=2)
    monkeypatch.undo()
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [5]
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    state = ckpt.load_state(tmp_path / "step_00000005")
    assert state["step"] == 5


def test_sigkill_during_write_never_exposes_a_partial_checkpoint(tmp_path):
    # A writer killed while writing a large checkpoint leaves only a temporary directory behind.
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from mergevq.train import checkpoint as ckpt
        big = {{"w": torch.zeros(8_000_000)}}
        ckpt.save_checkpoint({str(tmp_path)!r}, step=1, weights={{"model": big, "ema": big}}, state={{}})
        real_save = torch.save
        def save_then_die(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = save_then_die
        ckpt.save_checkpoint({str(tmp_path)!r}, step=2, weights={{"model": big, "ema": big}}, state={{}})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0].startswith(".tmp-step_00000002") and names[1] == "step_00000001", names
    latest = ckpt.find_latest(tmp_path)
    assert latest is not None and latest.step == 1
    assert ckpt.load_state(latest.path)["step"] == 1
    assert os.path.getsize(latest.path / "model.safetensors") > 32_000_000


def test_the_ema_part_is_optional(tmp_path):
    model = {"w": torch.arange(3.0)}
    path = ckpt.save_checkpoint(tmp_path, step=1, weights={"model": model}, state={})
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "state.pt"]
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [1] and ckpt.find_latest(tmp_path).step == 1
    # Asked for, an absent EMA is damage, unless a substitute is named: then the model's tensors, read once.
    with pytest.raises(ckpt.CheckpointDamaged, match="ema.safetensors is missing"):
        ckpt.read_checkpoint(path, parts=("model", "ema"))
    loaded = ckpt.read_checkpoint(path, parts=("model", "ema"), substitutes={"ema": "model"})
    assert loaded.substituted == {"ema": "model"} and loaded.weights["ema"] is loaded.weights["model"]
    assert loaded.file("ema") == path / "model.safetensors" and loaded.file("model") == path / "model.safetensors"
    assert torch.equal(ckpt.read_checkpoint(path, parts=("ema",), substitutes={"ema": "model"}).weights["ema"]["w"],
                       model["w"])  # fmt: skip
    # An EMA that was written and then lost is damage, never substituted.
    written = ckpt.save_checkpoint(tmp_path, step=2, weights={"model": model, "ema": model}, state={})
    (written / "ema.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointDamaged, match="ema.safetensors is missing"):
        ckpt.read_checkpoint(written, parts=("ema",), substitutes={"ema": "model"})


def test_the_state_is_checked_before_the_weights_are_verified(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, step=1, weights={"model": {"w": torch.ones(3)}}, state={"config": "a"})
    weights_file = path / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-1] + b"!")  # same size, another checksum

    class OtherModel(Exception):
        pass

    def check(state, where):
        if state["config"] != "b":
            raise OtherModel(f"{where} was written for {state['config']}")

    with pytest.raises(OtherModel, match="step_00000001 was written for a"):
        ckpt.read_checkpoint(path, parts=("model",), check=check)
    with pytest.raises(OtherModel):
        ckpt.read_newest(tmp_path, parts=("model",), check=check)
    with pytest.raises(ckpt.CheckpointDamaged, match="model.safetensors does not match its checksum"):
        ckpt.read_checkpoint(path, parts=("model",), check=lambda state, where: None)
    # A damaged state.pt is damage: there is no config to compare.
    (path / "state.pt").write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointDamaged, match="state.pt has 7 bytes"):
        ckpt.read_checkpoint(path, parts=("model",), check=check)
