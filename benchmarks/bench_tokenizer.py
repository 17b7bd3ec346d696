"""MergeVQ speed and memory: a training forward+backward and an eval encode+decode, with the decoder's memory format
before and after its fix measured in the same run.

Cases: ``tiny-32`` (32², batch 2 and 32, the preset's K) and ``gr-d64`` (256², batch 2, K=144), ``--threads`` (2). Each
(case, mode, decoder layout) runs in a fresh process (``run_isolated``, glibc thresholds raised):

* ``train``: ``model.train()``; ``out = model(x, num_tokens=K)``; loss = L1(recon, x) + 0.1·entropy + 0.25·commitment
  + 0.5·source_recovery; backward; grads reset to None (as an optimiser's ``zero_grad`` would). The peak-RSS increase is
  ``ru_maxrss`` after the first step minus the RSS just before it (parameter gradients included).
* ``eval``: ``model.eval()``; ``torch.no_grad()``; ``model.decode(model.encode(x, num_tokens=K))``.
* decoder layout: ``nchw`` (the decoder's default) or ``channels_last``. The latter is what the decoder's CNN part ran
  in before it chose its layout: the recovered map arrives as a channels_last view of the tokens and CPU convolutions
  propagate their input's layout. The layouts alternate process by process, so ``time_vs_nchw`` (median of the
  per-round ratios) compares them under the same load.

These machines are shared, and with 2 threads every parallel op waits for both: another busy process can slow a step
of many small ops ten-fold or more (``--threads 1`` avoids that when a neighbour holds a core). So every process also
measures an fp32 matmul (2048³, same thread count) before and after its timed steps; the faster of the two is the
process's peak, and ``mfu`` = achieved GFLOP/s / that peak. ``--max-load`` waits for a quiet machine before each
process.

Layout check (``layout_check``, one more process): one training step in each decoder layout records the layout of
every full-resolution conv/GroupNorm; then each distinct full-resolution conv and GroupNorm is timed forward+backward
on the very input and output-gradient tensors it saw, and again on contiguous copies of them, interleaved.
``actual_vs_contiguous`` > 1 means the decoder feeds that op a slower layout than plain NCHW.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on one more step, with two corrections: torch counts a
grouped convolution's weight gradient ``groups`` times (×2048 for the decoder's depth-wise convs), and it has no
formula for the CPU flash-attention kernels.

    .venv/bin/python benchmarks/bench_tokenizer.py --max-load 1.2          # all cases, each on a quiet machine
    .venv/bin/python benchmarks/bench_tokenizer.py --cases tiny-32         # one preset
    .venv/bin/python benchmarks/bench_tokenizer.py --profile --compile     # also: top ops; compiled ResBlocks
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from common import RESULTS_DIR, current_rss_mb, markdown_table, peak_rss_mb, run_isolated, write_results

# (preset, image side, batch, K or None for the preset's default, timed repeats)
CASES = [("tiny-32", 32, 2, None, 10), ("tiny-32", 32, 32, None, 5), ("gr-d64", 256, 2, 144, 3)]
THREADS = 2  # default; --threads 1 avoids spin-waiting on a second core that a neighbour holds
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
# Measured elsewhere, not reproduced here: the authors' tokenizer code and this repository's, timed side by side on
# another machine (torch 2.13 CPU, gr-d64, 256², batch 2, K=144, 2 threads), before the decoder layout fix.
ELSEWHERE_SOURCE = "project issue 9; another machine, before the decoder layout fix"
ELSEWHERE = {
    ("gr-d64", "train"): {"authors_s": 11.03, "ours_s": 12.56, "authors_gb": 5.9},
    ("gr-d64", "eval"): {"authors_s": 3.03, "ours_s": 2.93, "authors_gb": None},
}
TITLE = "MergeVQ training step and eval encode+decode (CPU)"
COLUMNS = ["case", "mode", "K", "decoder_layout", "median_s", "time_vs_nchw", "cpu_s", "cpu_vs_nchw", "images_per_s"]
COLUMNS += ["peak_rss_increase_mb", "rss_vs_nchw", "gflop", "gflops", "matmul_peak_gflops", "mfu", "load_1m"]
COLUMNS += ["threads", "authors_s_elsewhere", "authors_gb_elsewhere"]
LAYOUT_COLUMNS = ["decoder_layout", "op", "input_shape", "input_layout", "grad_layout", "actual_ms", "contiguous_ms"]
LAYOUT_COLUMNS += ["actual_vs_contiguous"]
NOTES = """
- `train`: forward + L1/entropy/commitment/source-recovery loss + backward; `eval`: no_grad encode + decode. Random
  inputs in [-1, 1]; each (case, mode, layout) in fresh processes with the glibc thresholds raised; `median_s` over
  the timed steps after one warm-up step (median over processes), `cpu_s` the process CPU time of a step.
- `decoder_layout`: memory format of the decoder's CNN part. `nchw` is the default; `channels_last` is the layout it
  used to inherit from the recovered map. `time_vs_nchw` / `cpu_vs_nchw` / `rss_vs_nchw`: this row / the `nchw` row
  of the same case and mode (wall time, process CPU time, memory), median of the per-round ratios (rounds alternate
  the layouts); > 1 means slower / more memory. With 1 thread on a loaded machine, CPU time is the steadier figure.
- `peak_rss_increase_mb`: peak RSS of the first step minus the RSS before it.
- `gflop`: one step, FlopCounterMode with grouped-conv and CPU-attention corrections; `gflops` = gflop / median_s.
  `matmul_peak_gflops`: the best of a 2048³ fp32 matmul timed in the same process before and after the steps; `mfu` =
  gflops / matmul_peak_gflops.
- `load_1m`: 1-minute load average (2 cores); `threads`: torch threads per process.
- `authors_s_elsewhere`, `authors_gb_elsewhere`: figures measured elsewhere, see below; nothing in this table is
  divided by them.
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


def matmul_peak_gflops(*, size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 matmul rate of this process right now (GFLOP/s): the peak the shared machine currently delivers."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * size**3 / min(times) / 1e9


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


def _build(*, preset: str, image: int, decoder_format: str, train: bool, seed: int, threads: int) -> Any:
    from mergevq.tokenizer.model import MergeVQ

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = MergeVQ.from_preset(preset, image_size=image)
    model.decoder.memory_format = FORMATS[decoder_format]
    return model.train(train)


def measure(
    *,
    preset: str,
    image: int,
    batch: int,
    num_tokens: int | None,
    mode: str,
    repeats: int,
    decoder_format: str = "nchw",
    flops: bool = True,
    threads: int = THREADS,
    seed: int = 0,
) -> dict[str, Any]:
    """One (case, mode, layout) in this process: first-step peak RSS increase, median step time, FLOPs of one step."""
    model = _build(
        preset=preset, image=image, decoder_format=decoder_format, train=mode == "train", seed=seed, threads=threads
    )
    k = num_tokens if num_tokens is not None else model.config.default_num_tokens
    x = torch.rand(batch, 3, image, image, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    step = _train_step if mode == "train" else _eval_step
    load_before = os.getloadavg()[0]
    peak_before = matmul_peak_gflops()

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
    peak = max(peak_before, matmul_peak_gflops())
    load_after = os.getloadavg()[0]
    n_flops = count_flops(step, model, x, k) if flops else None
    median_s = statistics.median(wall)
    return {
        "K": k,
        "decoder_layout": decoder_format,
        "median_s": median_s,
        "min_s": min(wall),
        "cpu_s": statistics.median(cpu),
        "images_per_s": batch / median_s,
        "peak_rss_increase_mb": peak_increase,
        "gflop": None if n_flops is None else n_flops / 1e9,
        "matmul_peak_gflops": peak,
        "load_1m": statistics.median([load_before, load_after]),
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }


def _layout_name(t: torch.Tensor) -> str:
    if t.is_contiguous():
        return "nchw"
    return "channels_last" if t.is_contiguous(memory_format=torch.channels_last) else "strided"


def _time_fwd_bwd(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    x = x.detach().requires_grad_()
    t0 = time.perf_counter()
    module(x).backward(grad)
    elapsed = time.perf_counter() - t0
    module.zero_grad(set_to_none=True)
    return elapsed * 1e3


def _capture_full_resolution(
    model: Any, x: torch.Tensor, *, num_tokens: int, modules: list[tuple[str, torch.nn.Module]]
) -> tuple[dict[tuple, dict[str, Any]], dict[str, int]]:
    """One training step; returns, per distinct full-resolution op signature, its first module with the input and
    output gradient it saw, and a tally of full-resolution forward outputs / output gradients by layout."""
    side = x.shape[-1]
    seen: dict[tuple, dict[str, Any]] = {}
    tally: dict[str, int] = {}

    def fwd(module, inp, out, *, name: str) -> None:
        if out.shape[-1] != side:
            return
        tally[f"fwd {_layout_name(out)}"] = tally.get(f"fwd {_layout_name(out)}", 0) + 1
        w = getattr(module, "weight", None)
        key = (type(module).__name__, tuple(inp[0].shape), None if w is None else tuple(w.shape))
        if key not in seen:  # the first module of each distinct signature stands for the others
            seen[key] = {"name": name, "module": module, "x": inp[0].detach().clone()}  # clone keeps the strides

    def bwd(module, grad_in, grad_out, *, name: str) -> None:
        if grad_out[0].shape[-1] != side:
            return
        tally[f"bwd {_layout_name(grad_out[0])}"] = tally.get(f"bwd {_layout_name(grad_out[0])}", 0) + 1
        for entry in seen.values():
            if entry["name"] == name and "grad" not in entry:
                entry["grad"] = grad_out[0].detach().clone()

    handles = []
    for name, m in modules:
        handles.append(m.register_forward_hook(lambda mod, i, o, name=name: fwd(mod, i, o, name=name)))
        handles.append(m.register_full_backward_hook(lambda mod, gi, go, name=name: bwd(mod, gi, go, name=name)))
    try:
        _train_step(model, x, num_tokens)
    finally:
        for h in handles:
            h.remove()
    return seen, tally


def layout_check(
    *,
    preset: str = "gr-d64",
    image: int = 256,
    batch: int = 2,
    num_tokens: int = 144,
    threads: int = THREADS,
    repeats: int = 5,
) -> dict[str, Any]:
    """Full-resolution decoder convs/GroupNorms on their actual tensors vs contiguous copies, in both decoder layouts.

    Returns ``rows`` (one per layout and distinct op) and ``counts`` (full-resolution forward outputs and output
    gradients per layout).
    """
    from torch import nn

    model = _build(preset=preset, image=image, decoder_format="nchw", train=True, seed=0, threads=threads)
    x = torch.rand(batch, 3, image, image, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cnn = [
        (name, m)
        for name, m in model.decoder.named_modules()
        if isinstance(m, (nn.Conv2d, nn.GroupNorm)) and not name.startswith("blocks.")  # not the token-grid MixFFN
    ]
    captured: dict[str, dict[tuple, dict[str, Any]]] = {}
    counts: dict[str, dict[str, int]] = {}
    for fmt_name, fmt in FORMATS.items():
        model.decoder.memory_format = fmt
        captured[fmt_name], counts[fmt_name] = _capture_full_resolution(model, x, num_tokens=num_tokens, modules=cnn)

    # Interleave actual / contiguous and the layouts, so a busy spell hits all of them.
    jobs = [(f, key, e) for f, entries in captured.items() for key, e in entries.items() if "grad" in e]
    times: dict[tuple, dict[str, list[float]]] = {(f, key): {"actual": [], "contiguous": []} for f, key, _ in jobs}
    for r in range(repeats + 1):
        for f, key, e in jobs:
            for variant, xs, gs in (
                ("actual", e["x"], e["grad"]),
                ("contiguous", e["x"].contiguous(), e["grad"].contiguous()),
            ):
                ms = _time_fwd_bwd(e["module"], xs, gs)
                if r:  # the first round is the warm-up
                    times[(f, key)][variant].append(ms)
    rows = []
    for f, key, e in jobs:
        actual = statistics.median(times[(f, key)]["actual"])
        contiguous = statistics.median(times[(f, key)]["contiguous"])
        op = f"{key[0]} {e['name']}" + ("" if key[2] is None else f" w{list(key[2])}")
        rows.append(
            {
                "decoder_layout": f,
                "op": op,
                "input_shape": "x".join(map(str, key[1])),
                "input_layout": _layout_name(e["x"]),
                "grad_layout": _layout_name(e["grad"]),
                "actual_ms": actual,
                "contiguous_ms": contiguous,
                "actual_vs_contiguous": statistics.median(
                    a / c for a, c in zip(times[(f, key)]["actual"], times[(f, key)]["contiguous"])
                ),
            }
        )
    return {"rows": rows, "counts": counts, "load_1m": os.getloadavg()[0], "repeats": repeats, "threads": threads}


def measure_compile(
    *,
    preset: str = "gr-d64",
    image: int = 256,
    batch: int = 2,
    num_tokens: int = 144,
    threads: int = THREADS,
    repeats: int = 3,
) -> dict[str, Any]:
    """Training step with every decoder ResBlock under ``torch.compile`` vs eager, alternating in one process."""
    import torch._dynamo
    from torch import nn

    from mergevq.nn.blocks import ResBlock

    # One compiled graph per distinct ResBlock shape and instance guard: the default limit would fall back to eager.
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.cache_size_limit = 64
    model = _build(preset=preset, image=image, decoder_format="nchw", train=True, seed=0, threads=threads)
    x = torch.rand(batch, 3, image, image, generator=torch.Generator().manual_seed(0)) * 2 - 1
    eager = {name: level.blocks for name, level in model.decoder.levels.named_children()}
    compiled = {
        name: nn.Sequential(*[torch.compile(b) if isinstance(b, ResBlock) else b for b in seq])
        for name, seq in eager.items()
    }

    def use(blocks: dict[str, nn.Module]) -> None:
        for name, level in model.decoder.levels.named_children():
            level.blocks = blocks[name]

    use(eager)
    _train_step(model, x, num_tokens)  # eager warm-up
    use(compiled)
    t0 = time.perf_counter()
    _train_step(model, x, num_tokens)
    first_step_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(repeats):
        for label, blocks in (("eager", eager), ("compiled", compiled)):
            use(blocks)
            t0 = time.perf_counter()
            _train_step(model, x, num_tokens)
            times[label].append(time.perf_counter() - t0)
    eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
    return {
        "case": f"{preset} {image}² b{batch} train",
        "first_compiled_step_s": first_step_s,
        "eager_s": eager_s,
        "compiled_s": compiled_s,
        "compiled_vs_eager": statistics.median(c / e for c, e in zip(times["compiled"], times["eager"])),
        "repeats": repeats,
        "threads": threads,
        "load_1m": os.getloadavg()[0],
    }


def profile_train_step(
    *, preset: str = "gr-d64", image: int = 256, batch: int = 2, num_tokens: int = 144, threads: int = THREADS
) -> str:
    """Top ops by self CPU time of one training step (after a warm-up step), as a text table."""
    from torch.profiler import ProfilerActivity, profile

    model = _build(preset=preset, image=image, decoder_format="nchw", train=True, seed=0, threads=threads)
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


def _notes(extra: dict[str, Any]) -> str:
    """The notes under the main table: column meanings, the layout check, compile, figures measured elsewhere."""
    parts = [NOTES.strip()]
    check = extra.get("layout_check")
    if check:
        counts = "; ".join(
            f"`{f}`: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())) for f, c in check["counts"].items()
        )
        parts.append(
            "### Layout check: full-resolution decoder ops on their actual tensors vs contiguous copies\n\n"
            f"gr-d64, 256², batch 2, K = 144, {check.get('threads', THREADS)} thread(s), one training step per decoder "
            f"layout; median of {check['repeats']} "
            f"interleaved forward+backward runs per op (load {check['load_1m']:.2f}). Full-resolution conv/GroupNorm "
            f"outputs (fwd) and output gradients (bwd) by layout: {counts}.\n\n"
            + markdown_table(check["rows"], LAYOUT_COLUMNS)
        )
    comp = extra.get("compile")
    if comp:
        parts.append(
            "### torch.compile of the decoder ResBlocks (optional, `--compile`)\n\n"
            "Eager and compiled ResBlocks alternate in one process after one compiled step (its time includes the "
            "compilation); `compiled_vs_eager` is the median of the per-round ratios.\n\n"
            + markdown_table(
                [comp],
                ["case", "threads", "first_compiled_step_s", "eager_s", "compiled_s", "compiled_vs_eager", "load_1m"],
            )
        )
    ref = extra.get("elsewhere")
    if ref:
        rows = [{"case": "gr-d64 256² b2 K=144", "mode": mode, **vals} for mode, vals in ref["figures"].items()]
        parts.append(
            f"### Measured elsewhere ({ref['source']})\n\n"
            "The authors' code and this repository's timed side by side on another machine, before the decoder "
            "layout fix. They are listed for context only: no ratio above is computed against them, since this "
            "machine and its load differ. The in-run comparison is `time_vs_nchw`.\n\n"
            + markdown_table(rows, ["case", "mode", "authors_s", "ours_s", "authors_gb"])
        )
    command = extra.get("command", "--processes 2 --profile")
    parts.append(
        f"Reproduce: `.venv/bin/python benchmarks/bench_tokenizer.py {command}` (`--compile` adds the compiled "
        "ResBlocks; `--render-only` rebuilds this page from `results/<name>.json`)."
    )
    return "\n\n".join(parts)


def _ratio(runs: dict[str, list[dict[str, Any]]], fmt: str, key: str) -> float | None:
    """Median over rounds of ``runs[fmt][i][key] / runs["nchw"][i][key]`` (rounds alternate the layouts)."""
    if fmt == "nchw" or "nchw" not in runs:
        return None
    pairs = [(r[key], b[key]) for r, b in zip(runs[fmt], runs["nchw"]) if b[key]]
    return statistics.median(a / b for a, b in pairs) if pairs else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="*", default=None, help="presets to run (default: all)")
    parser.add_argument("--modes", nargs="*", default=["train", "eval"], choices=["train", "eval"])
    parser.add_argument("--layouts", nargs="*", default=list(FORMATS), choices=list(FORMATS), help="decoder layouts")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads per process")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per process (default: per case)")
    parser.add_argument("--processes", type=int, default=1, help="rounds of fresh processes per (case, mode, layout)")
    parser.add_argument("--no-layout-check", action="store_true", help="skip the full-resolution op layout check")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd decoder ResBlocks")
    parser.add_argument("--profile", action="store_true", help="also profile a gr-d64 training step")
    parser.add_argument("--max-load", type=float, default=None, help="wait for a 1-min load average <= this")
    parser.add_argument("--max-wait", type=float, default=1800, help="longest wait for --max-load, in seconds")
    parser.add_argument("--name", default="tokenizer", help="results file stem under benchmarks/results/")
    parser.add_argument("--render-only", action="store_true", help="rebuild <name>.md from <name>.json, run nothing")
    args = parser.parse_args(argv)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(args.threads)  # so the results' machine info states the thread count the processes used
    if args.render_only:  # the JSON keeps its measurement date and machine; only the tables and notes are redrawn
        payload = json.loads((RESULTS_DIR / f"{args.name}.json").read_text())
        (RESULTS_DIR / f"{args.name}.md").write_text(
            f"## {TITLE}\n\n{markdown_table(payload['rows'], COLUMNS)}\n\n{_notes(payload['extra'])}\n"
        )
        return 0

    rows, per_process = [], {}
    for preset, image, batch, k, repeats in CASES:
        if args.cases and preset not in args.cases:
            continue
        for mode in args.modes:
            kwargs = dict(preset=preset, image=image, batch=batch, num_tokens=k, mode=mode)
            kwargs["repeats"] = args.repeats or repeats
            runs: dict[str, list[dict[str, Any]]] = {f: [] for f in args.layouts}
            for i in range(args.processes):
                for fmt in args.layouts:
                    wait_for_quiet(max_load=args.max_load, max_wait=args.max_wait)
                    first = i == 0 and fmt == args.layouts[0]  # FLOPs do not depend on the layout: count once
                    kw = {**kwargs, "decoder_format": fmt, "flops": first, "threads": args.threads}
                    runs[fmt].append(run_isolated("bench_tokenizer", "measure", kw, timeout=3600))
            gflop = runs[args.layouts[0]][0]["gflop"]
            for fmt in args.layouts:
                row: dict[str, Any] = {"case": f"{preset} {image}² b{batch}", "mode": mode, "B": batch}
                row |= {**runs[fmt][0], "gflop": gflop}
                for key in ("median_s", "cpu_s", "images_per_s", "peak_rss_increase_mb", "load_1m"):
                    row[key] = statistics.median(r[key] for r in runs[fmt])
                row["matmul_peak_gflops"] = statistics.median(r["matmul_peak_gflops"] for r in runs[fmt])
                row["min_s"] = min(r["min_s"] for r in runs[fmt])
                row["gflops"] = gflop / row["median_s"]
                # Each process's own peak: the step and the matmul see the same load.
                row["mfu"] = statistics.median(gflop / r["median_s"] / r["matmul_peak_gflops"] for r in runs[fmt])
                row["time_vs_nchw"] = _ratio(runs, fmt, "median_s")
                row["cpu_vs_nchw"] = _ratio(runs, fmt, "cpu_s")
                row["rss_vs_nchw"] = _ratio(runs, fmt, "peak_rss_increase_mb")
                ref = ELSEWHERE.get((preset, mode))
                if ref and image == 256 and batch == 2 and row["K"] == 144:
                    row["authors_s_elsewhere"], row["authors_gb_elsewhere"] = ref["authors_s"], ref["authors_gb"]
                keep = ("median_s", "cpu_s", "peak_rss_increase_mb", "matmul_peak_gflops", "load_1m")
                per_process[f"{row['case']} {mode} {fmt}"] = [{key: r[key] for key in keep} for r in runs[fmt]]
                rows.append(row)
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    extra: dict[str, Any] = {
        "elsewhere": {"source": ELSEWHERE_SOURCE, "figures": {m: v for (_, m), v in ELSEWHERE.items()}},
        "args": vars(args),
        "command": command,
        "per_process": per_process,  # each round's figures, in round order
    }
    if not args.no_layout_check:
        wait_for_quiet(max_load=args.max_load, max_wait=args.max_wait)
        extra["layout_check"] = run_isolated("bench_tokenizer", "layout_check", {"threads": args.threads}, timeout=3600)
        print(json.dumps(extra["layout_check"], indent=1), flush=True)
    if args.compile:
        wait_for_quiet(max_load=args.max_load, max_wait=args.max_wait)
        extra["compile"] = run_isolated("bench_tokenizer", "measure_compile", {"threads": args.threads}, timeout=3600)
        print(extra["compile"], flush=True)
    write_results(args.name, title=TITLE, rows=rows, columns=COLUMNS, notes=_notes(extra), extra=extra)
    if args.profile:
        text = run_isolated("bench_tokenizer", "profile_train_step", {"threads": args.threads}, timeout=3600)
        path = RESULTS_DIR / f"{args.name}_profile.txt"
        path.write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
