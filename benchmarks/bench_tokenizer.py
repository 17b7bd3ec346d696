"""MergeVQ speed and memory: a training forward+backward and an eval encode+decode, against the authors' figures.

Cases: ``tiny-32`` (32², batch 2 and 32, the preset's K) and ``gr-d64`` (256², batch 2, K=144), 2 threads. Each
(case, mode) runs in a fresh process (``run_isolated``, glibc thresholds raised):

* ``train``: ``model.train()``; ``out = model(x, num_tokens=K)``; loss = L1(recon, x) + 0.1·entropy + 0.25·commitment
  + 0.5·source_recovery; backward; grads reset to None (as an optimiser's ``zero_grad`` would). The peak-RSS increase is
  ``ru_maxrss`` after the first step minus the RSS just before it (parameter gradients included).
* ``eval``: ``model.eval()``; ``torch.no_grad()``; ``model.decode(model.encode(x, num_tokens=K))``.

These machines are shared, and with 2 threads every parallel op waits for both: another busy process can slow a
step of many small ops ten-fold or more (one thread spins while the other is descheduled). So every process also
measures a 2-thread fp32 matmul (2048³) around its timed steps (``matmul_gflops``, the same-run reference), records
the load average, and ``--max-load`` waits for a quiet machine before each process.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on one more step, with two corrections: torch counts a
grouped convolution's weight gradient ``groups`` times (×2048 for the decoder's depth-wise convs), and it has no
formula for the CPU flash-attention kernels.

    .venv/bin/python benchmarks/bench_tokenizer.py --max-load 1.2   # all cases, each on a quiet machine
    .venv/bin/python benchmarks/bench_tokenizer.py --cases tiny-32  # one preset
    .venv/bin/python benchmarks/bench_tokenizer.py --profile        # also: top ops of a gr-d64 training step
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from common import RESULTS_DIR, current_rss_mb, markdown_table, peak_rss_mb, run_isolated, write_results

# (preset, image side, batch, K or None for the preset's default, timed repeats)
CASES = [("tiny-32", 32, 2, None, 10), ("tiny-32", 32, 32, None, 5), ("gr-d64", 256, 2, 144, 5)]
THREADS = 2
PEAK_GFLOPS = 180.0  # fp32 matmul peak of the 2-core development machines (docs/ENVIRONMENT.md)
# The authors' implementation on these machines (2 threads, glibc thresholds raised): gr-d64, 256², batch 2, K=144.
AUTHORS = {("gr-d64", "train"): {"s": 9.98, "mb": 6.5 * 1024}, ("gr-d64", "eval"): {"s": 2.55, "mb": None}}
TITLE = "MergeVQ training step and eval encode+decode (CPU, 2 threads)"
COLUMNS = ["case", "mode", "K", "median_s", "cpu_s", "images_per_s", "peak_rss_increase_mb", "authors_s", "authors_mb"]
COLUMNS += ["speedup_vs_authors", "memory_vs_authors", "gflop", "gflops", "mfu", "authors_gflops", "matmul_gflops"]
COLUMNS += ["matmul_frac", "load_1m"]
NOTES = f"""
- `train`: forward + L1/entropy/commitment/source-recovery loss + backward; `eval`: no_grad encode + decode. Random
  inputs in [-1, 1]; each (case, mode) in fresh processes with the glibc thresholds raised; `median_s` over the timed
  steps after one warm-up step (median over processes), `cpu_s` the process CPU time of a step (both threads).
- `peak_rss_increase_mb`: peak RSS of the first step minus the RSS before it. The authors' +6.5 GB is the same figure.
- `speedup_vs_authors` = authors_s / median_s; `memory_vs_authors` = ours / theirs (< 1: less memory).
- `gflop`: one step, FlopCounterMode with grouped-conv and CPU-attention corrections; `authors_gflops` = our FLOPs /
  their time; `mfu` = gflops / {PEAK_GFLOPS:g}, the documented 2-core fp32 matmul peak. A 2048³ fp32 matmul measures
  240-315 GFLOP/s on a quiet machine, so `mfu` can exceed 1; `matmul_frac` = gflops / matmul_gflops, the same-run
  matmul measured in the same process around the timed steps, is the load-independent efficiency.
- `load_1m`: 1-minute load average (2 cores). Compare with the authors' idle-machine figures only at low load.
- Reproduce: `.venv/bin/python benchmarks/bench_tokenizer.py --max-load 1.0 --processes 2 --profile` (about 8 min on
  a quiet machine; `--render-only` rebuilds the table from `results/tokenizer.json`).
"""


def _loss(model: torch.nn.Module, x: torch.Tensor, k: int | None) -> torch.Tensor:
    out = model(x, num_tokens=k)
    losses = out.losses
    return (
        F.l1_loss(out.reconstruction, x)
        + 0.1 * losses["entropy"]
        + 0.25 * losses["commitment"]
        + 0.5 * losses["source_recovery"]
    )


def _train_step(model: torch.nn.Module, x: torch.Tensor, k: int | None) -> None:
    _loss(model, x, k).backward()
    model.zero_grad(set_to_none=True)


def _eval_step(model: Any, x: torch.Tensor, k: int | None) -> None:
    with torch.no_grad():
        model.decode(model.encode(x, num_tokens=k))


def matmul_gflops(*, size: int = 2048, repeats: int = 5) -> float:
    """Median fp32 matmul rate of this process right now (GFLOP/s): what the shared machine currently delivers."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * size**3 / statistics.median(times) / 1e9


def _flop_mapping() -> dict[Any, Any]:
    """Corrections to torch's FLOP formulas (shapes in, FLOPs out), see the module docstring."""
    from torch.utils.flop_counter import conv_flop_count, sdpa_backward_flop_count, sdpa_flop_count

    def conv_backward(grad_out_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        transposed, output_mask = args[4], args[7]
        # Each requested gradient (input, weight) costs one forward convolution; w_shape already holds C_in/groups.
        return conv_flop_count(x_shape, w_shape, grad_out_shape, transposed) * (output_mask[0] + output_mask[1])

    def sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    aten = torch.ops.aten
    return {
        aten.convolution_backward: conv_backward,
        aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_cpu_backward,
    }


def count_flops(step, *args) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_flop_mapping())
    with counter:
        step(*args)
    return float(counter.get_total_flops())


def measure(
    *, preset: str, image: int, batch: int, num_tokens: int | None, mode: str, repeats: int, seed: int = 0
) -> dict[str, Any]:
    """One (case, mode) in this process: first-step peak RSS increase, median step time, FLOPs of one step."""
    from mergevq.tokenizer.model import MergeVQ

    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)
    model = MergeVQ.from_preset(preset, image_size=image)
    model.train(mode == "train")
    k = num_tokens if num_tokens is not None else model.config.default_num_tokens
    x = torch.rand(batch, 3, image, image, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    step = _train_step if mode == "train" else _eval_step
    load_before = os.getloadavg()[0]
    gflops_before = matmul_gflops()

    gc.collect()
    rss_before = current_rss_mb()
    step(model, x, k)  # also the warm-up: oneDNN primitives, autograd engine threads
    peak_increase = max(0.0, peak_rss_mb() - rss_before)

    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step(model, x, k)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    gflops_after = matmul_gflops()
    flops = count_flops(step, model, x, k)
    median_s = statistics.median(wall)
    return {
        "K": k,
        "median_s": median_s,
        "min_s": min(wall),
        "cpu_s": statistics.median(cpu),
        "images_per_s": batch / median_s,
        "peak_rss_increase_mb": peak_increase,
        "gflop": flops / 1e9,
        "gflops": flops / 1e9 / median_s,
        "mfu": flops / 1e9 / median_s / PEAK_GFLOPS,
        "matmul_gflops": statistics.median([gflops_before, gflops_after]),
        "matmul_frac": flops / 1e9 / median_s / statistics.median([gflops_before, gflops_after]),
        "load_1m": statistics.median([load_before, os.getloadavg()[0]]),
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }


def profile_train_step(*, preset: str = "gr-d64", image: int = 256, batch: int = 2, num_tokens: int = 144) -> str:
    """Top ops by self CPU time of one training step (after a warm-up step), as a text table."""
    from torch.profiler import ProfilerActivity, profile

    from mergevq.tokenizer.model import MergeVQ

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = MergeVQ.from_preset(preset, image_size=image).train()
    x = torch.rand(batch, 3, image, image) * 2 - 1
    _train_step(model, x, num_tokens)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        _train_step(model, x, num_tokens)
    by_op = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=15)
    return f"load average {os.getloadavg()}\n\n{by_op}\n\n{by_shape}\n"


def wait_for_quiet(*, max_load: float | None, max_wait: float) -> None:
    """Sleep until the 1-minute load average is at most ``max_load`` (or ``max_wait`` seconds have passed)."""
    deadline = time.monotonic() + max_wait
    while max_load is not None and os.getloadavg()[0] > max_load and time.monotonic() < deadline:
        time.sleep(15)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="*", default=None, help="presets to run (default: all)")
    parser.add_argument("--modes", nargs="*", default=["train", "eval"], choices=["train", "eval"])
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per process (default: per case)")
    parser.add_argument("--processes", type=int, default=1, help="fresh processes per (case, mode); medians over them")
    parser.add_argument("--profile", action="store_true", help="also profile a gr-d64 training step")
    parser.add_argument("--max-load", type=float, default=None, help="wait for a 1-min load average <= this")
    parser.add_argument("--max-wait", type=float, default=1800, help="longest wait for --max-load, in seconds")
    parser.add_argument("--name", default="tokenizer", help="results file stem under benchmarks/results/")
    parser.add_argument("--render-only", action="store_true", help="rebuild <name>.md from <name>.json, run nothing")
    args = parser.parse_args(argv)
    if args.render_only:  # the JSON keeps its measurement date and machine; only the table and notes are redrawn
        rows = json.loads((RESULTS_DIR / f"{args.name}.json").read_text())["rows"]
        (RESULTS_DIR / f"{args.name}.md").write_text(
            f"## {TITLE}\n\n{markdown_table(rows, COLUMNS)}\n\n{NOTES.strip()}\n"
        )
        return 0

    rows = []
    for preset, image, batch, k, repeats in CASES:
        if args.cases and preset not in args.cases:
            continue
        for mode in args.modes:
            kwargs = dict(preset=preset, image=image, batch=batch, num_tokens=k, mode=mode)
            kwargs["repeats"] = args.repeats or repeats
            runs = []
            for _ in range(args.processes):
                wait_for_quiet(max_load=args.max_load, max_wait=args.max_wait)
                runs.append(run_isolated("bench_tokenizer", "measure", kwargs, timeout=3600))
            row: dict[str, Any] = {"case": f"{preset} {image}² b{batch}", "mode": mode, "B": batch, **runs[0]}
            for key in ("median_s", "cpu_s", "images_per_s", "peak_rss_increase_mb", "gflops", "mfu"):
                row[key] = statistics.median(r[key] for r in runs)
            for key in ("matmul_gflops", "matmul_frac", "load_1m"):
                row[key] = statistics.median(r[key] for r in runs)
            row["min_s"] = min(r["min_s"] for r in runs)
            ref = AUTHORS.get((preset, mode))
            if ref and image == 256 and batch == 2 and row["K"] == 144:
                row["authors_s"], row["authors_mb"] = ref["s"], ref["mb"]
                row["speedup_vs_authors"] = ref["s"] / row["median_s"]
                row["authors_gflops"] = row["gflop"] / ref["s"]
                if ref["mb"]:
                    row["memory_vs_authors"] = row["peak_rss_increase_mb"] / ref["mb"]
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    write_results(args.name, title=TITLE, rows=rows, columns=COLUMNS, notes=NOTES)
    if args.profile:
        text = run_isolated("bench_tokenizer", "profile_train_step", {}, timeout=3600)
        path = RESULTS_DIR / f"{args.name}_profile.txt"
        path.write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
