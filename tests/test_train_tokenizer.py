"""The training loop end to end: kill-and-resume bit identity, DDP, the CLI on CIFAR-10, export, errors."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergevq.commands.train_tokenizer import main
from mergevq.losses.alignment import student_view
from mergevq.tokenizer.model import MergeVQ
from mergevq.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "cifar10"

# A tokenizer small enough for a few CPU steps per second (tiny-32's layout, narrower and shallower).
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


def micro_config(tmp_path: Path, cifar10_root: Path, **extra: object) -> Path:
    """A G+R run on 40 CIFAR-10 images with every loss term on (LPIPS off for speed, EMA teacher)."""
    body = {
        "model": {"preset": "tiny-32"},
        "data": {
            "train": str(cifar10_root / "test"),
            "val": str(cifar10_root / "test"),
            "max_images": 40,
            "num_workers": 0,
            "val_images": 4,
        },
        "merge": {"distribution": "uniform", "candidates": [16, 25, 36, 49]},
        "alignment": {"kind": "ema", "teacher_momentum": 0.9},
        "loss": {"perceptual": "none"},
        "batch_size": 4,
        "max_steps": 12,
        "log_every": 1,
        "val_every": 6,
        "checkpoint_every": 3,
        "keep_last": 2,
        "ema_decay": 0.9,
        "deterministic": True,
        "threads": 1,
        "export": True,
    }
    for key, value in extra.items():
        body[key] = value
    path = tmp_path / "micro.yaml"
    import yaml

    path.write_text(yaml.safe_dump(body))
    return path


def command(config: Path, output_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mergevq",
        "train-tokenizer",
        str(config),
        f"output_dir={output_dir}",
        *MICRO_MODEL,
        *overrides,
        "--no-progress",
    ]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {len(different)} tensors differ, e.g. {different[:3]}"


def jsonl_rows(path: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row["split"] == "train":
            rows[row["step"]] = row  # a resumed run rewrites the steps after its checkpoint: keep the last
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Kill and resume
# ----------------------------------------------------------------------------------------------------------------------


def test_sigkill_and_resume_is_bit_identical(tmp_path, cifar10_root, kill_after_step):
    config = micro_config(
        tmp_path,
        cifar10_root,
        data={
            "train": str(cifar10_root / "test"),
            "val": None,
            "max_images": 40,
            "num_workers": 1,
        },
    )
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "interrupted"
    env = subprocess_env()
    # The uninterrupted reference and the run to be killed go side by side (one thread each).
    reference = subprocess.Popen(command(config, ref_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    victim = subprocess.Popen(command(config, run_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # Seeded: after the first checkpoint (step 3) and before the last step (12), the same step on every run.
    kill_step = random.Random(2504).randint(4, 10)
    kill_after_step(victim, run_dir=run_dir, step=kill_step)

    resumed = subprocess.run(command(config, run_dir), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    line = next(s for s in resumed.stdout.splitlines() if s.startswith("Resuming from step"))
    resumed_from = int(line.split()[3])
    assert 3 <= resumed_from < 12 and f"{run_dir}/checkpoints/step_{resumed_from:08d}" in line, line
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out.decode()

    final_ref, final_run = ref_dir / "checkpoints" / "step_00000012", run_dir / "checkpoints" / "step_00000012"
    for part in ("model", "ema", "discriminator", "alignment"):
        a = load_file(str(final_ref / f"{part}.safetensors"))
        b = load_file(str(final_run / f"{part}.safetensors"))
        assert_same_tensors(a, b, f"{part} after a kill after step {kill_step} and a resume from step {resumed_from}")
    state_ref, state_run = ckpt.load_state(final_ref), ckpt.load_state(final_run)
    for opt in ("optimizer_g", "optimizer_d"):
        for i, s in state_ref[opt]["state"].items():
            assert_same_tensors(s, state_run[opt]["state"][i], f"{opt} state {i}")
    assert (state_ref["epoch"], state_ref["batch_in_epoch"]) == (state_run["epoch"], state_run["batch_in_epoch"])
    # Same K sequence and the same losses at every step, before and after the interruption.
    rows_ref, rows_run = jsonl_rows(ref_dir / "logs" / "train.jsonl"), jsonl_rows(run_dir / "logs" / "train.jsonl")
    assert sorted(rows_ref) == sorted(rows_run) == list(range(1, 13))
    for step in rows_ref:
        for key in ("num_tokens", "total", "d_total", "alignment", "reconstruction"):
            assert rows_ref[step][key] == rows_run[step][key], (step, key)
    assert len({rows_ref[s]["num_tokens"] for s in rows_ref}) > 1  # K did vary
    assert_same_tensors(
        load_file(str(ref_dir / "export" / "model.safetensors")),
        load_file(str(run_dir / "export" / "model.safetensors")),
        "export",
    )


def test_resume_continues_from_latest_and_rejects_another_model(tmp_path, cifar10_root, capsys):
    config = micro_config(tmp_path, cifar10_root)
    out = tmp_path / "run"
    args = [str(config), f"output_dir={out}", *MICRO_MODEL, "--no-progress"]
    assert main([*args, "max_steps=4", "checkpoint_every=2", "data.val=null"]) == 0
    assert [c.step for c in ckpt.list_checkpoints(out / "checkpoints")] == [2, 4]
    capsys.readouterr()
    assert main([*args, "max_steps=6", "checkpoint_every=2", "data.val=null"]) == 0
    stdout = capsys.readouterr().out
    assert f"Resuming from step 4 ({out}/checkpoints/step_00000004)" in stdout
    assert [c.step for c in ckpt.list_checkpoints(out / "checkpoints")] == [4, 6]  # keep_last 2
    assert ckpt.load_state(out / "checkpoints" / "step_00000006")["step"] == 6

    # Same output_dir, different tokenizer: a one-line error naming the presets and the differing keys.
    code = main([*args, "max_steps=8", "model.overrides.depth=4"])
    err = capsys.readouterr().err
    assert code == 2
    assert "checkpoint" in err and "'tiny-32'" in err and "depth (3 vs 4)" in err, err
    assert len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------------------
# DDP
# ----------------------------------------------------------------------------------------------------------------------

DDP_DRIVER = """
import sys
from safetensors.torch import save_file
from mergevq.train.recipe import load_config
from mergevq.train.tokenizer import train

config = load_config(sys.argv[1], overrides=sys.argv[2:])
result = train(config, progress=False)
tensors = {f"model.{k}": v for k, v in result.model.state_dict().items()}
tensors.update({f"ema.{k}": v for k, v in result.ema_model.state_dict().items()})
tensors.update({f"disc.{k}": v for k, v in result.discriminator.named_parameters()})
tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
save_file(tensors, f"{config.output_dir}/rank{result.rank}.safetensors")
"""


def test_torchrun_two_processes_end_with_identical_weights(tmp_path, cifar10_root):
    config = micro_config(tmp_path, cifar10_root)
    driver = tmp_path / "driver.py"
    driver.write_text(DDP_DRIVER)
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(driver),
        str(config),
        f"output_dir={out}",
        *MICRO_MODEL,
        "max_steps=3",
        "batch_size=2",
        "grad_accum=2",  # exercises no_sync on the first micro-batch
        "checkpoint_every=3",
        "data.val=null",
    ]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    rank0, rank1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert_same_tensors(rank0, rank1, "rank 0 vs rank 1")
    # ...while the ranks did see different images: their LeCAM anchors (fed by local batches) differ.
    state = ckpt.load_state(out / "checkpoints" / "step_00000003")
    lecam = [r["lecam"]["ema_real"].item() for r in state["ranks"]]
    assert len(lecam) == 2 and lecam[0] != lecam[1]
    # and training moved the weights (the EMA, a copy at step 0, lags behind them)
    key = "decoder.conv_out.weight"
    assert not torch.equal(rank0[f"model.{key}"], rank0[f"ema.{key}"])


@pytest.mark.slow
def test_torchrun_resume_matches_an_uninterrupted_run(tmp_path, cifar10_root):
    config = micro_config(tmp_path, cifar10_root)
    driver = tmp_path / "driver.py"
    driver.write_text(DDP_DRIVER)

    def torchrun(out: Path, steps: int) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver)]
        cmd += [str(config), f"output_dir={out}", *MICRO_MODEL, f"max_steps={steps}", "batch_size=2"]
        cmd += ["checkpoint_every=3", "data.val=null"]
        proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    torchrun(tmp_path / "whole", 6)
    torchrun(tmp_path / "split", 3)  # stops right after the step-3 checkpoint
    torchrun(tmp_path / "split", 6)  # resumes every rank's data position, RNG and LeCAM state
    for rank in (0, 1):
        assert_same_tensors(
            load_file(str(tmp_path / "whole" / f"rank{rank}.safetensors")),
            load_file(str(tmp_path / "split" / f"rank{rank}.safetensors")),
            f"rank {rank}",
        )
    whole = ckpt.load_state(tmp_path / "whole" / "checkpoints" / "step_00000006")
    split = ckpt.load_state(tmp_path / "split" / "checkpoints" / "step_00000006")
    for a, b in zip(whole["ranks"], split["ranks"]):
        assert_same_tensors(a["lecam"], b["lecam"], "LeCAM anchors")


# ----------------------------------------------------------------------------------------------------------------------
# CLI on CIFAR-10 with the shipped configs
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["g", "gr", "r"])
def test_cli_end_to_end_on_cifar10(tmp_path, cifar10_root, capsys, variant):
    out = tmp_path / variant
    overrides = [
        f"output_dir={out}",
        f"data.train={cifar10_root / 'test'}",  # 10k files: listing the 50k of train/ alone takes seconds
        f"data.val={cifar10_root / 'test'}",
        "data.max_images=24",
        "data.num_workers=0",
        "data.val_images=4",
        "batch_size=4",
        "max_steps=2",
        "val_every=2",
        "checkpoint_every=2",
        "log_every=1",
        *MICRO_MODEL,
    ]
    if variant != "gr":
        overrides.append("loss.perceptual=none")  # LPIPS runs in the G+R case only, to keep this quick
    code = main([str(CONFIGS / f"{variant}.yaml"), *overrides, "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "exported the EMA tokenizer" in captured.out
    saved = (out / "config.yaml").read_text()
    assert f"variant: {variant}" in saved
    latest = ckpt.find_latest(out / "checkpoints")
    assert latest is not None and latest.step == 2
    rows = [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    val_rows = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in train_rows] == [1, 2]
    expected_terms = {"reconstruction", "entropy", "commitment", "source_recovery", "alignment", "adversarial"}
    expected_terms |= {"d_hinge", "d_lecam", "total", "lr", "images_per_s", "num_tokens", "grad_norm"}
    if variant == "gr":
        expected_terms.add("perceptual")
    assert expected_terms <= set(train_rows[-1]), expected_terms - set(train_rows[-1])
    assert all(torch.isfinite(torch.tensor(r["total"])) for r in train_rows)
    assert val_rows and all(v > 0 for k, v in val_rows[-1].items() if k.startswith("psnr_k"))
    assert list((out / "logs" / "tb").glob("events.out.tfevents.*"))
    assert list((out / "logs" / "images").glob("val_reconstruction_*.png"))
    # The export is the EMA model of the last checkpoint, loadable on its own.
    exported = MergeVQ.from_pretrained(out / "export")
    assert exported.config.variant == variant
    assert_same_tensors(
        {k: v for k, v in exported.state_dict().items()},
        load_file(str(latest.path / "ema.safetensors")),
        "export vs checkpoint EMA",
    )
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert exported.eval()(x, num_tokens=9).reconstruction.shape == x.shape

    # --export-only rebuilds export/ from the newest checkpoint
    for f in (out / "export").iterdir():
        f.unlink()
    assert main([str(CONFIGS / f"{variant}.yaml"), *overrides, "--export-only"]) == 0
    assert (out / "export" / "model.safetensors").is_file()


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    code = main([str(CONFIGS / "gr.yaml"), "optim.lrr=1e-4"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "error: command line: unknown key 'optim.lrr' (did you mean 'optim.lr'?)"
    assert main([str(CONFIGS / "gr.yaml"), "batch_size=two"]) == 2
    assert "batch_size: expected an integer, got 'two'" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err
    assert main([str(CONFIGS / "gr.yaml"), f"output_dir={tmp_path}", f"data.train={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.train: image folder does not exist") and len(err.splitlines()) == 1
    assert main([str(CONFIGS / "gr.yaml"), "--frobnicate"]) == 2
    assert "unknown option '--frobnicate'" in capsys.readouterr().err


def test_cli_help_lists_everything(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for needle in (
        "key=value",
        "--export-only",
        "--print-config",
        "--no-progress",
        "checkpoints/",
        "export/",
        "torchrun",
        "Resuming from step",
        "exit code 2",
    ):
        assert needle in text, needle


def test_print_config_resolves_layers(capsys):
    assert main([str(CONFIGS / "r.yaml"), "recipe=paper", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "reconstruction: l2" in text and "optimizer: adamw" in text and "kind: cosine" in text


# ----------------------------------------------------------------------------------------------------------------------
# Pieces of the loop
# ----------------------------------------------------------------------------------------------------------------------


def test_student_view_is_seeded_and_a_plausible_crop():
    images = torch.linspace(-1, 1, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)
    a = student_view(images, generator=torch.Generator().manual_seed(1), scale=(0.3, 1.0))
    b = student_view(images, generator=torch.Generator().manual_seed(1), scale=(0.3, 1.0))
    c = student_view(images, generator=torch.Generator().manual_seed(2), scale=(0.3, 1.0))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == images.shape and a.min() >= -1 and a.max() <= 1
    assert not torch.allclose(a, images, atol=1e-3)  # it is an augmentation
    # a crop only interpolates values of its image: each output stays within that image's range
    for i in range(2):
        assert images[i].min() - 1e-5 <= a[i].min() and a[i].max() <= images[i].max() + 1e-5


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, cifar10_root):
    config = micro_config(tmp_path, cifar10_root)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        command(config, out, "max_steps=200", "checkpoint_every=100", "data.val=null"),
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (out / "logs" / "train.jsonl").exists() or not (out / "logs" / "train.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, stdout  # 128 + SIGTERM: the run did not finish
    assert "stopping at step" in stdout and "done:" not in stdout
    latest = ckpt.find_latest(out / "checkpoints")
    assert latest is not None and 1 <= latest.step < 200
    assert f"interrupted at step {latest.step}; run the same command to resume" in stdout
    assert not (out / "export").exists()  # unfinished runs are not exported


@pytest.mark.parametrize("setting", ["dinov2", "labels", "paper-bf16", "no-head"])
def test_other_alignment_kinds_and_recipes_train(tmp_path, cifar10_root, capsys, setting):
    extra = {
        "labels": ["alignment.kind=labels"],
        "paper-bf16": ["recipe=paper", "precision=bf16", "grad_accum=2", "grad_clip=1.0"],
        "no-head": ["model.overrides.align_head=none", "model.overrides.learned_recovery=false", "alignment.kind=none"],
    }.get(setting, [])
    if setting == "dinov2":
        transformers = pytest.importorskip("transformers")
        # A randomly initialised DINOv2 in Hugging Face format stands in for facebook/dinov2-base offline.
        dino = transformers.Dinov2Config(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        )
        transformers.Dinov2Model(dino).save_pretrained(tmp_path / "dino")
        extra = ["alignment.kind=dinov2", f"alignment.source={tmp_path / 'dino'}", "alignment.options={image_size: 32}"]
    config = micro_config(tmp_path, cifar10_root)
    out = tmp_path / "run"
    code = main(
        [str(config), f"output_dir={out}", *MICRO_MODEL, "max_steps=2", "data.val=null", *extra, "--no-progress"]
    )
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]
    assert ("alignment" in rows[-1]) == (setting != "no-head")
    assert torch.isfinite(torch.tensor(rows[-1]["total"]))
