"""The CIFAR-10 CPU recipe, end to end: train it, evaluate it on held-out images, draw its learning curve.

One command reproduces the trained tokenizer and every figure of its results section:

    python benchmarks/bench_recipe.py                       # configs/cifar10/gr.yaml, 1,000 test images
    python benchmarks/bench_recipe.py --overrides threads=2 # use both cores of a 2-core machine

Steps:

1. ``mergevq train-tokenizer CONFIG output_dir=WORK/train ...`` (a rerun resumes from the newest checkpoint, and a
   finished run is reused);
2. ``mergevq evaluate tokenizer`` of the exported EMA weights at K ∈ {L, ..., L/4} on ``--eval-images`` test images
   (PSNR, SSIM, LPIPS, codebook usage and perplexity);
3. the learning curve: validation PSNR per K (the trainer's fixed held-out batch, EMA weights) against training
   images seen, read from ``train.jsonl``, drawn to ``docs/figures/<name>_learning_curve.png``.

The result (``benchmarks/results/<name>.json`` / ``.md``) states the targets (≥ 22 dB at K = L, ≥ 18 dB at K = 16,
LPIPS well below 0.34) and whether they are met.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MALLOC_ENV, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"
TARGETS = {"psnr_full": 22.0, "psnr_quarter": 18.0, "lpips_before": 0.34}


def _mergevq(*args: str) -> list[str]:
    return [sys.executable, "-m", "mergevq", *args]


def _display(path: Path) -> str:
    """A path as the result files show it: relative to the repository, never a machine path."""
    return os.path.relpath(Path(path).resolve(), ROOT)


def read_log(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``train.jsonl`` (a resumed run repeats steps: the last row of each (split, step) wins)."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[(row.get("split", ""), int(row["step"]))] = row
    return [rows[key] for key in sorted(rows, key=lambda key: (key[1], key[0]))]


def learning_curve(rows: list[dict[str, Any]], *, images_per_step: int) -> dict[int, list[tuple[int, float]]]:
    """K → [(training images seen, validation PSNR)] from the trainer's ``val`` rows."""
    curve: dict[int, list[tuple[int, float]]] = {}
    for row in rows:
        if row.get("split") != "val":
            continue
        for key, value in row.items():
            if key.startswith("psnr_k"):
                curve.setdefault(int(key[len("psnr_k") :]), []).append((row["step"] * images_per_step, float(value)))
    return curve


def training_seconds(rows: list[dict[str, Any]], *, images_per_step: int, log_every: int) -> float:
    """Optimizer time from the logged throughput (validation and checkpoints excluded)."""
    return sum(log_every * images_per_step / row["images_per_s"] for row in rows if row.get("images_per_s"))


def verdict(results: dict[int, dict[str, Any]], *, full: int, quarter: int) -> str:
    psnr_full, psnr_quarter = results[full]["psnr"], results[quarter]["psnr"]
    lpips_full = results[full]["lpips"]
    checks = [
        f"PSNR {psnr_full:.2f} dB at K = L = {full} (target ≥ {TARGETS['psnr_full']:g}: "
        f"{'met' if psnr_full >= TARGETS['psnr_full'] else 'missed'})",
        f"{psnr_quarter:.2f} dB at K = {quarter} (target ≥ {TARGETS['psnr_quarter']:g}: "
        f"{'met' if psnr_quarter >= TARGETS['psnr_quarter'] else 'missed'})",
        f"LPIPS {lpips_full:.3f} at K = L (earlier recipe 0.34: {'lower' if lpips_full < 0.34 else 'not lower'})",
    ]
    return "; ".join(checks) + "."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "cifar10" / "gr.yaml", help="recipe YAML")
    parser.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE", help="passed to train-tokenizer")
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("MERGEVQ_CIFAR10", ROOT.parent / "shared" / "data" / "cifar10")),
        help="CIFAR-10 folder with train/ and test/ (default: $MERGEVQ_CIFAR10)",
    )
    parser.add_argument("--eval-images", type=int, default=1000, help="test images for the final evaluation")
    parser.add_argument("--num-tokens", type=int, nargs="+", default=[64, 36, 16], help="K values evaluated")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "recipe", help="training and eval outputs")
    parser.add_argument("--name", default="recipe_cifar10", help="result and figure name")
    parser.add_argument("--eval-only", action="store_true", help="do not train: evaluate the existing export")
    args = parser.parse_args(argv)
    for key, folder in (("train", args.data / "train"), ("test", args.data / "test")):
        if not folder.is_dir():
            parser.error(f"--data: no {key} folder at {folder}")

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "train"
    overrides = [
        f"data.train={args.data / 'train'}",
        f"data.val={args.data / 'test'}",
        f"output_dir={run_dir}",
        *args.overrides,
    ]
    env = {**os.environ, **MALLOC_ENV, "OMP_WAIT_POLICY": "PASSIVE"}
    resolved = subprocess.run(
        _mergevq("train-tokenizer", str(args.config), *overrides, "--print-config"),
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    config = yaml.safe_load(resolved)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    images_per_step = config["batch_size"] * config["grad_accum"] * world
    export = run_dir / "export"

    wall = None
    if not args.eval_only:
        print(f"training {args.config.name} for {config['max_steps']} steps into {run_dir}", flush=True)
        t0 = time.perf_counter()
        subprocess.run(_mergevq("train-tokenizer", str(args.config), *overrides), cwd=ROOT, env=env, check=True)
        wall = time.perf_counter() - t0
    if not (export / "config.json").is_file():
        print(f"bench_recipe: error: no exported tokenizer at {export}", file=sys.stderr)
        return 2

    eval_json = work / "eval.json"
    print(f"evaluating {export} on {args.eval_images} test images at K = {args.num_tokens}", flush=True)
    subprocess.run(
        _mergevq(
            "evaluate",
            "tokenizer",
            "--model",
            str(export),
            "--data",
            str(args.data / "test"),
            "--num-tokens",
            *map(str, args.num_tokens),
            "--max-images",
            str(args.eval_images),
            "--no-fid",
            "--output",
            str(eval_json),
        ),
        cwd=ROOT,
        env=env,
        check=True,
    )
    evaluation = json.loads(eval_json.read_text())
    results = {int(r["num_tokens"]): r for r in evaluation["results"]}

    log_rows = read_log(run_dir / "logs" / "train.jsonl")
    curve = learning_curve(log_rows, images_per_step=images_per_step)
    seconds = training_seconds(log_rows, images_per_step=images_per_step, log_every=config["log_every"])
    last_step = max((int(r["step"]) for r in log_rows), default=0)

    from mergevq.eval.plots import line_plot

    figure = line_plot(
        FIGURES / f"{args.name}_learning_curve.png",
        title="CIFAR-10 recipe: validation PSNR (EMA weights) vs training images",
        x_label="training images seen",
        y_label="PSNR (dB)",
        series={f"K = {k}": points for k, points in sorted(curve.items(), reverse=True)},
        x_ticks="auto",
        markers=False,
    )

    full, quarter = max(results), min(results)
    rows = [
        {
            "K": k,
            "PSNR": r["psnr"],
            "SSIM": r["ssim"],
            "LPIPS": r["lpips"],
            "usage": r["codebook_usage"],
            "codes used": r["codebook_used_codes"],
            "perplexity": r["codebook_perplexity"],
        }
        for k, r in sorted(results.items(), reverse=True)
    ]
    command = "python benchmarks/bench_recipe.py" + "".join(
        f" --{flag} {value}"
        for flag, value in (
            ("config", _display(args.config)),
            ("eval-images", args.eval_images),
            ("name", args.name),
        )
    )
    if args.overrides:
        command += " --overrides " + " ".join(args.overrides)
    notes = (
        f"{verdict(results, full=full, quarter=quarter)}\n\n"
        f"Trained {last_step} steps × {images_per_step} images = {last_step * images_per_step:,} images "
        f"({seconds / 60:.0f} min of optimizer time from the logged throughput"
        + (f", {wall / 60:.0f} min wall time including validation and checkpoints" if wall else "")
        + f"), evaluated on {args.eval_images} CIFAR-10 test images with the EMA weights. "
        f"Learning curve: `{_display(figure)}` "
        f"(validation batch of {config['data']['val_images']} test images).\n\n"
        f"Reproduce: `{command}`"
    )
    config["data"].update(train=_display(Path(config["data"]["train"])), val=_display(Path(config["data"]["val"])))
    config["output_dir"] = _display(Path(config["output_dir"]))
    write_results(
        args.name,
        title=f"CIFAR-10 CPU recipe ({_display(args.config)}): reconstruction on {args.eval_images} test images",
        rows=rows,
        columns=["K", "PSNR", "SSIM", "LPIPS", "usage", "codes used", "perplexity"],
        notes=notes,
        extra={
            "config": config,
            "steps": last_step,
            "images_seen": last_step * images_per_step,
            "optimizer_minutes": seconds / 60,
            "wall_minutes": None if wall is None else wall / 60,
            "learning_curve": {str(k): v for k, v in curve.items()},
            "targets": TARGETS,
            "figure": _display(figure),
            "command": command,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
