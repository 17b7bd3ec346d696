"""Failure behaviour: divergence, concurrent runs, damaged checkpoints, signals and exit codes, unwritable outputs."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from mergevq.commands.common import CommandError, load_model
from mergevq.commands.train_tokenizer import main
from mergevq.data.images import ImageDataset, list_images
from mergevq.data.tokens import save_tokens
from mergevq.data.transforms import eval_transform
from mergevq.generator import Generator
from mergevq.tokenizer.config import TokenizerConfig
from mergevq.tokenizer.model import MergeVQ
from mergevq.train import checkpoint as ckpt
from mergevq.train.checkpointer import Checkpointer
from mergevq.train.config_io import ConfigError, check_resume
from mergevq.train.distributed import DistInfo
from mergevq.train.merge_sampling import MergeCountSampler
from mergevq.train.recipe import TrainConfig, load_config
from mergevq.train.runtime import (
    BatchStream,
    NonFiniteGuard,
    OutputDirBusy,
    TrainingDiverged,
    prepare_output_dir,
    preserve_torch_settings,
)

REPO = Path(__file__).resolve().parents[1]
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
MICRO_MODEL = [
    "model.overrides.base_channels=16",
    "model.overrides.width=64",
    "model.overrides.depth=3",
    "model.overrides.num_heads=4",
    "model.overrides.align_dim=32",
    "model.overrides.recovery_width=32",
    "model.overrides.recovery_heads=2",
    "model.overrides.decoder_depth=1",
    "model.overrides.decoder_heads=2",
    "model.overrides.codebook_bits=8",
    "loss.disc_channels=16",
    "loss.disc_layers=2",
]


@pytest.fixture
def recipe(tmp_path: Path, cifar10_root: Path) -> Path:
    """B: a tiny-32 G+R run on a few dozen CIFAR-10 images, checkpoint_every=2, keep_last=2, one thread."""
    body = {
        "model": {"preset": "tiny-32"},
        "data": {"train": str(cifar10_root / "test"), "val": None, "max_images": 24, "num_workers": 0},
        "merge": {"distribution": "uniform", "candidates": [16, 25, 36]},
        "alignment": {"kind": "ema", "teacher_momentum": 0.9},
        "loss": {"perceptual": "none"},
        "batch_size": 4,
        "max_steps": 4,
        "log_every": 1,
        "checkpoint_every": 2,
        "keep_last": 2,
        "threads": 1,
    }
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def train_args(config: Path, out: Path, *overrides: str) -> list[str]:
    return [str(config), f"output_dir={out}", *MICRO_MODEL, *overrides, "--no-progress"]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def steps(out: Path) -> list[int]:
    return [c.step for c in ckpt.list_checkpoints(out / "checkpoints")]


# ----------------------------------------------------------------------------------------------------------------------
# 1. Divergence is caught, good work kept
# ----------------------------------------------------------------------------------------------------------------------


def test_nan_run_stops_with_an_error_and_keeps_finite_checkpoints(recipe, tmp_path, capsys):
    out = tmp_path / "nan"
    code = main(train_args(recipe, out, "optim.lr=1e8", "max_steps=8", "nonfinite.max_skips=2"))
    captured = capsys.readouterr()
    assert code == 1
    assert one_line(captured.err).startswith("error: training diverged: non-finite loss")
    assert "nonfinite.max_skips=2" in captured.err
    assert captured.out.count("warning: non-finite") == 2 and "done:" not in captured.out
    assert steps(out)  # the finite checkpoints survive pruning, and every one of them reads back finite
    for info in ckpt.list_checkpoints(out / "checkpoints"):
        loaded = ckpt.read_checkpoint(info.path, parts=("model", "ema", "discriminator"))
        assert loaded.state["nonfinite"]["skipped"] <= 2
    assert not (out / "export").exists()


def test_guard_skips_then_raises_and_leaves_fp16_overflow_to_the_scaler():
    reports: list[str] = []
    guard = NonFiniteGuard(max_skips=2, report=reports.append)
    assert not guard.check(step=0, loss=torch.tensor(1.0), grad_norm=torch.tensor(3.0))
    assert guard.check(step=1, loss=torch.tensor(float("nan")), grad_norm=torch.tensor(1.0))
    assert guard.check(step=2, loss=torch.tensor(1.0), grad_norm=torch.tensor(float("inf")))
    assert guard.skipped == 2 and len(reports) == 2 and "step 3" in reports[1]
    with pytest.raises(TrainingDiverged, match="nonfinite.max_skips=2"):
        guard.check(step=3, loss=float("inf"))
    restored = NonFiniteGuard(max_skips=2)
    restored.load_state_dict(guard.state_dict())
    assert restored.skipped == 3

    scaler = torch.amp.GradScaler("cpu", enabled=True)
    fp16 = NonFiniteGuard(max_skips=0)
    assert not fp16.check(step=0, loss=torch.tensor(2.0), grad_norm=torch.tensor(float("inf")), scaler=scaler)
    with pytest.raises(TrainingDiverged):
        fp16.check(step=0, loss=torch.tensor(float("nan")), grad_norm=torch.tensor(1.0), scaler=scaler)


def test_nonfinite_weights_are_never_checkpointed_and_pruning_keeps_the_newest_finite(tmp_path):
    good = {"model": {"w": torch.ones(3)}, "ema": {"w": torch.ones(3)}}
    with pytest.raises(ckpt.NonFiniteWeights, match="model.safetensors: w holds NaN/inf"):
        ckpt.save_checkpoint(
            tmp_path, step=1, weights={**good, "model": {"w": torch.tensor([1.0, float("nan")])}}, state={}
        )
    with pytest.raises(ckpt.NonFiniteWeights, match="opt.exp_avg"):
        ckpt.save_checkpoint(tmp_path, step=1, weights=good, state={"opt": {"exp_avg": torch.tensor(float("inf"))}})
    assert not list(tmp_path.glob("step_*"))

    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step=step, weights=good, state={})
    for step in (3, 4):  # checkpoints not known to be finite (e.g. written before the check existed)
        path = ckpt.save_checkpoint(tmp_path, step=step, weights=good, state={})
        meta = json.loads((path / "meta.json").read_text())
        (path / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "finite"}))
    ckpt.prune(tmp_path, keep_last=1)
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [2, 4]

    model = nn.Linear(2, 2)
    saver = Checkpointer(tmp_path / "c", info=CPU, modules={"model": model, "ema": model}, states={}, keep_last=1)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"model.weight holds NaN/inf"):
        saver.save(step=1, stream=BatchStream(_Loader()))
    assert not (tmp_path / "c").exists()


class _Loader(list):
    """Stands in for a make_loader loader in BatchStream (only its length and batch sampler are used)."""

    def __init__(self) -> None:
        super().__init__([0, 1])
        from mergevq.data.images import SkipBatchSampler

        self.batch_sampler = SkipBatchSampler(range(2), batch_size=1, drop_last=True)
        self.dataset = None


def test_models_with_nonfinite_weights_do_not_load(tmp_path, capsys, mergevq_cli):
    model = MergeVQ.from_preset("tiny-32")
    with torch.no_grad():
        model.decoder.conv_out.weight[0, 0, 0, 0] = float("nan")
    directory = model.save_pretrained(tmp_path / "diverged")
    with pytest.raises(ValueError, match=r"model.safetensors: 1 tensor\(s\) hold NaN/inf values"):
        MergeVQ.from_pretrained(directory)
    with pytest.raises(CommandError, match="diverged/model.safetensors"):
        load_model(model_dir=directory, device=torch.device("cpu"))
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), "red").save(images / "a.png")
    code = mergevq_cli("encode", "--model", directory, "--data", images, "--num-tokens", "16",
                       "--output", tmp_path / "t.safetensors", "--num-workers", "0")  # fmt: skip
    assert code == 2 and "NaN/inf" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "t.safetensors").exists()


def test_encode_refuses_inputs_it_cannot_use():
    model = MergeVQ.from_preset("tiny-32").eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with pytest.raises(ValueError, match="NaN or inf"):
        model.encode(torch.where(x > 0.9, float("nan"), x))
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\].*127.5"):
        model.encode((x + 1) * 127.5)
    with pytest.raises(TypeError, match="uint8.*127.5"):
        model.encode(((x + 1) * 127.5).to(torch.uint8))
    with pytest.raises(TypeError, match="float64"):
        model.encode(x.double())
    with pytest.raises(ValueError, match="empty batch"):
        model.encode(x[:0])
    for bad in (2.5, True, "16"):
        with pytest.raises(TypeError, match="num_tokens must be an integer"):
            model.encode(x, num_tokens=bad)
    assert model.encode(x, num_tokens=np.int64(16)).num_tokens == 16


# ----------------------------------------------------------------------------------------------------------------------
# 2. One run per output directory; no silent recipe changes on resume
# ----------------------------------------------------------------------------------------------------------------------


def test_output_dir_lock_is_exclusive_named_and_released_on_death(tmp_path, recipe, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"f = open({str(out / '.lock')!r}, 'a+'); fcntl.lockf(f, fcntl.LOCK_EX)\n"
         "f.write(str(os.getpid())); f.flush(); print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirBusy, match=rf"in use by another run \(pid {holder.pid}\)"):
            prepare_output_dir(out, info=CPU)
        assert main(train_args(recipe, out)) == 1
        err = one_line(capsys.readouterr().err)
        assert f"output_dir {out} is in use by another run (pid {holder.pid})" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with preserve_torch_settings():  # SIGKILL leaves no stale lock; the lock ends with the run's scope
        assert prepare_output_dir(out, info=CPU) == out
    assert (out / ".lock").read_text().strip() == str(os.getpid())
    probe = f"import fcntl; fcntl.lockf(open({str(out / '.lock')!r}, 'a+'), fcntl.LOCK_EX | fcntl.LOCK_NB)"
    holder = subprocess.run([sys.executable, "-c", probe], timeout=30)  # released: another process gets it at once
    assert holder.returncode == 0


def test_resume_refuses_recipe_changes_unless_allowed(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(recipe, out, "max_steps=2", "export=false")) == 0
    capsys.readouterr()
    code = main(train_args(recipe, out, "max_steps=4", "batch_size=2", "optim.lr=2e-4", "seed=3"))
    err = one_line(capsys.readouterr().err)
    assert code == 2 and "was written with a different recipe" in err
    for needle in ("batch_size (4 -> 2)", "optim.lr (0.0001 -> 0.0002)", "seed (0 -> 3)", "resume.allow_changes=true"):
        assert needle in err, needle
    assert steps(out) == [2]
    # Settings that do not change the math may change freely (max_steps: extending a run).
    assert main(train_args(recipe, out, "max_steps=3", "log_every=3", "keep_last=3", "threads=1")) == 0
    assert "changed settings: " in capsys.readouterr().out and steps(out) == [2, 3]
    assert main(train_args(recipe, out, "max_steps=4", "optim.lr=2e-4", "resume.allow_changes=true")) == 0
    assert "optim.lr (0.0001 -> 0.0002)" in capsys.readouterr().err and steps(out) == [3, 4]


def test_another_model_size_is_named_before_the_weights_are_verified(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(recipe, out, "max_steps=2", "export=false")) == 0
    capsys.readouterr()
    weights = out / "checkpoints" / "step_00000002" / "model.safetensors"
    for _ in range(2):  # intact, then with weights that could not load: the other config is what gets reported
        assert main(train_args(recipe, out, "max_steps=4", "model.overrides.depth=4")) == 2
        err = one_line(capsys.readouterr().err)
        assert "was written for model preset 'tiny-32'" in err and "depth (3 vs 4)" in err, err
        weights.write_bytes(weights.read_bytes()[:100])


def test_check_resume_lists_changes_and_honours_the_allow_list():
    saved = {"max_steps": 10, "batch_size": 4, "data": {"train": "a", "num_workers": 2}, "variant": "gr"}
    current = {"max_steps": 20, "batch_size": 4, "data": {"train": "b", "num_workers": 8}, "variant": "g"}
    with pytest.raises(ConfigError, match=r"ckpt was written with a different recipe: data.train \('a' -> 'b'\)"):
        check_resume(saved, current, allow_changes=False, source="ckpt")
    harmless, other = check_resume(saved, current, allow_changes=True, source="ckpt")
    assert [k for k, _, _ in harmless] == ["data.num_workers", "max_steps"]
    assert [k for k, _, _ in other] == ["data.train", "variant"]


# ----------------------------------------------------------------------------------------------------------------------
# 3. A damaged checkpoint falls back to the next older one
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("part", ["model.safetensors", "state.pt"])
def test_truncated_newest_checkpoint_falls_back(recipe, tmp_path, capsys, part):
    out = tmp_path / "run"
    assert main(train_args(recipe, out, "max_steps=4")) == 0
    assert steps(out) == [2, 4]
    newest = out / "checkpoints" / "step_00000004" / part
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    capsys.readouterr()

    shutil.rmtree(out / "export")
    assert main(train_args(recipe, out, "max_steps=4", "--export-only")) == 0
    captured = capsys.readouterr()
    assert f"step_00000004: {part} has" in one_line(captured.err) and "trying the previous checkpoint" in captured.err
    assert (out / "export" / "model.safetensors").is_file()

    assert main(train_args(recipe, out, "max_steps=5")) == 0
    captured = capsys.readouterr()
    assert "Resuming from step 2" in captured.out and one_line(captured.err).startswith("warning: checkpoint")
    assert steps(out) == [4, 5]  # step 4 written again, intact
    ckpt.read_checkpoint(out / "checkpoints" / "step_00000004", parts=("model", "ema"))


def test_checkpointer_verifies_every_part_and_reports_when_none_is_usable(tmp_path, capsys):
    model = nn.Linear(2, 2)
    parts = {"model": model, "ema": model}
    saver = Checkpointer(tmp_path, info=CPU, modules=parts, states={}, keep_last=3)
    for step in (1, 2):
        saver.save(step=step, stream=BatchStream(_Loader()))
    # A changed byte keeps the size: only the checksum finds it.
    weights = tmp_path / "step_00000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert Checkpointer(tmp_path, info=CPU, modules=parts, states={}, keep_last=3).resume().step == 1
    assert "model.safetensors does not match its checksum" in one_line(capsys.readouterr().err)
    # Checkpoints written before checksums existed still load (their files are checked for readability only).
    meta_file = tmp_path / "step_00000001" / "meta.json"
    meta_file.write_text(json.dumps({k: v for k, v in json.loads(meta_file.read_text()).items() if k != "files"}))
    assert ckpt.read_checkpoint(tmp_path / "step_00000001", parts=("model",)).step == 1
    # Shapes are part of the check too; with nothing usable left, one error lists the checkpoints.
    wider = nn.Linear(3, 2)
    other = Checkpointer(tmp_path, info=CPU, modules={"model": wider, "ema": wider}, states={}, keep_last=3)
    with pytest.raises(
        ckpt.CheckpointDamaged, match=r"no usable checkpoint under .* \(damaged: step_00000002, step_00000001\)"
    ):
        other.resume()


# ----------------------------------------------------------------------------------------------------------------------
# 4. Exit codes after signals
# ----------------------------------------------------------------------------------------------------------------------


def _launch(recipe: Path, out: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mergevq", "train-tokenizer", *train_args(recipe, out, *overrides)]
    return subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 180
    while not predicate():
        assert proc.poll() is None, f"exited before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_run_checkpoints_and_exits_128_plus_signal(recipe, tmp_path, capsys, signum, code):
    out = tmp_path / "run"
    proc = _launch(recipe, out, "max_steps=500", "checkpoint_every=250")
    log = out / "logs" / "train.jsonl"
    _wait_for(lambda: log.exists() and log.read_text(), proc, "the first step")
    if signum == signal.SIGTERM:  # a concurrent second run on the same directory is refused
        assert main(train_args(recipe, out, "max_steps=500", "checkpoint_every=250")) == 1
        assert f"is in use by another run (pid {proc.pid})" in one_line(capsys.readouterr().err)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stdout + stderr
    stopped = steps(out)[-1]
    assert 1 <= stopped < 500 and "done:" not in stdout
    assert one_line(stderr) == f"interrupted at step {stopped}; run the same command to resume"


@pytest.mark.parametrize("moment", ["imports", "building"])
def test_sigint_during_start_up_exits_130_without_a_traceback(recipe, tmp_path, moment):
    out = tmp_path / "run"
    proc = _launch(recipe, out, "max_steps=500")
    if moment == "imports":  # torch and the commands load for a second or more
        time.sleep(0.5)
    else:  # loading data, building modules
        _wait_for(lambda: (out / ".lock").exists(), proc, "the output directory")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr and "interrupted" in one_line(stderr)


# ----------------------------------------------------------------------------------------------------------------------
# 5. Fail before the work, in one line
# ----------------------------------------------------------------------------------------------------------------------


def test_unusable_outputs_fail_before_the_work(tmp_path, capsys, mergevq_cli, tiny_tokenizer_dir):
    (tmp_path / "existing").mkdir()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    calls = [
        ("encode", "--model", tiny_tokenizer_dir, "--data", tmp_path / "nowhere", "--num-tokens", "16",
         "--output", tmp_path / "existing"),
        ("evaluate", "tokenizer", "--preset", "tiny-32", "--data", tmp_path / "nowhere", "--output", a_file / "r.json"),
        ("evaluate", "generator", "--samples", tmp_path / "s.npz", "--reference", tmp_path / "r.npz",
         "--output", a_file / "r.json"),
        ("benchmark", "--preset", "tiny-32", "--output", a_file / "sub" / "r.json"),
        ("reconstruct", "--preset", "tiny-32", "--input", tmp_path / "nowhere.png", "--output", a_file),
    ]  # fmt: skip
    for argv in calls:
        assert mergevq_cli(*argv) == 2, argv
        err = one_line(capsys.readouterr().err)
        assert "is a directory" in err or "is not a directory" in err, err


def test_run_problems_are_one_line(recipe, tmp_path, capsys, cifar10_root):
    (tmp_path / "out_is_a_file").write_text("x")
    assert main(train_args(recipe, tmp_path / "out_is_a_file")) == 1
    assert (
        one_line(capsys.readouterr().err)
        == f"error: output_dir {tmp_path / 'out_is_a_file'} exists and is not a directory"
    )

    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)))
    for config, needle in ((tmp_path, "is a directory"), (tmp_path / "binary.yaml", "not a text file")):
        assert main([str(config)]) == 2
        assert needle in one_line(capsys.readouterr().err)

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for i in range(3):
        (corrupt / f"{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(train_args(recipe, tmp_path / "c", f"data.train={corrupt}", "data.num_workers=1")) == 2
    assert "data.train: none of the 3 image files" in one_line(capsys.readouterr().err)


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(recipe, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = ckpt._write_torch
    calls = []

    def full_disk(path, obj):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, obj)

    monkeypatch.setattr(ckpt, "_write_torch", full_disk)
    assert main(train_args(recipe, out, "max_steps=4")) == 1
    err = one_line(capsys.readouterr().err)
    assert f"cannot write checkpoint {out / 'checkpoints' / 'step_00000004'}: No space left on device" in err
    assert "previous checkpoints are intact" in err
    assert steps(out) == [2] and not list((out / "checkpoints").glob(".tmp-*"))
    ckpt.read_checkpoint(out / "checkpoints" / "step_00000002", parts=("model",))


def test_a_write_error_without_a_file_name_names_the_output_dir(recipe, tmp_path, capsys, monkeypatch):
    from mergevq.train.logging import TrainLogger

    def full_disk(self, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a failed write() on an open file

    monkeypatch.setattr(TrainLogger, "scalars", full_disk)
    assert main(train_args(recipe, tmp_path / "run")) == 1
    err = one_line(capsys.readouterr().err)
    assert err == f"error: No space left on device while writing under output_dir {tmp_path / 'run'}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_dir_is_one_line(recipe, tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert main(train_args(recipe, out)) == 1
        assert one_line(capsys.readouterr().err) == f"error: output_dir {out} is not writable"
    finally:
        out.chmod(0o755)


def test_reconstruct_output_names_never_collide(tmp_path, capsys, mergevq_cli):
    images = tmp_path / "in"
    images.mkdir()
    for name, color in (("foo.jpg", "red"), ("foo_k16.jpg", "blue")):
        Image.new("RGB", (32, 32), color).save(images / name)
    assert mergevq_cli("reconstruct", "--preset", "tiny-32", "--input", images, "--num-tokens", "16",
                       "--output", tmp_path / "out", "--device", "cpu") == 0  # fmt: skip
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    written = [r["panel"] for r in summary["images"]] + [r["reconstructions"]["16"] for r in summary["images"]]
    assert len(set(written)) == 4 and all((tmp_path / "out" / name).is_file() for name in written)


def test_small_items(tmp_path):
    # TIFF files are images like the others.
    Image.new("RGB", (8, 8), "green").save(tmp_path / "a.tiff")
    Image.new("RGB", (8, 8), "green").save(tmp_path / "b.tif")
    assert [p.name for p, _ in list_images(tmp_path)] == ["a.tiff", "b.tif"]
    assert ImageDataset(tmp_path, transform=eval_transform(8))[0]["image"].shape == (3, 8, 8)

    # A wrongly typed tokenizer config value is named, not a formatting error.
    config = MergeVQ.from_preset("tiny-32").config.to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**config, "width": "128"}))
    with pytest.raises(ValueError, match=r"config.json: TokenizerConfig.width: expected an integer, got '128'"):
        TokenizerConfig.load(tmp_path / "config.json")

    # The defaults are a valid configuration, from an empty YAML and as the dataclass.
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml").merge.t_max == 2
    sampler = MergeCountSampler(config=TrainConfig().merge, num_tokens_full=64, default_num_tokens=36, seed=0)
    assert max(sampler.candidates) <= 64

    # Exported weights, token files and checkpoints get the umask's default mode, not 0600.
    mask = os.umask(0o022)
    try:
        exported = MergeVQ.from_preset("tiny-32").save_pretrained(tmp_path / "export")
        generator = Generator.from_preset("tiny", codebook_bits=8, grid=(2, 2), num_classes=2)
        generator_dir = generator.save_pretrained(tmp_path / "generator")
        zeros = torch.zeros(2, 64, dtype=torch.long)
        tokens = save_tokens(
            tmp_path / "t.safetensors", indices=zeros[:, :4], assignment=zeros, labels=zeros[:, 0], meta={}
        )
        saved = ckpt.save_checkpoint(tmp_path / "c", step=1, weights={"model": {"w": torch.ones(1)}}, state={})
    finally:
        os.umask(mask)
    for path in (
        exported / "model.safetensors",
        generator_dir / "model.safetensors",
        tokens,
        saved / "model.safetensors",
    ):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_nan_reference_statistics_are_an_error_before_any_feature(tmp_path, capsys, mergevq_cli):
    np.savez(tmp_path / "ref.npz", mu=np.full(4, np.nan), sigma=np.eye(4))
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((2, 8, 8, 3), dtype=np.uint8))
    code = mergevq_cli("evaluate", "generator", "--samples", tmp_path / "samples.npz",
                       "--reference", tmp_path / "ref.npz", "--output", tmp_path / "r.json")  # fmt: skip
    assert code == 1
    assert "ref.npz: NaN or inf values in mu" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "r.json").exists()
