"""Token merging over a 12-layer schedule: assignment tracking vs. a dense one-hot source matrix.

All methods run the same bipartite matching on the same metrics and produce the same tokens and partition (checked
before timing):

* ``assignment`` — ``mergevq.nn.tome.merge_step``: the source is an int64 ``[B, L]`` group index per position.
* ``dense S`` — the straightforward baseline, written here: the same token merge, plus a one-hot source ``[B, N, L]``
  merged each layer by ``scatter_reduce(amax)`` over the rows merged together, with the raster order of the kept
  tokens read off ``S`` (first nonzero column of each row).
* ``dense S + wavg`` — as ``dense S``, with tokens averaged the classic way, ``Σ s·x / Σ s`` (scatter-sum).

Run:  MALLOC_TRIM_THRESHOLD_=1000000000 MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TOP_PAD_=1000000000 \\
      .venv/bin/python benchmarks/bench_merge.py [--repeats 15] [--threads 1] [--device cpu]
Each case runs in a fresh process (``run_isolated``, which also sets the glibc variables).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_isolated, time_fn, write_results  # noqa: E402

from mergevq.nn.tome import init_merge_state, merge_schedule, merge_step, source_matrix  # noqa: E402

# (name, L, K): G+R / R at 256 -> 144 and G at 1024 -> 256, 12 layers, "linear" schedule.
CASES = [("G+R 256->144", 256, 144), ("G 1024->256", 1024, 256)]
NUM_LAYERS = 12


def _inputs(*, num_tokens: int, target: int, batch: int, dim: int, metric_dim: int, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    schedule = merge_schedule(num_tokens=num_tokens, target=target, num_layers=NUM_LAYERS, kind="linear")
    tokens = torch.randn(batch, 1 + num_tokens, dim, generator=gen)
    metrics, count = [], 1 + num_tokens
    for r in schedule:  # random keys per layer, shaped for that layer's token count
        metrics.append(torch.randn(batch, count, metric_dim, generator=gen).to(device))
        count -= r
    return tokens.to(device), metrics, schedule


def run_assignment(tokens, metrics, schedule):
    state = init_merge_state(tokens, has_cls=True)
    for metric, r in zip(metrics, schedule):
        state = merge_step(state, metric=metric, r=r)
    return state.tokens, state.size, state.assignment


def _match(metric, r):
    """The same bipartite matching as merge_step, op for op: (src, dst) ``[B, r]`` indices among the non-CLS tokens."""
    metric_BNc = F.normalize(metric[:, 1:], dim=-1)
    scores = torch.bmm(metric_BNc[:, 0::2], metric_BNc[:, 1::2].transpose(1, 2))
    src_a = scores.amax(dim=-1).argsort(dim=-1, descending=True, stable=True)[:, :r]
    dst_b = _rows(scores, src_a).max(dim=-1).indices  # argmax of the chosen rows only
    return 2 * src_a, 2 * dst_b + 1


def _rows(x_BRC, rows_BS):
    """``x[b, rows[b, s]]`` as one index_select on the flattened rows (fast row copies)."""
    batch, num_rows, channels = x_BRC.shape
    flat_rows = (rows_BS + num_rows * torch.arange(batch, device=rows_BS.device).unsqueeze(1)).flatten()
    return x_BRC.reshape(batch * num_rows, channels).index_select(0, flat_rows).view(batch, -1, channels)


def _dense_step(x_BTC, size_BT, source_BNL, metric, r, *, wavg):
    batch, num_tokens, channels = x_BTC.shape
    n, num_positions = num_tokens - 1, source_BNL.shape[-1]
    src, dst = _match(metric, r)

    # Source: the rows merged together take their elementwise max; the kept rows' order is read off S.
    row_src, row_dst = (i.unsqueeze(-1).expand(-1, -1, num_positions) for i in (src, dst))
    source_BNL.scatter_reduce_(1, row_dst, source_BNL.gather(1, row_src), reduce="amax")
    first = source_BNL.argmax(dim=-1).scatter(1, src, num_positions)  # first nonzero column of each row
    order = first.argsort(dim=1)[:, : n - r]
    source_BNL = _rows(source_BNL, order)

    rows_out = torch.cat([torch.zeros_like(order[:, :1]), order + 1], dim=1)
    size_total = size_BT.scatter_add(1, dst + 1, size_BT.gather(1, src + 1))
    if wavg:  # Σ s·x / Σ s over the merged rows
        weighted = x_BTC * size_BT.unsqueeze(-1)
        weighted.scatter_add_(1, (dst + 1).unsqueeze(-1).expand(-1, -1, channels), _rows(weighted, src + 1))
        tokens_out = _rows(weighted / size_total.unsqueeze(-1), rows_out)
    else:  # the token merge of merge_step, op for op: x_dst + Σ (s_src / s_total)(x_src − x_dst) on flat rows
        weight = size_BT.gather(1, src + 1) / size_total.gather(1, dst + 1)
        flat = x_BTC.reshape(batch * num_tokens, channels)
        base = num_tokens * torch.arange(batch, device=src.device).unsqueeze(1)
        delta = flat.index_select(0, (src + 1 + base).flatten()).sub_(flat.index_select(0, (dst + 1 + base).flatten()))
        delta.mul_(weight.flatten().unsqueeze(-1))
        new_index = torch.empty_like(first).scatter_(
            1, order, torch.arange(n - r, device=order.device).expand(batch, -1)
        )
        dst_out = new_index.gather(1, dst) + 1 + (num_tokens - r) * torch.arange(batch, device=src.device).unsqueeze(1)
        tokens_out = flat.index_select(0, (rows_out + base).flatten()).index_add_(0, dst_out.flatten(), delta)
        tokens_out = tokens_out.view(batch, num_tokens - r, channels)
    return tokens_out, size_total.gather(1, rows_out), source_BNL


def run_dense(tokens, metrics, schedule, *, wavg=False):
    batch, num_tokens, _ = tokens.shape
    size = torch.ones(batch, num_tokens, device=tokens.device)
    source = torch.eye(num_tokens - 1, device=tokens.device).expand(batch, -1, -1).contiguous()
    for metric, r in zip(metrics, schedule):
        tokens, size, source = _dense_step(tokens, size, source, metric, r, wavg=wavg)
    return tokens, size, source


def run_dense_wavg(tokens, metrics, schedule):
    return run_dense(tokens, metrics, schedule, wavg=True)


def measure(
    *,
    num_tokens: int,
    target: int,
    batch: int = 8,
    dim: int = 768,
    metric_dim: int = 64,
    repeats: int = 15,
    rounds: int = 3,
    threads: int = 1,
    device: str = "cpu",
) -> dict:
    """Check that the methods agree, then time each whole 12-layer schedule (median ms over rounds)."""
    torch.set_num_threads(threads)
    tokens, metrics, schedule = _inputs(
        num_tokens=num_tokens, target=target, batch=batch, dim=dim, metric_dim=metric_dim, device=device
    )
    methods = {"assignment": run_assignment, "dense_S": run_dense, "dense_S_wavg": run_dense_wavg}
    with torch.no_grad():
        ours = run_assignment(tokens, metrics, schedule)
        assert ours[0].shape == (batch, 1 + target, dim)
        for name in ("dense_S", "dense_S_wavg"):
            dense = methods[name](tokens, metrics, schedule)
            assert torch.equal(source_matrix(ours[2], num_groups=target), dense[2]), f"{name}: partitions differ"
            assert torch.equal(ours[1], dense[1]), f"{name}: sizes differ"
            torch.testing.assert_close(ours[0], dense[0], rtol=1e-4, atol=1e-4)

    def timed(fn):
        def call():
            with torch.no_grad():
                fn(tokens, metrics, schedule)
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        return call

    times = {name: [] for name in methods}
    for _ in range(rounds):  # alternate so that drift on a shared machine hits every method alike
        for name, fn in methods.items():
            times[name].append(time_fn(timed(fn), warmup=2, repeats=repeats)["median_ms"])
    row = {"L": num_tokens, "K": target, "B": batch, "C": dim, "schedule": " ".join(map(str, schedule))}
    for name, ms in times.items():
        row[f"{name}_ms"] = statistics.median(ms)
    for name in ("dense_S", "dense_S_wavg"):
        ratios = [d / o for d, o in zip(times[name], times["assignment"])]
        row[f"speedup_vs_{name}"] = statistics.median(ratios)
        row[f"speedup_vs_{name}_min"] = min(ratios)
    row.update(threads=threads, device=device)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default="merge", help="results file stem under benchmarks/results/")
    args = parser.parse_args(argv)
    rows = []
    for case, num_tokens, target in CASES:
        kwargs = dict(num_tokens=num_tokens, target=target, batch=args.batch, repeats=args.repeats)
        kwargs.update(rounds=args.rounds, threads=args.threads, device=args.device)
        rows.append({"case": case, **run_isolated("bench_merge", "measure", kwargs)})
    columns = ["case", "B", "C", "assignment_ms", "dense_S_ms", "dense_S_wavg_ms", "speedup_vs_dense_S"]
    columns += ["speedup_vs_dense_S_min", "speedup_vs_dense_S_wavg", "threads", "device"]
    write_results(
        args.name,
        title="Token merging, 12-layer linear schedule (+CLS): assignment tracking vs dense one-hot source",
        rows=rows,
        columns=columns,
        notes="""
- Whole 12-layer schedule, forward only (no_grad); metric = random keys of dim 64 per layer, the same for all methods.
- `assignment`: `merge_step` (int64 group index per position). `dense_S`: the same matching and token merge, plus a
  one-hot source [B, N, L] merged with `scatter_reduce(amax)` and the raster order read off it. `dense_S_wavg`: as
  `dense_S` with the classic `Σ s·x / Σ s` token average.
- `speedup_vs_X` = X_ms / assignment_ms: median (and min) over alternating rounds, each a median of `repeats` runs.
- All methods are checked to give the same partition, sizes and tokens before timing.
- Reproduce: `.venv/bin/python benchmarks/bench_merge.py` (each case in a fresh process with the glibc env).
""",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
