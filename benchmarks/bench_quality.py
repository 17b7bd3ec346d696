"""Do K content-adaptively merged tokens keep more than a grid of K tokens? Seeded comparison at equal training images.

Four tokenizers are trained with the same recipe (``configs/cifar10/gr.yaml``, ``tiny-32``: L = 64 tokens on an 8×8
grid of 32×32 CIFAR-10 images), the same number of optimizer steps and the same batch size, each with several seeds:

* ``merged`` — MergeVQ as in the base config: ToMe merging, K sampled every step; evaluated at K ∈ {16, 36, 64};
* ``grid``   — the same architecture and code path with ``merge_policy=grid`` (fixed square blocks instead of ToMe
  matching); only K = (8/b)² tiles the grid, so it trains with K drawn from {16, 64} and is evaluated at both;
* ``coarse`` — a separate 4×4-grid model (one more downsampling), 16 tokens every step, no merging; K = 16;
* ``full``   — K = L = 64 every step, no merging; K = 64.

Optional runs (``--runs``): ``merged-resplit`` and ``merged-window`` (ToMe under the authors' alternation and under
the 2-D window split) and ``merged-noalign`` (no representation alignment).

Each run × seed is evaluated on ``--eval-images`` CIFAR-10 test images (PSNR, SSIM, LPIPS, codebook usage); the
ToMe runs also get merge diagnostics (``mergevq.tokenizer.merge_stats``) at K = 16 and 36. The result table has one
row per (model, K) with the mean over seeds and its min/max; the notes give the verdict at K = 16.

    python benchmarks/bench_quality.py                                  # 4 runs × 2 seeds × 1500 steps of 32
    python benchmarks/bench_quality.py --runs merged merged-resplit merged-window --name quality_split
    python benchmarks/bench_quality.py --overrides loss.perceptual_weight=0.7 --work-dir runs/quality-p07

At the defaults that is 8 trainings of 48,000 images each; at the ~8 images/s of one single-threaded tiny-32 run on
a 2-core CPU, expect roughly 6–7 hours with ``--jobs 2`` (an estimate, not a measurement of this script).

Training runs are reused: a run whose export was made by the same recipe and step count is not trained again, and an
interrupted one resumes from its newest checkpoint (run the same command again). ``--jobs`` trainings run at once,
one thread each, so that concurrent runs share the machine equally.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergevq.train import config_io

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MALLOC_ENV, markdown_table, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "cifar10" / "gr.yaml"
FIGURES_DIR = ROOT / "docs" / "figures"

DEFAULT_RUNS = ("merged", "grid", "coarse", "full")
VERDICT_K = 16  # L/4: where merging has the most to gain over a fixed grid
DIAG_K = (16, 36)
DIAG_IMAGES = 256
DONE_MARKER = "bench_done.json"


@dataclass(frozen=True)
class RunSpec:
    """One tokenizer of the comparison, as a change of the base config."""

    description: str
    settings: Mapping[str, Any] = field(default_factory=dict)  # dotted keys, merged over the base config
    merge: Mapping[str, Any] | None = None  # replaces the whole merge section (base: Gaussian over {16..64})
    eval_k: tuple[int, ...] = (16, 36, 64)
    grid_tokens: int = 64  # L
    diagnostics: bool = False  # ToMe merging: merge statistics are meaningful


RUNS: dict[str, RunSpec] = {
    "merged": RunSpec("MergeVQ: ToMe merging, K sampled from {16..64}", diagnostics=True),
    "grid": RunSpec(
        "same model, fixed square blocks instead of ToMe matching, K sampled from {16, 64}",
        # K0 = 36 does not tile the 8×8 grid; 16 does.
        settings={"model.overrides.merge_policy": "grid", "model.overrides.default_num_tokens": 16},
        merge={"distribution": "uniform", "candidates": [16, 64]},
        eval_k=(16, 64),
    ),
    "coarse": RunSpec(
        "4×4 grid (one more downsampling), 16 tokens, no merging",
        settings={
            "model.overrides.channel_mult": [1, 2, 4, 4],
            "model.overrides.learned_recovery": False,
            "model.overrides.default_num_tokens": 16,
        },
        merge={"distribution": "fixed", "fixed": 16},
        eval_k=(16,),
        grid_tokens=16,
    ),
    "full": RunSpec(
        "8×8 grid, K = L = 64 every step, no merging",
        settings={"model.overrides.learned_recovery": False, "model.overrides.default_num_tokens": 64},
        merge={"distribution": "fixed", "fixed": 64},
        eval_k=(64,),
    ),
    "merged-resplit": RunSpec(
        "as merged, authors' A/B alternation (merge_split=resplit)",
        settings={"model.overrides.merge_split": "resplit"},
        diagnostics=True,
    ),
    "merged-window": RunSpec(
        "as merged, 2-D window split (merge_split=window)",
        settings={"model.overrides.merge_split": "window"},
        diagnostics=True,
    ),
    "merged-noalign": RunSpec(
        "as merged, no representation alignment (alignment.kind=none)",
        settings={"alignment.kind": "none"},
        diagnostics=True,
    ),
}


# ----------------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------------


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["loss.perceptual_weight=0.7"]`` → ``{"loss.perceptual_weight": 0.7}`` (values parsed as YAML, as the
    trainer's own command line does)."""
    return dict(config_io.parse_overrides(list(items)))


def run_dir(*, work_dir: Path, run: str, seed: int) -> Path:
    return work_dir / f"{run}-s{seed}"


def build_config(
    *,
    run: str,
    seed: int,
    steps: int,
    batch_size: int,
    base: Mapping[str, Any],
    data: Path,
    work_dir: Path,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The full training config of one run and seed: base config < run's changes < budget < ``overrides``."""
    spec = RUNS[run]
    cfg = copy.deepcopy(dict(base))
    if spec.merge is not None:
        cfg["merge"] = dict(spec.merge)
    cfg = config_io.deep_merge(cfg, config_io.nest(dict(spec.settings)))
    budget = {
        "seed": seed,
        "max_steps": steps,
        "batch_size": batch_size,
        "grad_accum": 1,  # equal images per step
        "output_dir": str(run_dir(work_dir=work_dir, run=run, seed=seed)),
        "threads": 1,
        "checkpoint_every": 250,  # resume point if interrupted
        "keep_last": 2,
        "log_every": 25,
        "data.train": str(data / "train"),
        "data.val": None,  # evaluated afterwards on the test set
        "data.num_workers": 1,
    }
    cfg = config_io.deep_merge(cfg, config_io.nest(budget))
    # Last, so that the recipe can be adjusted from the command line (they apply to every run alike).
    cfg = config_io.deep_merge(cfg, config_io.nest(dict(overrides or {})))
    return copy.deepcopy(cfg)  # nothing shared with RUNS or the base


def training_k_distribution(config_path: Path) -> dict[int, float]:
    """The K → probability the trainer will sample from (read through the trainer's own config loader)."""
    from mergevq.tokenizer.config import get_preset
    from mergevq.train.merge_sampling import MergeCountSampler
    from mergevq.train.recipe import load_config

    config = load_config(config_path)
    model = get_preset(config.model.preset, **config.model.overrides)
    sampler = MergeCountSampler(
        config=config.merge,
        num_tokens_full=model.num_tokens_full,
        default_num_tokens=model.default_num_tokens,
        seed=config.seed,
    )
    return dict(zip(sampler.candidates, sampler.probabilities))


def _recipe_key(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What must match for a finished run to be reused (data paths may move between machines)."""
    key = copy.deepcopy(dict(cfg))
    key.pop("output_dir", None)
    key.get("data", {}).pop("train", None)
    return key


def is_done(*, out: Path, cfg: Mapping[str, Any]) -> bool:
    marker = out / DONE_MARKER
    if not (out / "export").is_dir() or not marker.is_file():
        return False
    return json.loads(marker.read_text()).get("recipe") == json.loads(json.dumps(_recipe_key(cfg)))


def newest_checkpoint(out: Path) -> int:
    steps = [
        int(m.group(1)) for p in (out / "checkpoints").glob("step_*") if (m := re.fullmatch(r"step_(\d+)", p.name))
    ]
    return max(steps, default=0)


# ----------------------------------------------------------------------------------------------------------------------
# Job queue
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Job:
    label: str
    command: list[str]
    log: Path
    on_success: Callable[[float], None] | None = None  # called with the wall time in seconds


def _clock(start: float) -> str:
    return f"[{(time.monotonic() - start) / 60:6.1f} min]"


def run_jobs(
    jobs: Sequence[Job], *, parallel: int, env: Mapping[str, str], start: float, poll_s: float = 1.0
) -> list[str]:
    """Run ``jobs`` with at most ``parallel`` alive at once; returns the labels of those that failed.

    After a failure no new job starts (the others finish), so a broken recipe does not burn the whole budget.
    """
    queue = list(jobs)
    alive: list[tuple[Job, subprocess.Popen, Any, float]] = []
    failed: list[str] = []
    try:
        while queue or alive:
            while queue and len(alive) < parallel and not failed:
                job = queue.pop(0)
                job.log.parent.mkdir(parents=True, exist_ok=True)
                log = open(job.log, "a")  # noqa: SIM115 - closed when the job ends; appended: a resume keeps the history
                log.write(f"$ {shlex.join(job.command)}\n")
                log.flush()
                # Own session: a Ctrl-C reaches only the driver, which then stops each job with one SIGTERM (a
                # trainer saves a checkpoint on the first signal and aborts on a second).
                proc = subprocess.Popen(
                    job.command,
                    cwd=ROOT,
                    env=dict(env),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                alive.append((job, proc, log, time.monotonic()))
                print(f"{_clock(start)} started {job.label} ({len(alive)} running, {len(queue)} queued)", flush=True)
            if failed and not alive:
                break
            time.sleep(poll_s)
            for entry in list(alive):
                job, proc, log, t0 = entry
                if proc.poll() is None:
                    continue
                alive.remove(entry)
                log.close()
                wall = time.monotonic() - t0
                if proc.returncode == 0:
                    print(f"{_clock(start)} finished {job.label} in {wall / 60:.1f} min", flush=True)
                    if job.on_success is not None:
                        job.on_success(wall)
                else:
                    tail = "\n".join(job.log.read_text(errors="replace").splitlines()[-15:])
                    print(
                        f"{_clock(start)} FAILED {job.label} (exit {proc.returncode}); log {job.log}:\n{tail}",
                        flush=True,
                    )
                    failed.append(job.label)
    except BaseException:
        # Interrupted driver: SIGTERM makes the trainers checkpoint and exit, so the same command resumes them.
        for job, proc, _log, _ in alive:
            proc.terminate()
            print(f"{_clock(start)} stopping {job.label}", flush=True)
        for _, proc, log, _ in alive:
            proc.wait(timeout=600)
            log.close()
        raise
    return failed


def _mergevq(*args: str) -> list[str]:
    return [sys.executable, "-m", "mergevq", *args]


# ----------------------------------------------------------------------------------------------------------------------
# Aggregation and verdict
# ----------------------------------------------------------------------------------------------------------------------


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def aggregate(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per-seed results (model, seed, K, psnr, ssim, lpips, usage, steps, batch_size, grid_tokens) → one row per
    (model, K): means over seeds, PSNR min / max / sample std, in the order the models first appear and K ascending."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["model"], int(r["K"])), []).append(r)
    order = list(dict.fromkeys(r["model"] for r in results))
    rows = []
    for model, k in sorted(groups, key=lambda mk: (order.index(mk[0]), mk[1])):
        group = sorted(groups[(model, k)], key=lambda r: r["seed"])
        psnr = [float(r["psnr"]) for r in group]
        steps = {int(r["steps"]) for r in group}
        batch = {int(r["batch_size"]) for r in group}
        if len(steps) != 1 or len(batch) != 1:
            raise ValueError(f"{model} K={k}: seeds trained with different budgets (steps {steps}, batch {batch})")
        (n_steps,), (n_batch,) = steps, batch
        rows.append(
            {
                "model": model,
                "grid tokens L": group[0]["grid_tokens"],
                "K": k,
                "PSNR": statistics.fmean(psnr),
                "PSNR min": min(psnr),
                "PSNR max": max(psnr),
                "PSNR sd": statistics.stdev(psnr) if len(psnr) > 1 else 0.0,
                "SSIM": _mean([r["ssim"] for r in group]),
                "LPIPS": _mean([r.get("lpips") for r in group]),
                "usage": _mean([r.get("usage") for r in group]),
                "seeds": len(group),
                "steps": n_steps,
                "batch": n_batch,
                "train images": n_steps * n_batch,
            }
        )
    return rows


def _range(row: Mapping[str, Any]) -> str:
    return f"{row['PSNR']:.2f} dB (seeds {row['PSNR min']:.2f}–{row['PSNR max']:.2f})"


def _beyond_spread(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """The seed ranges of ``a`` and ``b`` do not overlap (needs two or more seeds on both sides)."""
    if a["seeds"] < 2 or b["seeds"] < 2:
        return False
    return a["PSNR min"] > b["PSNR max"] or b["PSNR min"] > a["PSNR max"]


def _compare(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """``a`` vs ``b`` in PSNR, whether the gap is beyond the seed spread, and whether LPIPS points the same way."""
    diff = a["PSNR"] - b["PSNR"]
    if a["seeds"] < 2 or b["seeds"] < 2:
        spread = "one seed only, no spread to compare with"
    elif _beyond_spread(a, b):
        spread = "beyond the seed spread (the seed ranges do not overlap)"
    else:
        spread = "within the seed spread (the seed ranges overlap)"
    lpips = ""
    if a.get("LPIPS") is not None and b.get("LPIPS") is not None:
        agrees = (a["LPIPS"] < b["LPIPS"]) == (diff > 0)
        lpips = f"; LPIPS (lower is better) {a['LPIPS']:.3f} vs {b['LPIPS']:.3f} {'agrees' if agrees else 'disagrees'}"
    return f"{a['model']} − {b['model']} = {diff:+.2f} dB, {spread}{lpips}"


def verdict(rows: Sequence[Mapping[str, Any]], *, k: int = VERDICT_K) -> str:
    """The answer at K = ``k``: merged vs grid vs coarse, whichever way it falls, against the seed spread."""
    at_k = {r["model"]: r for r in rows if r["K"] == k and r["model"] in ("merged", "grid", "coarse")}
    if "merged" not in at_k or len(at_k) < 2:
        return f"No verdict at K = {k}: it needs the merged model and at least one of grid / coarse."
    merged = at_k["merged"]
    others = [at_k[m] for m in ("grid", "coarse") if m in at_k]
    wins = [o["model"] for o in others if merged["PSNR"] > o["PSNR"]]
    losses = [o["model"] for o in others if o["model"] not in wins]
    resolved = [o["model"] for o in others if _beyond_spread(merged, o)]
    if not losses:
        outcome = (
            f"the merged tokens keep more than {' and '.join(wins)} with the same {k} tokens: the paper's claim holds"
        )
    elif not wins:
        outcome = (
            f"the merged tokens keep less than {' and '.join(losses)} with the same {k} tokens: the paper's claim "
            "does not hold"
        )
    else:
        outcome = (
            f"the merged tokens keep more than {' and '.join(wins)} but less than {' and '.join(losses)} with the "
            f"same {k} tokens: the paper's claim holds only in part"
        )
    if len(resolved) == len(others):
        certainty = "every gap is beyond the seed spread"
    elif resolved:
        certainty = f"only the gap to {' and '.join(resolved)} is beyond the seed spread"
    else:
        certainty = "no gap is beyond the seed spread, so these seeds do not separate the models"
    ranked = sorted(at_k.values(), key=lambda r: r["PSNR"], reverse=True)
    lines = [
        f"**Verdict at K = {k}:** {outcome} at this scale and budget; {certainty}.",
        "",
        f"PSNR at K = {k} (mean over seeds, range over seeds): "
        + ", ".join(f"{r['model']} {_range(r)}" for r in ranked)
        + ".",
        "",
        *(f"- {_compare(merged, other)}." for other in others),
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------------


def eval_path(*, out: Path, ks: Sequence[int], images: int) -> Path:
    return out / f"eval-n{images}-k{'-'.join(map(str, ks))}.json"


def eval_is_fresh(path: Path, *, out: Path) -> bool:
    """An evaluation is reused only when it was made after the export it measures."""
    marker = out / DONE_MARKER
    return path.is_file() and marker.is_file() and path.stat().st_mtime >= marker.stat().st_mtime


def load_test_images(test_dir: Path, *, count: int, size: int = 32):
    """``[N, 3, size, size]`` in [-1, 1]: an evenly strided subset, as the evaluate command takes it."""
    import torch

    from mergevq.data.images import ImageDataset
    from mergevq.data.transforms import eval_transform

    dataset = ImageDataset(test_dir, transform=eval_transform(size), max_images=count)
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


def merge_diagnostics(export: Path, *, images, ks: Sequence[int] = DIAG_K) -> dict[int, dict[str, float]]:
    """Merge statistics of a trained tokenizer on ``images`` at each K (group sizes, row confinement, and whether
    large groups sit on uniform regions)."""
    import torch

    from mergevq import MergeVQ
    from mergevq.tokenizer.merge_stats import merge_stats

    model = MergeVQ.from_pretrained(export).eval()
    out = {}
    with torch.inference_mode():
        for k in ks:
            encoded = model.encode(images, num_tokens=k)
            stats = merge_stats(assignment=encoded.assignment, grid=encoded.grid, images=images)
            out[k] = {
                "row_share_multi": stats.row_share_multi,
                "size_variance_corr": stats.size_variance_corr,
                "image_corr": stats.image_corr,
                "mean_size": stats.mean_size,
                "max_size": float(stats.max_size),
            }
    return out


def _diag_rows(diags: Mapping[str, Mapping[int, Mapping[int, Mapping[str, float]]]]) -> list[dict[str, Any]]:
    """run → seed → K → stats  →  one row per (run, K): means over seeds (max size: the largest)."""
    rows = []
    for run, by_seed in diags.items():
        for k in sorted({k for per_k in by_seed.values() for k in per_k}):
            stats = [per_k[k] for per_k in by_seed.values() if k in per_k]

            def mean(key: str, stats=stats) -> float:
                vals = [s[key] for s in stats if not math.isnan(s[key])]
                return statistics.fmean(vals) if vals else math.nan

            rows.append(
                {
                    "model": run,
                    "K": k,
                    "row_share_multi": mean("row_share_multi"),
                    "size_variance_corr": mean("size_variance_corr"),
                    "image_corr": mean("image_corr"),
                    "mean size": mean("mean_size"),
                    "max size": int(max(s["max_size"] for s in stats)),
                    "seeds": len(stats),
                }
            )
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Figure
# ----------------------------------------------------------------------------------------------------------------------


def plot_psnr_vs_k(rows: Sequence[Mapping[str, Any]], *, path: Path, title: str) -> Path:
    """PSNR vs K per model, error bars = min/max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    models = list(dict.fromkeys(r["model"] for r in rows))
    for i, model in enumerate(models):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["K"])
        shift = (i - (len(models) - 1) / 2) * 0.8  # side by side, so that error bars at the same K stay apart
        ks = [r["K"] + shift for r in mine]
        mean = [r["PSNR"] for r in mine]
        err = [[r["PSNR"] - r["PSNR min"] for r in mine], [r["PSNR max"] - r["PSNR"] for r in mine]]
        ax.errorbar(ks, mean, yerr=err, marker="o", capsize=4, label=f"{model} (L={mine[0]['grid tokens L']})")
    ax.set_xticks(sorted({r["K"] for r in rows}))
    ax.set_xlabel("tokens K")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------------


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def reproduce_command(args: argparse.Namespace) -> str:
    parts = ["python", "benchmarks/bench_quality.py", "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    parts += ["--seeds", *map(str, args.seeds), "--runs", *args.runs, "--eval-images", str(args.eval_images)]
    if args.base_config.resolve() != BASE_CONFIG:
        parts += ["--base-config", _rel(args.base_config)]
    if args.overrides:
        parts += ["--overrides", *args.overrides]
    if args.name != "quality":
        parts += ["--name", args.name]
    return shlex.join(parts)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-config", type=Path, default=BASE_CONFIG, help="recipe every run starts from")
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps per run (equal for all)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step (equal for all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="at least two")
    parser.add_argument(
        "--runs",
        nargs="+",
        default=list(DEFAULT_RUNS),
        choices=list(RUNS),
        metavar="RUN",
        help=f"any of {', '.join(RUNS)} (default: {' '.join(DEFAULT_RUNS)})",
    )
    parser.add_argument("--jobs", type=int, default=2, help="training processes at once (one thread each)")
    parser.add_argument("--eval-images", type=int, default=1000, help="CIFAR-10 test images per evaluation")
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("MERGEVQ_CIFAR10", ROOT.parent / "shared/data/cifar10")),
        help="CIFAR-10 ImageFolder with train/ and test/ (default: $MERGEVQ_CIFAR10, else ../shared/data/cifar10)",
    )
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "quality", help="runs, configs and logs")
    parser.add_argument(
        "--overrides", nargs="*", default=[], metavar="KEY=VALUE", help="config changes applied to every run"
    )
    parser.add_argument("--name", default="quality", help="results/<name>.{json,md}, figure <name>_psnr_vs_k.png")
    args = parser.parse_args(argv)
    args.seeds = list(dict.fromkeys(args.seeds))
    args.runs = list(dict.fromkeys(args.runs))
    if len(args.seeds) < 2:
        parser.error("--seeds needs at least two seeds (the spread over seeds is part of the answer)")
    if args.steps < 1 or args.batch_size < 1 or args.jobs < 1 or args.eval_images < 1:
        parser.error("--steps, --batch-size, --jobs and --eval-images must be positive")
    try:
        args.override_values = parse_overrides(args.overrides)
    except config_io.ConfigError as e:
        parser.error(str(e))
    return args


COLUMNS = ["model", "grid tokens L", "K", "PSNR", "PSNR min", "PSNR max", "PSNR sd", "SSIM", "LPIPS", "usage"]
COLUMNS += ["seeds", "steps", "batch", "train images"]
DIAG_COLUMNS = ["model", "K", "row_share_multi", "size_variance_corr", "image_corr", "mean size", "max size", "seeds"]


@dataclass
class Trained:
    configs: dict[tuple[str, int], dict[str, Any]]  # (run, seed) → training config
    k_distribution: dict[str, dict[int, float]]  # run → K → probability per step
    wall_s: dict[str, float]  # run-seed → training time of this invocation (reused runs: absent)


def train_all(args: argparse.Namespace, *, work: Path, data: Path, env: Mapping[str, str], start: float) -> Trained:
    """Write every run × seed config, then train the runs that are not finished yet, ``args.jobs`` at a time."""
    base = yaml.safe_load(args.base_config.read_text())
    trained = Trained(configs={}, k_distribution={}, wall_s={})
    jobs = []
    for run in args.runs:
        for seed in args.seeds:
            cfg = build_config(
                run=run,
                seed=seed,
                steps=args.steps,
                batch_size=args.batch_size,
                base=base,
                data=data,
                work_dir=work,
                overrides=args.override_values,
            )
            trained.configs[(run, seed)] = cfg
            label = f"{run}-s{seed}"
            path = work / "configs" / f"{label}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            # Read through the trainer's loader: a bad recipe fails here, before anything starts.
            trained.k_distribution[run] = training_k_distribution(path)
            out = run_dir(work_dir=work, run=run, seed=seed)
            if is_done(out=out, cfg=cfg):
                print(f"{_clock(start)} reusing {label} ({args.steps} steps)", flush=True)
                continue
            (out / DONE_MARKER).unlink(missing_ok=True)  # stale: its evaluation must not be reused either
            if (past := newest_checkpoint(out)) > args.steps:
                raise SystemExit(
                    f"{out} has a checkpoint at step {past}, beyond --steps {args.steps}: use another --work-dir"
                )

            def mark(wall: float, *, out: Path = out, cfg: dict[str, Any] = cfg, label: str = label) -> None:
                (out / DONE_MARKER).write_text(json.dumps({"recipe": _recipe_key(cfg), "wall_s": wall}, indent=1))
                trained.wall_s[label] = wall

            # Seed, budget and place are repeated on the command line so that process lists and logs name the run.
            command = _mergevq(
                "train-tokenizer", str(path), f"seed={seed}", f"max_steps={args.steps}", f"output_dir={out}",
                "--no-progress",
            )  # fmt: skip
            log = work / "logs" / f"{label}.train.log"
            jobs.append(Job(label=f"train {label}", command=command, log=log, on_success=mark))
    if jobs:
        print(f"{_clock(start)} training {len(jobs)} run(s), {args.jobs} at a time", flush=True)
    failed = run_jobs(jobs, parallel=args.jobs, env=env, start=start)
    if failed:
        raise SystemExit(f"training failed: {', '.join(failed)} (logs under {work / 'logs'}); rerun to resume")
    return trained


def evaluate_all(
    args: argparse.Namespace, *, trained: Trained, work: Path, data: Path, env: Mapping[str, str], start: float
) -> list[dict[str, Any]]:
    """Evaluate every run × seed at its K (reusing evaluations of the same export); one record per run, seed, K."""
    jobs = []
    files: dict[tuple[str, int], Path] = {}
    for run in args.runs:
        for seed in args.seeds:
            out = run_dir(work_dir=work, run=run, seed=seed)
            path = eval_path(out=out, ks=RUNS[run].eval_k, images=args.eval_images)
            files[(run, seed)] = path
            if eval_is_fresh(path, out=out):
                continue
            path.unlink(missing_ok=True)
            command = _mergevq(
                "evaluate", "tokenizer", "--model", str(out / "export"), "--data", str(data / "test"),
                "--num-tokens", *map(str, RUNS[run].eval_k), "--max-images", str(args.eval_images),
                "--no-fid", "--num-workers", "0", "--output", str(path),
            )  # fmt: skip
            log = work / "logs" / f"{run}-s{seed}.eval.log"
            jobs.append(Job(label=f"evaluate {run}-s{seed}", command=command, log=log))
    failed = run_jobs(jobs, parallel=args.jobs, env=env, start=start)
    if failed:
        raise SystemExit(f"evaluation failed: {', '.join(failed)} (logs under {work / 'logs'})")

    per_seed = []
    for (run, seed), path in files.items():
        payload = json.loads(path.read_text())
        cfg = trained.configs[(run, seed)]
        for entry in payload["results"]:
            if entry.get("assignment", "true") != "true":
                continue
            per_seed.append(
                {
                    "model": run,
                    "seed": seed,
                    "K": entry["num_tokens"],
                    "psnr": entry["psnr"],
                    "ssim": entry["ssim"],
                    "lpips": entry["lpips"],
                    "usage": entry.get("codebook_usage"),
                    "steps": cfg["max_steps"],
                    "batch_size": cfg["batch_size"],
                    "grid_tokens": RUNS[run].grid_tokens,
                    "eval_images": payload["data"]["num_images"],
                }
            )
    return per_seed


def diagnose_all(args: argparse.Namespace, *, work: Path, data: Path) -> dict[str, dict[int, dict[int, dict]]]:
    """run → seed → K → merge statistics, for the ToMe runs (in-process: a few hundred images at two K)."""
    runs = [run for run in args.runs if RUNS[run].diagnostics]
    if not runs:
        return {}
    import torch

    torch.set_num_threads(1)  # small job; other runs may still share the machine
    images = load_test_images(data / "test", count=DIAG_IMAGES)
    return {
        run: {
            seed: merge_diagnostics(run_dir(work_dir=work, run=run, seed=seed) / "export", images=images)
            for seed in args.seeds
        }
        for run in runs
    }


def report(
    args: argparse.Namespace,
    *,
    per_seed: Sequence[Mapping[str, Any]],
    trained: Trained,
    diags: Mapping[str, Mapping[int, Mapping[int, Mapping[str, float]]]],
) -> tuple[Path, Path, Path]:
    """``results/<name>.{json,md}`` and the figure; returns their paths."""
    rows = aggregate(per_seed)
    eval_images = min(r["eval_images"] for r in per_seed)
    reproduce = reproduce_command(args)
    figure = FIGURES_DIR / f"{args.name}_psnr_vs_k.png"
    budget = f"{args.steps} steps × batch {args.batch_size} = {args.steps * args.batch_size:,} training images"
    title = (
        f"Merged vs grid tokens at equal training images (CIFAR-10 32×32, tiny-32; {budget}; "
        f"{len(args.seeds)} seeds; {eval_images} test images)"
    )
    plot_psnr_vs_k(rows, path=figure, title=f"PSNR vs K, {budget}\nmean over seeds {args.seeds}, bars: min–max")
    k_text = "; ".join(
        f"`{run}` " + ", ".join(f"{k}: {p:.2f}" for k, p in sorted(dist.items()))
        for run, dist in trained.k_distribution.items()
    )
    k_note = f"Training K (probability per step): {k_text}."
    dist = trained.k_distribution
    if "merged" in dist and "grid" in dist and dist["grid"].get(16, 0) > dist["merged"].get(16, 0):
        k_note += (
            " The grid model spends more of its steps at K = 16 than the merged one, which favours the grid there."
        )
    notes = [
        verdict(rows),
        "",
        "Models: " + "; ".join(f"`{run}` — {RUNS[run].description}" for run in args.runs) + ".",
        "",
        k_note,
        "",
        "PSNR / SSIM / LPIPS / usage: means over seeds; `PSNR min` / `PSNR max`: the range over seeds, `PSNR sd` the "
        "sample standard deviation. A gap counts as beyond the seed spread when the seed ranges do not overlap. EMA "
        "weights, reconstruction with the encoder's own assignment, LPIPS = shift-tolerant VGG LPIPS.",
    ]
    if diags:
        notes += [
            "",
            f"Merge diagnostics on {DIAG_IMAGES} test images (means over seeds): `row_share_multi` = share of groups "
            "of ≥ 2 positions confined to one grid row; `size_variance_corr` = Pearson r of group size vs its pixel "
            "variance (negative: large groups on uniform regions); `image_corr` = Pearson r over images of pixel "
            "variance vs largest group.",
            "",
            markdown_table(_diag_rows(diags), DIAG_COLUMNS),
        ]
    notes += [
        "",
        f"Figure: `docs/figures/{figure.name}`.",
        "",
        f"Reproduce: `{reproduce}` (CIFAR-10 from `--data` or `MERGEVQ_CIFAR10`; finished runs are reused, "
        f"interrupted ones resume). Runs trained {args.jobs} at a time, one thread each.",
    ]
    json_path, md_path = write_results(
        args.name,
        title=title,
        rows=rows,
        columns=COLUMNS,
        notes="\n".join(notes),
        extra={
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seeds": args.seeds,
            "runs": args.runs,
            "eval_images": eval_images,
            "overrides": args.override_values,
            "reproduce": reproduce,
            "per_seed": list(per_seed),
            "training_k_distribution": {run: {str(k): p for k, p in d.items()} for run, d in dist.items()},
            "merge_diagnostics": {
                run: {str(seed): {str(k): s for k, s in per_k.items()} for seed, per_k in by_seed.items()}
                for run, by_seed in diags.items()
            },
            "train_wall_s": trained.wall_s,
            "figure": f"docs/figures/{figure.name}",
        },
    )
    return json_path, md_path, figure


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.monotonic()
    work = args.work_dir.resolve()
    data = args.data.resolve()
    if not (data / "train").is_dir() or not (data / "test").is_dir():
        raise SystemExit(f"CIFAR-10 not found at {data} (expected train/ and test/; set --data or MERGEVQ_CIFAR10)")
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    trained = train_all(args, work=work, data=data, env=env, start=start)
    per_seed = evaluate_all(args, trained=trained, work=work, data=data, env=env, start=start)
    diags = diagnose_all(args, work=work, data=data)
    if diags:
        print(f"{_clock(start)} merge diagnostics done", flush=True)
    json_path, md_path, figure = report(args, per_seed=per_seed, trained=trained, diags=diags)
    print(f"{_clock(start)} results in {md_path} and {json_path}, figure {figure}", flush=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # stop the jobs on the way out
    main()
