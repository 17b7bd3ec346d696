"""Generation quality at CPU scale: vanilla raster AR vs MergeAR on the tokens of one trained tokenizer.

Every generator has the same size (the ``tiny`` preset), recipe and budget (steps × batch); only the kind, the merge
level K and the window differ. For each variant and seed the script runs the real commands, in parallel jobs of one
thread each:

    mergevq train-generator configs/cifar10/{ar,mergear}.yaml data.train=... max_steps=... seed=...
    mergevq sample --generator RUN/export --tokenizer TOK --num-per-class N --num-tokens K --seed S
    mergevq evaluate generator --samples RUN/samples/samples.npz --reference REF

and collects FID, precision/recall, sampling speed, peak KV-cache bytes, distinct groups per image and the final
validation loss into ``benchmarks/results/generation_quality.{json,md}``. Finished runs are reused (the trainer resumes
a completed run and only exports), so an interrupted benchmark continues where it stopped.

Run (tokens from ``mergevq encode --num-tokens 16 32 64``; REF from ``--save-reference-stats``):
    .venv/bin/python benchmarks/bench_generation_quality.py --tokenizer runs/tok-cifar/export \\
        --train-tokens runs/tokens/cifar10_train.safetensors --val-tokens runs/tokens/cifar10_test.safetensors \\
        --reference runs/fid/cifar10_test_stats.npz --steps 1000 --batch-size 32 --seeds 0 1 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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


@dataclass(frozen=True)
class Variant:
    name: str
    config: str  # a file under configs/cifar10/
    num_tokens: int | None  # the merge level (None: all L positions)
    window: int = 0


VARIANTS = {
    "ar": Variant("vanilla AR", "ar.yaml", None),
    "mergear-32": Variant("MergeAR K=L/2", "mergear.yaml", 32),
    "mergear-16": Variant("MergeAR K=L/4", "mergear.yaml", 16),
    "mergear-16-w8": Variant("MergeAR K=L/4, one-row window", "mergear.yaml", 16, window=8),
}


def _run(cmd: list[str], *, log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "a") as handle:
        handle.write(f"$ {' '.join(cmd)}\n")
        handle.flush()
        proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed (exit {proc.returncode}), see {log}: {' '.join(cmd)}")


def _final_val_loss(run: Path) -> float | None:
    log = run / "logs" / "train.jsonl"
    if not log.is_file():
        return None
    last = None
    for line in log.read_text().splitlines():
        row = json.loads(line)
        if row.get("split") == "val":
            last = row
    return None if last is None or "loss" not in last else float(last["loss"])  # summed bit-group CE


def run_one(key: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    variant = VARIANTS[key]
    run = Path(args.output_root) / f"{key}-s{seed}"
    run.mkdir(parents=True, exist_ok=True)
    log = run / "bench.log"
    mergevq = [sys.executable, "-m", "mergevq"]
    train = [
        *mergevq,
        "train-generator",
        f"configs/cifar10/{variant.config}",
        f"data.train={args.train_tokens}",
        f"data.val={args.val_tokens}",
        f"max_steps={args.steps}",
        f"batch_size={args.batch_size}",
        f"seed={seed}",
        f"output_dir={run}",
        f"schedule.warmup_steps={max(1, args.steps // 10)}",
        f"val_every={args.steps}",
        f"checkpoint_every={max(1, args.steps // 4)}",
        "threads=1",
        "--no-progress",
    ]
    if variant.num_tokens is not None:
        train += [f"data.num_tokens=[{variant.num_tokens}]", f"model.overrides.window={variant.window}"]
    t0 = time.perf_counter()
    _run(train, log=log)
    train_seconds = time.perf_counter() - t0

    samples = run / "samples"
    if not (samples / "summary.json").is_file():
        sample = [
            *mergevq,
            "sample",
            "--generator",
            str(run / "export"),
            "--tokenizer",
            args.tokenizer,
            "--output",
            str(samples),
            "--num-per-class",
            str(args.num_samples // 10),
            "--batch-size",
            str(args.sample_batch),
            "--seed",
            str(seed),
            "--cfg",
            str(args.cfg),
            "--device",
            "cpu",
        ]
        if variant.num_tokens is not None:
            sample += ["--num-tokens", str(variant.num_tokens)]
        _run(sample, log=log)
    summary = json.loads((samples / "summary.json").read_text())

    fid_json = run / "fid.json"
    if args.no_eval:
        return {"variant": key, "seed": seed}
    if not fid_json.is_file():
        evaluate = [
            *mergevq,
            "evaluate",
            "generator",
            "--samples",
            str(samples / "samples.npz"),
            "--reference",
            args.reference,
            "--output",
            str(fid_json),
            "--device",
            "cpu",
        ]
        _run(evaluate, log=log)
    metrics = json.loads(fid_json.read_text())["metrics"]
    return {
        "variant": key,
        "seed": seed,
        "fid": metrics["fid"],
        "precision": metrics["precision"],
        "recall": metrics["recall"],
        "val_loss": _final_val_loss(run),
        "images_per_s": summary["speed"]["generator_images_per_s"],
        "peak_cache_mib": summary["peak_cache_bytes"] / 2**20,
        "distinct_groups": summary["distinct_groups"]["mean"],
        "requested_k": summary["distinct_groups"]["requested"],
        "num_samples": summary["num_images"],
        "train_seconds": train_seconds,
    }


def _aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = []
    for key, variant in VARIANTS.items():
        mine = [r for r in rows if r["variant"] == key]
        if not mine:
            continue

        def stat(field: str, digits: int = 2, mine: list[dict[str, Any]] = mine) -> str:
            values = [r[field] for r in mine if r[field] is not None]
            if not values:
                return ""
            mean = statistics.fmean(values)
            if len(values) == 1:
                return f"{mean:.{digits}f}"
            return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"

        table.append(
            {
                "generator": variant.name,
                "K": variant.num_tokens or 64,
                "window": variant.window,
                "seeds": len(mine),
                "FID": stat("fid", 1),
                "precision": stat("precision", 3),
                "recall": stat("recall", 3),
                "val CE": stat("val_loss", 3),
                "distinct groups": stat("distinct_groups", 1),
                "peak KV MiB": stat("peak_cache_mib", 3),
                "images/s": stat("images_per_s", 1),
            }
        )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="the tokenizer's export directory")
    parser.add_argument("--train-tokens", required=True, help="token file with K = 16, 32 and 64 (train split)")
    parser.add_argument("--val-tokens", required=True, help="token file of the held-out split")
    parser.add_argument("--reference", required=True, help="FID reference (statistics npz or image folder)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--single-seed-variants",
        nargs="*",
        default=[],
        choices=list(VARIANTS),
        help="variants run with the first seed only (ablations that need less than the main rows)",
    )
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps per generator (equal budget)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-samples", type=int, default=2000, help="samples per generator (balanced classes)")
    parser.add_argument("--sample-batch", type=int, default=100)
    parser.add_argument("--cfg", type=float, default=1.0, help="guidance scale (1: off, as the paper's AR rows)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    parser.add_argument("--output-root", default="runs/generation-quality")
    parser.add_argument(
        "--no-eval",
        action="store_true",
        help="train and sample only (a later run without it evaluates, reusing everything else)",
    )
    args = parser.parse_args(argv)

    jobs = [
        (key, seed)
        for seed in args.seeds
        for key in args.variants
        if seed == args.seeds[0] or key not in args.single_seed_variants
    ]
    rows: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, key, seed, args): (key, seed) for key, seed in jobs}
        for future in futures:
            key, seed = futures[future]
            row = future.result()
            print(f"{key} seed {seed}: " + ("trained and sampled" if args.no_eval else f"FID {row['fid']:.2f}"))
            rows.append(row)
    if args.no_eval:
        return 0
    table = _aggregate(rows)
    notes = f"""
Class-conditional CIFAR-10 (32×32) on the tokens of one tiny-32 tokenizer ({args.tokenizer}); every generator is the
`tiny` preset (6 layers, width 192, 18-bit codes as 6 + 12 bit groups) trained {args.steps} steps at batch
{args.batch_size} with the same recipe; seeds {args.seeds} (mean ± standard deviation). FID and precision/recall
(k = 3) on {args.num_samples} samples per generator against {args.reference}, no guidance (cfg {args.cfg}), top-k 0,
temperature 1. images/s: the generator alone on the CPU, one thread, batch {args.sample_batch}, with the KV cache.
"distinct groups" is the mean number of distinct codes in a sampled grid (MergeAR is asked for K). These are small
models on a small budget: the absolute numbers are not ImageNet numbers, only the comparison at equal budget is.

Command: `{" ".join([".venv/bin/python", "benchmarks/bench_generation_quality.py", *(argv or sys.argv[1:])])}`
"""
    columns = list(table[0]) if table else []
    write_results(
        "generation_quality",
        title="Generation quality at equal budget: vanilla AR vs MergeAR (CIFAR-10, CPU scale)",
        rows=table,
        columns=columns,
        notes=notes,
        extra={"runs": rows, "args": vars(args)},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
