"""MergeVQ's generation table at CPU scale: vanilla AR, MaskGIT, ToMe+MaskGIT, MergeAR and RandAR on CIFAR-10.

Every generator is the same size (the ``tiny`` preset), trained with the same recipe and budget (steps × batch) on the
tokens of two tokenizers trained with one recipe: MergeVQ **G** and **G+R** (``configs/cifar10/{g,gr}.yaml``). For each
row the script runs the real commands, in parallel jobs of one thread each:

    mergevq train-generator configs/cifar10/KIND.yaml data.train=... max_steps=... seed=...
    mergevq sample --generator RUN/export --tokenizer TOK --num-per-class N [--num-tokens K] [--steps T] ...
    mergevq evaluate generator --samples RUN/samples/samples.npz --reference REF

Rows that share a trained generator (ToMe+MaskGIT and MaskGIT; RandAR with the fine-tuned Source Recovery and RandAR)
train it once. The fine-tuned row first samples ``--finetune-samples`` images with another seed, runs
``mergevq finetune-recovery`` on them, and samples the evaluation images with the same seed as its base row, so both
rows decode *the same generated codes* and differ only in the Source Recovery.

The speed columns come from a separate, sequential phase (one process at a time, the same machine state for every
row): ``mergevq sample`` of a bounded number of images at batch 1 and at batch 32, end to end (generator, Source
Recovery where used, decoder). Results go to ``benchmarks/results/generation_table.{json,md}``. Finished steps are
reused (the trainer resumes a completed run and only exports), so an interrupted benchmark continues where it stopped.

Run (token files from ``mergevq encode --num-tokens ...``; REF from ``mergevq evaluate generator
--save-reference-stats``):
    .venv/bin/python benchmarks/bench_generation.py \\
        --tokenizer g=runs/tok-g/export --tokenizer gr=runs/tok-gr/export \\
        --tokens g=runs/tokens/g_train.safetensors,runs/tokens/g_test.safetensors \\
        --tokens gr=runs/tokens/gr_train.safetensors,runs/tokens/gr_test.safetensors \\
        --reference runs/fid/cifar10_test5k_stats.npz --steps 600 --batch-size 32 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IS_NOTE = "no offline Inception classifier head (only the pool3 features FID needs ship offline)"


@dataclass(frozen=True)
class Training:
    """One trained generator: a config under configs/cifar10/, the tokenizer whose tokens it learns, overrides."""

    config: str
    tokenizer: str  # "g" | "gr"
    merged: bool = False  # trains at the merge level --num-tokens (MergeAR, RandAR); else at all L positions
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Row:
    name: str
    training: str  # key of TRAININGS
    sample_args: tuple[str, ...] = ()
    finetuned_recovery: bool = False


TRAININGS = {
    "ar": Training("ar.yaml", "gr"),
    "maskgit": Training("maskgit.yaml", "gr"),
    "mergear-g": Training("mergear.yaml", "g", True),
    "mergear-gr": Training("mergear.yaml", "gr", True),
    "randar-g": Training("randar.yaml", "g", True),
    "randar-gr": Training("randar.yaml", "gr", True),
    "randar-gr-1d": Training("randar.yaml", "gr", True, ("model.overrides.rank_layout=1d",)),
}

ROWS = {
    "ar": Row("vanilla AR (raster, L tokens)", "ar"),
    "maskgit": Row("MaskGIT", "maskgit"),
    "tome-maskgit-0.25": Row("ToMe+MaskGIT r=0.25", "maskgit", ("--tome-ratio", "0.25")),
    "tome-maskgit-0.5": Row("ToMe+MaskGIT r=0.5", "maskgit", ("--tome-ratio", "0.5")),
    "mergear-g": Row("MergeVQ (G) + MergeAR", "mergear-g"),
    "mergear-gr": Row("MergeVQ (G+R) + MergeAR", "mergear-gr"),
    "randar-g": Row("MergeVQ (G) + RandAR", "randar-g"),
    "randar-gr": Row("MergeVQ (G+R) + RandAR", "randar-gr"),
    "randar-gr-1d": Row("MergeVQ (G+R) + RandAR, 1-D rank RoPE", "randar-gr-1d"),
    "randar-gr-ft": Row("MergeVQ (G+R) + RandAR, fine-tuned Source Recovery", "randar-gr", (), True),
}


def _run(cmd: list[str], *, log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "a") as handle:
        handle.write(f"$ {' '.join(cmd)}\n")
        handle.flush()
        proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed (exit {proc.returncode}), see {log}: {' '.join(cmd)}")


def _last_val(run: Path) -> dict[str, Any]:
    log = run / "logs" / "train.jsonl"
    last: dict[str, Any] = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            row = json.loads(line)
            if row.get("split") == "val":
                last = row
    return last


MERGEVQ = [sys.executable, "-m", "mergevq"]


def train(key: str, args: argparse.Namespace) -> Path:
    spec = TRAININGS[key]
    run = Path(args.output_root) / key
    run.mkdir(parents=True, exist_ok=True)
    train_tokens, val_tokens = args.tokens[spec.tokenizer]
    cmd = [
        *MERGEVQ, "train-generator", f"configs/cifar10/{spec.config}",
        f"data.train={train_tokens}", f"data.val={val_tokens}", f"max_steps={args.steps}",
        f"batch_size={args.batch_size}", f"seed={args.seed}", f"output_dir={run}",
        f"schedule.warmup_steps={max(1, args.steps // 10)}", f"val_every={args.steps}",
        f"checkpoint_every={max(1, args.steps // 4)}", "threads=1", "--no-progress", *spec.overrides,
    ]  # fmt: skip
    if spec.merged:
        cmd.append(f"data.num_tokens=[{args.num_tokens}]")
    _run(cmd, log=run / "bench.log")
    return run


def _sample(
    row: Row, *, run: Path, tokenizer: str, output: Path, seed: int, args: argparse.Namespace, extra: list[str]
) -> dict[str, Any]:
    if not (output / "summary.json").is_file():
        spec = TRAININGS[row.training]
        cmd = [
            *MERGEVQ, "sample", "--generator", str(run / "export"), "--tokenizer", tokenizer, "--output", str(output),
            "--seed", str(seed), "--cfg", str(args.cfg), "--device", "cpu", *row.sample_args, *extra,
        ]  # fmt: skip
        if spec.merged:
            cmd += ["--num-tokens", str(args.num_tokens)]
        if spec.config == "randar.yaml":
            cmd += ["--steps", str(args.randar_steps)]
        _run(cmd, log=run / "bench.log")
    return json.loads((output / "summary.json").read_text())


def _tokenizer_for(key: str, run: Path, args: argparse.Namespace) -> str:
    """The row's tokenizer; for the fine-tuned row, fine-tune its Source Recovery on the generator's samples first."""
    row = ROWS[key]
    base = args.tokenizer[TRAININGS[row.training].tokenizer]
    if not row.finetuned_recovery:
        return base
    tuned = run / "recovery-finetuned"
    if not (tuned / "finetune.json").is_file():
        ft_samples = run / "samples-for-finetune"
        _sample(
            row, run=run, tokenizer=base, output=ft_samples, seed=args.seed + 1000, args=args,
            extra=["--num-per-class", str(args.finetune_samples // 10), "--batch-size", "100"],
        )  # fmt: skip
        cmd = [
            *MERGEVQ, "finetune-recovery", "--tokenizer", base, "--samples", str(ft_samples / "samples.npz"),
            "--num-tokens", str(args.num_tokens), "--output", str(tuned), "--device", "cpu",
            "--epochs", str(args.finetune_epochs),
        ]  # fmt: skip
        _run(cmd, log=run / "bench.log")
    return str(tuned)


def quality(key: str, args: argparse.Namespace) -> dict[str, Any]:
    row = ROWS[key]
    run = train(row.training, args)
    tokenizer = _tokenizer_for(key, run, args)
    out = run / f"samples-{key}"
    summary = _sample(
        row, run=run, tokenizer=tokenizer, output=out, seed=args.seed, args=args,
        extra=["--num-per-class", str(args.num_samples // 10), "--batch-size", "100"],
    )  # fmt: skip
    result: dict[str, Any] = {"row": key, "run": str(run), "num_samples": summary["num_images"]}
    val = _last_val(run)
    result["val_loss"] = val.get("loss")
    result["distinct_groups"] = summary["distinct_groups"]["mean"]
    if args.no_eval:
        return result
    fid_json = run / f"fid-{key}.json"
    if not fid_json.is_file():
        cmd = [
            *MERGEVQ, "evaluate", "generator", "--samples", str(out / "samples.npz"), "--reference", args.reference,
            "--output", str(fid_json), "--device", "cpu",
        ]  # fmt: skip
        _run(cmd, log=run / "bench.log")
    metrics = json.loads(fid_json.read_text())["metrics"]
    result.update(fid=metrics["fid"], precision=metrics["precision"], recall=metrics["recall"])
    if row.finetuned_recovery:
        result["finetune"] = json.loads((Path(tokenizer) / "finetune.json").read_text())
    return result


def speed(key: str, args: argparse.Namespace) -> dict[str, Any]:
    """Images/s end to end at batch 1 and 32 on a bounded number of images (run sequentially, after quality)."""
    row = ROWS[key]
    run = Path(args.output_root) / row.training
    tokenizer = _tokenizer_for(key, run, args)
    out: dict[str, Any] = {}
    for batch, count in ((1, args.speed_images_b1), (32, args.speed_images_b32)):
        folder = run / f"speed-{key}-b{batch}"
        summary = _sample(
            row, run=run, tokenizer=tokenizer, output=folder, seed=args.seed, args=args,
            extra=["--classes", *map(str, range(count if count < 10 else 10)),
                   "--num-per-class", str(max(1, count // 10)), "--batch-size", str(batch)],
        )  # fmt: skip
        out[f"b{batch}"] = summary["speed"]["end_to_end_images_per_s"]
        out[f"b{batch}_generator"] = summary["speed"]["generator_images_per_s"]
        out["forward_passes"] = summary["speed"]["forward_passes_per_image"]
    config = json.loads((run / "export" / "config.json").read_text())
    out["params"] = _parameter_count(run / "export")
    out["kind"] = config.get("kind")
    return out


def _parameter_count(export: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in export.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safetensors handle is no dict)
                total += math.prod(handle.get_slice(name).get_shape())
    return total


def _fmt(value: Any, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _table(results: dict[str, dict[str, Any]], speeds: dict[str, dict[str, Any]], args) -> list[dict[str, Any]]:
    table = []
    for key, row in ROWS.items():
        if key not in results and key not in speeds:
            continue
        q, s = results.get(key, {}), speeds.get(key, {})
        spec = TRAININGS[row.training]
        table.append(
            {
                "method": row.name,
                "tokens": args.num_tokens if spec.merged else 64,
                "FID": _fmt(q.get("fid"), 1),
                "precision": _fmt(q.get("precision"), 3),
                "recall": _fmt(q.get("recall"), 3),
                "IS": "—",
                "images/s b1": _fmt(s.get("b1"), 2),
                "images/s b32": _fmt(s.get("b32"), 2),
                "passes/image": _fmt(s.get("forward_passes"), 0),
                "params (M)": _fmt(s["params"] / 1e6, 2) if "params" in s else "",
                "train images": f"{args.steps * args.batch_size:,}",
                "val loss": _fmt(q.get("val_loss"), 3),
            }
        )
    return table


def _pairs(values: list[str], *, option: str, split: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for value in values:
        role, sep, rest = value.partition("=")
        if not sep or role not in ("g", "gr"):
            raise SystemExit(f"{option} {value!r}: expected g=... or gr=...")
        out[role] = rest.split(",") if split else rest
        if split and len(out[role]) != 2:
            raise SystemExit(f"{option} {value!r}: expected ROLE=TRAIN_FILE,VAL_FILE")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", action="append", required=True, help="g=DIR and gr=DIR (tokenizer exports)")
    parser.add_argument("--tokens", action="append", required=True, help="g=TRAIN,VAL and gr=TRAIN,VAL token files")
    parser.add_argument("--reference", required=True, help="FID reference (statistics npz or image folder)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-tokens", type=int, default=36, help="K of the MergeAR and RandAR rows")
    parser.add_argument(
        "--randar-steps", type=int, default=16, help="RandAR's passes (the paper: 64 for K = 144, i.e. 0.44 K)"
    )
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per generator (equal budget)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-samples", type=int, default=2000, help="samples per row for FID (balanced classes)")
    parser.add_argument(
        "--finetune-samples", type=int, default=1000, help="generated images for the recovery fine-tune"
    )
    parser.add_argument("--finetune-epochs", type=int, default=5, help="Source Recovery fine-tuning epochs")
    parser.add_argument("--speed-images-b1", type=int, default=10, help="images timed at batch 1")
    parser.add_argument("--speed-images-b32", type=int, default=64, help="images timed at batch 32")
    parser.add_argument("--cfg", type=float, default=1.0, help="guidance scale (1: off)")
    parser.add_argument("--jobs", type=int, default=2, help="quality runs in parallel (one thread each)")
    parser.add_argument("--output-root", default="runs/generation-table")
    parser.add_argument("--no-eval", action="store_true", help="train and sample only")
    parser.add_argument("--no-speed", action="store_true", help="skip the sequential speed phase")
    parser.add_argument("--speed-only", action="store_true", help="only the speed phase (runs must be trained)")
    args = parser.parse_args(argv)
    args.tokenizer = _pairs(args.tokenizer, option="--tokenizer", split=False)
    args.tokens = _pairs(args.tokens, option="--tokens", split=True)
    needed = {TRAININGS[ROWS[r].training].tokenizer for r in args.rows}
    missing = sorted(needed - set(args.tokenizer) | needed - set(args.tokens))
    if missing:
        raise SystemExit(f"rows {args.rows} need --tokenizer and --tokens for {missing}")

    results: dict[str, dict[str, Any]] = {}
    if not args.speed_only:
        # Train every generator first (in parallel), then sample/evaluate each row.
        trainings = sorted({ROWS[r].training for r in args.rows})
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for key, _ in zip(trainings, pool.map(lambda k: train(k, args), trainings), strict=True):
                print(f"{key}: trained", flush=True)
            futures = {key: pool.submit(quality, key, args) for key in args.rows}
            for key, future in futures.items():
                results[key] = future.result()
                fid = results[key].get("fid")
                print(f"{key}: " + ("sampled" if fid is None else f"FID {fid:.2f}"), flush=True)
    speeds: dict[str, dict[str, Any]] = {}
    if not args.no_speed:
        for key in args.rows:
            t0 = time.perf_counter()
            speeds[key] = speed(key, args)
            print(f"{key}: {speeds[key]['b1']:.2f} / {speeds[key]['b32']:.2f} images/s "
                  f"at batch 1 / 32 ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    if args.no_eval and not speeds:
        return 0
    previous = ROOT / "benchmarks" / "results" / "generation_table.json"
    if args.speed_only and previous.is_file():  # keep the quality columns of the earlier run
        results = json.loads(previous.read_text()).get("quality", {})
    table = _table(results, speeds, args)
    ft = results.get("randar-gr-ft", {}).get("finetune")
    notes = f"""
Class-conditional CIFAR-10 (32×32, 10 classes, L = 64 token positions). Every generator is the `tiny` preset (6 blocks,
width 192) trained {args.steps} steps at batch {args.batch_size} ({args.steps * args.batch_size:,} token grids) with
the recipe of its config in configs/cifar10/; seed {args.seed}. Tokens: vanilla AR and MaskGIT use the G+R tokenizer at
K = L = 64 (G's K range never reaches 64), MergeAR and RandAR use K = {args.num_tokens} merged tokens of each tokenizer.
RandAR decodes in {args.randar_steps} passes (the paper: 64 passes for 144 tokens), MaskGIT in its configured 12.
FID / precision / recall (k = 3): {args.num_samples} samples per row against {args.reference}, no guidance
(cfg {args.cfg}), temperature 1, no top-k. IS is empty: {IS_NOTE}.
images/s: `mergevq sample` end to end (generator, Source Recovery where used, tokenizer decoder) on one CPU thread,
{args.speed_images_b1} images at batch 1 and {args.speed_images_b32} at batch 32, rows timed one after another in
one run. passes/image: sequential generator forward passes per batch. params: the generator's.
"""
    if ft:
        notes += (
            f"\nSource Recovery fine-tuning (`mergevq finetune-recovery`, {args.finetune_epochs} epochs on "
            f"{args.finetune_samples} RandAR samples of another seed): held-out recovery accuracy "
            f"{100 * ft['accuracy_before'][str(args.num_tokens)]:.2f}% → "
            f"{100 * ft['accuracy_after'][str(args.num_tokens)]:.2f}%. Both RandAR rows "
            "decode the same generated codes; only the Source Recovery differs.\n"
        )
    notes += (
        f"\nCommand: `{' '.join(['.venv/bin/python', 'benchmarks/bench_generation.py', *(argv or sys.argv[1:])])}`\n"
    )
    write_results(
        "generation_table",
        title="Generation table at CPU scale (CIFAR-10): vanilla AR, MaskGIT, ToMe+MaskGIT, MergeAR, RandAR",
        rows=table,
        columns=list(table[0]) if table else [],
        notes=notes,
        extra={"quality": results, "speed": speeds, "args": {k: v for k, v in vars(args).items()}},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
