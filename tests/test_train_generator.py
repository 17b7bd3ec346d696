"""Stage-2 training end to end: the CLI for every kind, kill-and-resume bit identity, EMA-less checkpoints, DDP,
reproducible validation, one-line errors."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from mergevq.commands.train_generator import main
from mergevq.data.tokens import load_tokens, save_tokens, tokenizer_identity
from mergevq.generator import Generator
from mergevq.train import checkpoint as ckpt
from mergevq.train import generator as trainer
from mergevq.train.generator_data import ShardSampler
from mergevq.train.generator_recipe import load_config

REPO = Path(__file__).resolve().parents[1]
GRID, KS, CLASSES = (4, 4), (4, 8, 16), 4

# A generator small enough for tens of CPU steps per second.
MICRO = ["model.overrides.depth=2", "model.overrides.width=64", "model.overrides.num_heads=2"]


def make_tokens(
    path: Path,
    *,
    num: int = 48,
    ks: tuple[int, ...] = KS,
    bits: int = 10,
    tokenizer: str = "tiny-32",
    labels: str = "classes",  # "classes" | "none" (all -1) | "mixed"
    seed: int = 0,
) -> Path:
    """A learnable synthetic token file: each class has its own code pattern, 10% of the codes are noise."""
    g = torch.Generator().manual_seed(seed)
    length = GRID[0] * GRID[1]
    y = torch.arange(num) % CLASSES
    entries = {}
    for k in ks:
        assignment = (torch.arange(length) * k // length).expand(num, length).clone()  # runs of L/K positions
        pattern = (y[:, None] * 97 + torch.arange(k)[None] * 31) % 2**bits
        noise = torch.randint(0, 2**bits, (num, k), generator=g)
        entries[k] = (torch.where(torch.rand(num, k, generator=g) < 0.9, pattern, noise), assignment)
    if labels == "none":
        y = torch.full((num,), -1)
    elif labels == "mixed":
        y = y.clone()
        y[0] = -1
    meta = {
        "tokenizer": tokenizer,
        "codebook_bits": bits,
        "num_positions": length,
        "grid": list(GRID),
        "image_size": 16,
        "num_classes": 0 if labels == "none" else CLASSES,
    }
    return save_tokens(path, entries=entries, labels=y, meta=meta)


@pytest.fixture()
def tokens(tmp_path: Path) -> tuple[Path, Path]:
    return make_tokens(tmp_path / "train.safetensors"), make_tokens(tmp_path / "val.safetensors", num=16, seed=1)


def base_args(train: Path, val: Path | None, out: Path, *extra: str) -> list[str]:
    return [
        f"data.train={train}",
        f"data.val={val if val is not None else 'null'}",
        f"output_dir={out}",
        *MICRO,
        "batch_size=8",
        "threads=1",
        "deterministic=true",
        *extra,
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


def log_rows(out: Path, split: str = "train") -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for line in (out / "logs" / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["split"] == split:
            rows[row["step"]] = row  # a resumed run rewrites the steps after its checkpoint: keep the last
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# CLI end to end
# ----------------------------------------------------------------------------------------------------------------------


# Per kind: with or without an EMA (both checkpoint layouts), and MergeAR with two bit groups.
KIND_EXTRA = {
    "ar": ["ema_decay=0.9"],
    "mergear": ["ema_decay=null", "model.overrides.factorized_bits=[4,6]"],
    "randar": ["ema_decay=null"],
    "maskgit": ["ema_decay=0.9"],
}


@pytest.mark.parametrize("kind", list(KIND_EXTRA))
def test_cli_overfits_and_exports(tmp_path, tokens, capsys, kind):
    train, val = tokens
    out = tmp_path / kind
    extra, with_ema, merged = KIND_EXTRA[kind], KIND_EXTRA[kind][0] != "ema_decay=null", kind in ("mergear", "randar")
    args = [
        f"model.kind={kind}",
        *base_args(train, val, out, "max_steps=40", "log_every=5", "val_every=20", "checkpoint_every=20"),
        "optim.lr=3e-3",
        "schedule.warmup_steps=5",
        *extra,
    ]
    code = main([str(REPO / "configs" / "cifar10" / f"{kind}.yaml"), *args, "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert ("exported the EMA generator" if with_ema else "exported the generator") in captured.out
    rows = log_rows(out)
    assert sorted(rows) == list(range(5, 41, 5))
    # A tiny overfit; RandAR's random orders and MaskGIT's masks, both with label smoothing 0.1, learn slower.
    ratio = 0.6 if kind in ("ar", "mergear") else 0.8
    assert rows[40]["loss"] < ratio * rows[5]["loss"], (rows[5]["loss"], rows[40]["loss"])
    assert {"loss", "accuracy", "grad_norm", "lr", "num_tokens", "images_per_s", "ce_g0"} <= set(rows[40])
    ks = {r["num_tokens"] for r in rows.values()}
    val_rows = log_rows(out, "val")
    assert sorted(val_rows) == [20, 40] and val_rows[40]["loss"] < val_rows[20]["loss"]
    if merged:
        assert len(ks) > 1 and all(4 <= k <= 8 for k in ks)  # window means of K drawn from the levels {4, 8}
        assert {"loss_k4", "loss_k8", "accuracy_k4", "accuracy_k8"} <= set(val_rows[40])
    else:
        assert ks == {16.0}
    assert ("ce_g1" in rows[40]) == (kind == "mergear")  # two bit groups (4, 6): one cross-entropy each
    assert list((out / "logs" / "tb").glob("events.out.tfevents.*"))

    # The export: the token file's tokenizer identity, grid, classes and merge levels; EMA weights when enabled.
    exported = Generator.from_pretrained(out / "export")
    cfg = exported.config
    assert cfg.tokenizer == tokenizer_identity(load_tokens(train).meta)
    assert (cfg.kind, cfg.grid, cfg.codebook_bits, cfg.num_classes) == (kind, GRID, 10, CLASSES)
    assert cfg.merge_levels == ((4, 8) if merged else ())
    latest = ckpt.find_latest(out / "checkpoints")
    assert latest is not None and latest.step == 40
    # Without an EMA the checkpoint holds the weights once, and the export is those trained weights.
    assert (latest.path / "ema.safetensors").is_file() == with_ema
    assert_same_tensors(
        exported.state_dict(),
        load_file(str(latest.path / ("ema.safetensors" if with_ema else "model.safetensors"))),
        "export vs checkpoint",
    )
    if with_ema:
        model_weights = load_file(str(latest.path / "model.safetensors"))
        assert any(not torch.equal(v, model_weights[k]) for k, v in exported.state_dict().items())
    decoding = {"randar": {"steps": 2}, "maskgit": {"steps": 2, "tome_ratio": 0.25}}.get(kind, {})
    sample = exported.generate(labels=torch.tensor([0, 1]), num_tokens=4 if merged else None, **decoding)
    # RandAR returns the K codes in rank order (Source Recovery places them); the others a full grid.
    assert sample.indices.shape == (2, 4 if kind == "randar" else 16) and int(sample.indices.max()) < 2**10
    assert (sample.assignment is None) == (kind == "randar")

    # --export-only rebuilds export/ from the newest checkpoint.
    for f in (out / "export").iterdir():
        f.unlink()
    assert main([str(REPO / "configs" / "cifar10" / f"{kind}.yaml"), *args, "--export-only"]) == 0
    assert_same_tensors(Generator.from_pretrained(out / "export").state_dict(), exported.state_dict(), "re-export")


def test_unlabelled_tokens_train_one_class_in_bf16(tmp_path, capsys):
    train = make_tokens(tmp_path / "flat.safetensors", labels="none")
    out = tmp_path / "run"
    args = base_args(train, None, out, "max_steps=2", "precision=bf16", "grad_accum=2", "model.kind=mergear")
    assert main(["/dev/null", *args, "--no-progress"]) == 0, capsys.readouterr().err
    assert "unlabelled: one class" in capsys.readouterr().out
    assert Generator.from_pretrained(out / "export").config.num_classes == 1
    assert torch.isfinite(torch.tensor(log_rows(out)[2]["loss"]))


def test_shards_are_disjoint_and_follow_the_epoch():
    ranks = [ShardSampler(10, seed=3, rank=r, world_size=3) for r in range(3)]
    rows = [list(s) for s in ranks]
    assert all(len(r) == 3 for r in rows) and len(set(sum(rows, []))) == 9
    assert list(ShardSampler(10, seed=3, rank=0, world_size=1))[:9:3] == rows[0]  # rank r: every 3rd from r
    for s in ranks:
        s.set_epoch(1)
    assert [list(s) for s in ranks] != rows and [list(s) for s in ranks] == [list(s) for s in ranks]


# ----------------------------------------------------------------------------------------------------------------------
# Kill and resume
# ----------------------------------------------------------------------------------------------------------------------


def test_sigkill_and_resume_is_bit_identical(tmp_path, tokens, kill_after_step):
    train, _ = tokens
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "interrupted"

    def command(out: Path) -> list[str]:
        args = base_args(train, None, out, "max_steps=40", "checkpoint_every=5", "keep_last=2", "log_every=1")
        args += ["model.kind=mergear", "ema_decay=0.9", "grad_accum=2", "optim.lr=3e-3", "schedule.warmup_steps=5"]
        return [sys.executable, "-m", "mergevq", "train-generator", "/dev/null", *args, "--no-progress"]

    env = subprocess_env()
    # The uninterrupted reference and the run to be killed go side by side (one thread each).
    reference = subprocess.Popen(command(ref_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    victim = subprocess.Popen(command(run_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # Seeded: after the first checkpoint (step 5) and well before the last step (40), the same step on every run.
    kill_step = random.Random(2504).randint(8, 30)
    kill_after_step(victim, run_dir=run_dir, step=kill_step)

    resumed = subprocess.run(command(run_dir), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    line = next(s for s in resumed.stdout.splitlines() if s.startswith("Resuming from step"))
    resumed_from = int(line.split()[3])
    assert 5 <= resumed_from < 40 and f"{run_dir}/checkpoints/step_{resumed_from:08d}" in line, line
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out.decode()

    final_ref, final_run = ref_dir / "checkpoints" / "step_00000040", run_dir / "checkpoints" / "step_00000040"
    for part in ("model", "ema"):
        a, b = load_file(str(final_ref / f"{part}.safetensors")), load_file(str(final_run / f"{part}.safetensors"))
        assert_same_tensors(a, b, f"{part} after a kill after step {kill_step} and a resume from step {resumed_from}")
    state_ref, state_run = ckpt.load_state(final_ref), ckpt.load_state(final_run)
    for i, s in state_ref["optimizer"]["state"].items():
        assert_same_tensors(s, state_run["optimizer"]["state"][i], f"optimizer state {i}")
    assert (state_ref["epoch"], state_ref["batch_in_epoch"]) == (state_run["epoch"], state_run["batch_in_epoch"])
    assert state_ref["epoch"] >= 2  # 80 micro-batches of 8 over 48 rows: the run crossed epochs
    rows_ref, rows_run = log_rows(ref_dir), log_rows(run_dir)
    assert sorted(rows_ref) == sorted(rows_run) == list(range(1, 41))
    for step in rows_ref:
        for key in ("num_tokens", "loss", "accuracy", "grad_norm"):
            assert rows_ref[step][key] == rows_run[step][key], (step, key)
    assert len({rows_ref[s]["num_tokens"] for s in rows_ref}) == 2  # K did vary
    assert_same_tensors(
        load_file(str(ref_dir / "export" / "model.safetensors")),
        load_file(str(run_dir / "export" / "model.safetensors")),
        "export",
    )


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints without an EMA, validation randomness
# ----------------------------------------------------------------------------------------------------------------------


def test_checkpoints_without_ema_hold_the_weights_once(tmp_path, tokens, capsys):
    train, _ = tokens
    out = tmp_path / "run"
    args = base_args(train, None, out, "model.kind=randar", "checkpoint_every=2", "keep_last=5")

    def run(*extra: str) -> str:
        assert main(["/dev/null", *args, *extra, "--no-progress"]) == 0
        return capsys.readouterr().out

    def files(step: int) -> list[str]:
        return sorted(p.name for p in (out / "checkpoints" / f"step_{step:08d}").iterdir())

    run("max_steps=2", "ema_decay=null")
    assert files(2) == ["meta.json", "model.safetensors", "state.pt"]
    assert "Resuming from step 2" in run("max_steps=4", "ema_decay=null")
    assert files(4) == files(2)
    # Turning the EMA on (a recipe change) starts the average from the checkpoint's weights.
    text = run("max_steps=6", "ema_decay=0.9", "resume.allow_changes=true")
    assert "the checkpoint holds no ema weights: ema starts from its model weights" in text
    assert files(6) == ["ema.safetensors", "meta.json", "model.safetensors", "state.pt"]
    # ... and off again: a checkpoint with an EMA resumes without it; export reads the trained weights.
    assert "Resuming from step 6" in run("max_steps=8", "ema_decay=null", "resume.allow_changes=true")
    assert files(8) == files(2)
    assert_same_tensors(
        Generator.from_pretrained(out / "export").state_dict(),
        load_file(str(out / "checkpoints" / "step_00000008" / "model.safetensors")),
        "export without an EMA",
    )


@pytest.mark.parametrize("kind", ["randar", "maskgit"])
def test_validation_is_reproducible_and_leaves_the_training_stream_alone(tmp_path, tokens, kind):
    train, val = tokens
    config = load_config(None, overrides=base_args(train, val, tmp_path / "run", f"model.kind={kind}"))
    parts = trainer._build(config, device=torch.device("cpu"))
    logger = SimpleNamespace(scalars=lambda **_: None, info=lambda _: None)
    with torch.no_grad():  # fresh heads are zero: every draw would give the same loss
        for weight in parts.model.parameters():
            weight.add_(torch.randn_like(weight), alpha=0.05)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    first = trainer._validate(parts, config, step=1, logger=logger, device=torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)  # orders and masks came from a forked generator
    torch.manual_seed(6)
    assert trainer._validate(parts, config, step=2, logger=logger, device=torch.device("cpu")) == first
    # The loss does depend on the draw: the reproducibility is not a trivial one.
    with torch.no_grad():
        batch = parts.tokens.val.batch(torch.arange(8), num_tokens=parts.tokens.levels[0])
        parts.model.eval()
        losses = {float(parts.model(**vars(batch), num_tokens=batch.num_tokens).loss) for _ in range(2)}
    assert len(losses) == 2


# ----------------------------------------------------------------------------------------------------------------------
# DDP
# ----------------------------------------------------------------------------------------------------------------------

DDP_DRIVER = """
import sys
from safetensors.torch import save_file
from mergevq.train.generator_recipe import load_config
from mergevq.train.generator import train

config = load_config(None, overrides=sys.argv[1:])
result = train(config, progress=False)
tensors = {f"model.{k}": v for k, v in result.model.state_dict().items()}
tensors.update({f"ema.{k}": v for k, v in result.ema_model.state_dict().items()})
tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
save_file(tensors, f"{config.output_dir}/rank{result.rank}.safetensors")
"""


def test_torchrun_two_processes_end_with_identical_weights(tmp_path, tokens):
    train, val = tokens
    driver = tmp_path / "driver.py"
    driver.write_text(DDP_DRIVER)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver)]
    cmd += base_args(train, val, out, "model.kind=mergear", "ema_decay=0.5", "max_steps=4", "grad_accum=2")
    cmd += [
        "checkpoint_every=2",
        "val_every=2",
        "device=cpu",
    ]  # grad_accum 2 exercises no_sync on the first micro-batch
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and "step 4: val loss" in proc.stdout
    rank0, rank1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert_same_tensors(rank0, rank1, "rank 0 vs rank 1")
    moved = [k for k in rank0 if k.startswith("model.") and not torch.equal(rank0[k], rank0["ema." + k[6:]])]
    assert moved  # training moved the weights away from the (lagging) EMA
    state = ckpt.load_state(out / "checkpoints" / "step_00000004")
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert (state["epoch"], state["batch_in_epoch"]) == (2, 2)  # 24 rows per rank = 3 micro-batches per epoch


# ----------------------------------------------------------------------------------------------------------------------
# Errors: one line, exit code 2
# ----------------------------------------------------------------------------------------------------------------------


def run_error(capsys, *args: str) -> str:
    code = main(["/dev/null", *args, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_errors_are_one_line_with_exit_code_2(tmp_path, tokens, capsys):
    train, val = tokens
    out = tmp_path / "run"
    args = base_args(train, val, out, "max_steps=2")
    err = run_error(capsys, *args, "model.kind=llamagen")
    assert "model.kind: expected one of 'ar', 'mergear', 'randar', 'maskgit', got 'llamagen'" in err
    assert "unknown generator preset 'huge'" in run_error(capsys, *args, "model.preset=huge")
    assert "did you mean 'optim.lr'" in run_error(capsys, *args, "optim.lrr=1e-3")
    assert "batch_size: expected an integer" in run_error(capsys, *args, "batch_size=eight")
    err = run_error(capsys, *args, "model.overrides.codebook_bits=12")
    assert "model.overrides.codebook_bits: cannot be set here, it comes from the token file" in err
    assert "model.overrides.windw" in run_error(capsys, *args, "model.overrides.windw=2")

    # Token files: another tokenizer's val file, a K the file lacks, AR without K = L, labels half missing.
    other = make_tokens(tmp_path / "other.safetensors", tokenizer="tiny-64", num=16)
    err = run_error(capsys, *args, f"data.val={other}")
    assert err.startswith("error: data.val:") and "different tokenizers: tokenizer 'tiny-64' vs 'tiny-32'" in err
    err = run_error(capsys, *args, "model.kind=mergear", "data.num_tokens=[4,5]")
    assert "data.num_tokens: token file" in err and "holds no K=5 tokens; available K: [4, 8, 16]" in err
    no_full = make_tokens(tmp_path / "merged_only.safetensors", ks=(4, 8))
    err = run_error(capsys, *base_args(no_full, None, out, "model.kind=ar"))
    assert "vanilla AR needs K = L = 16" in err and "holds K [4, 8]" in err
    assert "MaskGIT needs K = L = 16" in run_error(capsys, *base_args(no_full, None, out, "model.kind=maskgit"))
    full = make_tokens(tmp_path / "full.safetensors", ks=(16,))
    assert "MergeAR needs merged tokens (K < L = 16)" in run_error(
        capsys, *base_args(full, None, out), "model.kind=mergear"
    )
    assert "RandAR needs merged tokens (K < L = 16)" in run_error(
        capsys, *base_args(full, None, out), "model.kind=randar"
    )
    err = run_error(capsys, *args, "model.kind=maskgit", "data.num_tokens=[4]")
    assert "data.num_tokens: MaskGIT trains on all L=16 positions" in err
    mixed = make_tokens(tmp_path / "mixed.safetensors", labels="mixed")
    assert "mixes unlabelled (-1) and labelled" in run_error(capsys, *base_args(mixed, None, out))
    err = run_error(capsys, *args, "model.kind=mergear", "data.num_tokens=[4,8]", "merge.candidates=[4,16]")
    assert "merge: K=16 is not one of the merge levels [4, 8]" in err
    assert "token file not found" in run_error(capsys, *base_args(tmp_path / "nowhere.safetensors", None, out))

    # Resuming with another tokenizer's tokens, or another generator, is refused before anything loads.
    assert main(["/dev/null", *args, "--no-progress"]) == 0
    capsys.readouterr()
    other_train = make_tokens(tmp_path / "other_train.safetensors", tokenizer="tiny-64")
    err = run_error(capsys, *base_args(other_train, None, out, "max_steps=4"))
    assert f"checkpoint {out}/checkpoints/step_00000002" in err and "different tokenizers" in err
    err = run_error(capsys, *args, "max_steps=4", "model.overrides.class_dropout=0.2")
    assert "written for generator 'tiny' (ar)" in err and "class_dropout (0.1 vs 0.2)" in err
    err = run_error(capsys, *args, "max_steps=4", "optim.lr=1e-2")  # the recipe check shared with stage 1
    assert "different recipe: optim.lr" in err and "resume.allow_changes=true" in err
    # Another size is another model, not damage: compared before the weights are verified, even damaged ones.
    weights = out / "checkpoints" / "step_00000002" / "model.safetensors"
    for _ in range(2):
        err = run_error(capsys, *args, "max_steps=4", "model.overrides.width=128")
        assert "written for generator 'tiny' (ar)" in err and "width (64 vs 128)" in err
        weights.write_bytes(weights.read_bytes()[:100])


# ----------------------------------------------------------------------------------------------------------------------
# Help and shipped configs
# ----------------------------------------------------------------------------------------------------------------------


def test_help_lists_everything(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for needle in ("key=value", "--export-only", "--print-config", "--no-progress", "data.num_tokens", "torchrun",
                   "Resuming from step", "exit code 2", "one-class", "export/"):  # fmt: skip
        assert needle in text, needle


CIFAR10_RECIPE = load_config(REPO / "configs" / "cifar10" / "ar.yaml")


@pytest.mark.parametrize(
    "name",
    ["cifar10/ar", "cifar10/mergear", "cifar10/randar", "cifar10/maskgit", "imagenet/ar-l", "imagenet/mergear-l",
     "imagenet/randar-l"],
)  # fmt: skip
def test_shipped_configs_load(name, capsys):
    config = load_config(REPO / "configs" / f"{name}.yaml")
    assert config.optim.betas == (0.9, 0.95) and config.optim.weight_decay == 0.05 and config.grad_clip == 1.0
    assert config.schedule.kind == "cosine" and config.model.kind == name.split("/")[1].removesuffix("-l")
    if name == "imagenet/randar-l":  # the paper's RandAR-L (Table A2): batch 1024, lr 4e-4, 300 epochs, K = 144
        assert (config.model.preset, config.batch_size * config.grad_accum * 8, config.optim.lr) == ("L", 1024, 4e-4)
        assert config.max_steps == 300 * (1_281_167 // 8 // config.batch_size // config.grad_accum)
        assert config.data.num_tokens == [144] and config.model.overrides["label_smoothing"] == 0.1
    elif name.startswith("imagenet"):
        assert (config.model.preset, config.batch_size * config.grad_accum * 8) == ("L", 768)
    if name.startswith("imagenet"):
        assert config.model.overrides["factorized_bits"] == (6, 12) and config.precision == "bf16"
    else:  # every CIFAR-10 generator gets the same size, optimizer, batch and budget
        assert (config.model.preset, config.threads, config.batch_size) == ("tiny", 1, 64)
        same = ("optim", "schedule", "batch_size", "grad_accum", "max_steps", "ema_decay", "precision", "seed")
        assert all(getattr(config, key) == getattr(CIFAR10_RECIPE, key) for key in same)
    assert main([str(REPO / "configs" / f"{name}.yaml"), "--print-config"]) == 0
    assert "distribution: uniform" in capsys.readouterr().out
