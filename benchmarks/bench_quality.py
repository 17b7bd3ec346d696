"""Reconstruction quality at a fixed training budget: merged tokens vs two no-merging baselines (CIFAR-10, 32×32).

Three tokenizers are trained side by side for the same wall-clock budget with the same code and recipe
(``configs/cifar10/gr.yaml``, ``tiny-32``):

* ``merged``  — MergeVQ: L = 64 tokens on an 8×8 grid, K sampled every step (discrete Gaussian over {16..64});
* ``full``    — the same tokenizer without merging (K = L = 64 every step), an Open-MAGVIT2-style LFQ tokenizer;
* ``coarse``  — a grid that already has L/4 = 16 tokens (one more downsampling, 4×4 grid), no merging.

Then each is evaluated on 1,000 CIFAR-10 test images: the merged model at K ∈ {L, L/2, L/4}, the baselines at their
own token count. The paper's claim to check at small scale: the merged model at K = L/4 beats the coarse-grid model
with the same number of tokens.

    python benchmarks/bench_quality.py --budget-minutes 30          # the issue's setting (≈35 min on 2 cores)

Runs are concurrent (one thread each) so that they share the machine's load equally; each is stopped with SIGTERM at
the budget (the trainer checkpoints and exits) and its EMA weights are exported and evaluated.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MALLOC_ENV, RESULTS_DIR, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "cifar10" / "gr.yaml"

RUNS = {
    "merged": {"overrides": {}, "merge": None, "eval_k": [64, 32, 16]},
    "full": {
        "overrides": {"learned_recovery": False, "default_num_tokens": 64},
        "merge": {"distribution": "fixed", "fixed": 64},
        "eval_k": [64],
    },
    "coarse": {
        "overrides": {"learned_recovery": False, "channel_mult": [1, 2, 4, 4], "default_num_tokens": 16},
        "merge": {"distribution": "fixed", "fixed": 16},
        "eval_k": [16],
    },
}


def _config_for(name: str, *, data: Path, out: Path) -> Path:
    cfg = yaml.safe_load(BASE_CONFIG.read_text())
    spec = RUNS[name]
    cfg = copy.deepcopy(cfg)
    cfg["model"]["overrides"] = dict(spec["overrides"])
    if spec["merge"] is not None:
        cfg["merge"] = dict(spec["merge"])
    cfg["data"].update(train=str(data / "train"), val=str(data / "test"), num_workers=1)
    cfg.update(
        output_dir=str(out / name),
        max_steps=10**7,  # stopped by the wall-clock budget
        checkpoint_every=10**6,
        val_every=10**6,
        log_every=25,
        threads=1,
    )
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _mergevq(*args: str) -> list[str]:
    return [sys.executable, "-m", "mergevq", *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-minutes", type=float, default=30.0, help="training wall-clock budget per model")
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("MERGEVQ_CIFAR10", ROOT.parent / "shared/data/cifar10"))
    )
    parser.add_argument("--eval-images", type=int, default=1000)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "quality")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "1"}

    procs = {}
    for name in args.runs:
        config = _config_for(name, data=args.data, out=args.work_dir)
        log = open(args.work_dir / f"{name}.train.log", "w")  # noqa: SIM115 - closed after the run
        procs[name] = (
            subprocess.Popen(
                _mergevq("train-tokenizer", str(config), "--no-progress"),
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            ),
            config,
            log,
        )
    print(f"training {', '.join(procs)} for {args.budget_minutes:g} min each (concurrently)", flush=True)
    time.sleep(args.budget_minutes * 60)
    for proc, _, _ in procs.values():
        proc.send_signal(signal.SIGTERM)
    rows = []
    for name, (proc, config, log) in procs.items():
        proc.wait(timeout=600)
        log.close()
        subprocess.run(_mergevq("train-tokenizer", str(config), "--export-only"), cwd=ROOT, env=env, check=True)
        log_path = args.work_dir / name / "logs" / "train.jsonl"
        train_rows = [r for r in map(json.loads, log_path.read_text().splitlines()) if r.get("split") == "train"]
        last_step = max(int(p.name.split("_")[-1]) for p in (args.work_dir / name / "checkpoints").glob("step_*"))
        ips = [r["images_per_s"] for r in train_rows if r.get("images_per_s")]
        out_json = args.work_dir / f"{name}.eval.json"
        subprocess.run(
            _mergevq(
                "evaluate",
                "tokenizer",
                "--model",
                str(args.work_dir / name / "export"),
                "--data",
                str(args.data / "test"),
                "--num-tokens",
                *map(str, RUNS[name]["eval_k"]),
                "--max-images",
                str(args.eval_images),
                "--no-fid",
                "--output",
                str(out_json),
            ),
            cwd=ROOT,
            env={**env, "OMP_NUM_THREADS": "2"},
            check=True,
        )
        result = json.loads(out_json.read_text())
        for entry in result["results"]:
            rows.append(
                {
                    "model": name,
                    "grid tokens L": 16 if name == "coarse" else 64,
                    "K": entry["num_tokens"],
                    "PSNR": entry["psnr"],
                    "SSIM": entry["ssim"],
                    "LPIPS": entry["lpips"],
                    "usage": entry.get("codebook_usage"),
                    "steps": last_step,
                    "train img/s": sum(ips) / len(ips) if ips else None,
                }
            )
    by = {(r["model"], r["K"]): r for r in rows}
    verdict = ""
    if ("merged", 16) in by and ("coarse", 16) in by:
        m, c = by[("merged", 16)], by[("coarse", 16)]
        better = m["PSNR"] > c["PSNR"]
        verdict = (
            f"At K = 16 (L/4) the merged model reaches {m['PSNR']:.2f} dB PSNR vs {c['PSNR']:.2f} dB for the "
            f"coarse-grid model: the paper's claim {'holds' if better else 'does not hold'} at this scale and budget."
        )
    write_results(
        "quality",
        title=f"Reconstruction quality after {args.budget_minutes:g} min of training per model (CIFAR-10 test, "
        f"{args.eval_images} images)",
        rows=rows,
        columns=["model", "grid tokens L", "K", "PSNR", "SSIM", "LPIPS", "usage", "steps", "train img/s"],
        notes=(
            verdict + "\n\nReproduce: `python benchmarks/bench_quality.py --budget-minutes "
            f"{args.budget_minutes:g}`. Runs were concurrent, one thread each."
        ),
        extra={"budget_minutes": args.budget_minutes, "eval_images": args.eval_images},
    )
    print(f"results in {RESULTS_DIR / 'quality.md'}")


if __name__ == "__main__":
    main()
