"""Generation speed at L = 256 with the LlamaGen-B size (random weights): vanilla AR, RandAR, MaskGIT, ToMe+MaskGIT.

The speed columns of MergeVQ's generation table, at a size where the methods' costs differ: a 16×16 grid (L = 256
positions, the G+R tokenizer's grid at 256²), the ``B`` preset (12 blocks, width 768, 111M parameters with a plain
head over 2^14 codes), 1,000 classes. Every method runs the real ``Generator.generate`` with a shared trunk (the same
weight tensors), KV cache where the method has one, no guidance:

* ``AR`` — raster order, L = 256 tokens, one token per forward pass (256 passes).
* ``RandAR`` K = 144, T = 64 — the MergeVQ (G+R) setting: 144 merged tokens in 64 parallel-decoding passes.
* ``RandAR`` K = 256, T = 88 — the MergeVQ (G) setting (all 256 positions, the paper's 88 passes).
* ``MaskGIT`` T = 12, and ToMe+MaskGIT with r = 0.25 and 0.5 of the tokens merged inside every block.

Output heads are re-initialised to N(0, 0.02) so that the logits are not uniform. Methods run in rotating order inside
each round (a change of load on a shared machine hits all alike); a method's figure is its median over rounds, and the
"vs AR" ratios are medians of per-round ratios against AR measured in the same round.

The tokenizer side is timed in the same run on a randomly initialised ``gr-d64`` (256², L = 256): decoding a batch with
the identity assignment (AR, MaskGIT, RandAR at K = L) and with the learned Source Recovery predicting where K = 144
tokens go (RandAR at K = 144). End-to-end images/s = images / (generator seconds + that decode's seconds).

    .venv/bin/python benchmarks/bench_generation_speed.py             # batch 1 (2 rounds), 16 (1), ~20 min, 1 thread
    .venv/bin/python benchmarks/bench_generation_speed.py --quick     # the tiny preset on an 8×8 grid (smoke test)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from mergevq import MergeVQ  # noqa: E402
from mergevq.generator import Generator  # noqa: E402

# key -> (label, kind, K (None: all L), decoding passes T (None: the kind's own), ToMe ratio)
METHODS: dict[str, tuple[str, str, int | None, int | None, float]] = {
    "ar": ("vanilla AR", "ar", None, None, 0.0),
    "randar-144": ("RandAR K=144, T=64 (MergeVQ G+R)", "randar", 144, 64, 0.0),
    "randar-256": ("RandAR K=256, T=88 (MergeVQ G)", "randar", 256, 88, 0.0),
    "maskgit": ("MaskGIT T=12", "maskgit", None, 12, 0.0),
    "tome-0.25": ("ToMe+MaskGIT r=0.25, T=12", "maskgit", None, 12, 0.25),
    "tome-0.5": ("ToMe+MaskGIT r=0.5, T=12", "maskgit", None, 12, 0.5),
}
TARGET = 2.5  # RandAR K=144, T=64 vs AR images/s at batch 16 (the paper's table implies 3.0 vs 0.3 imgs/s)


def build(*, side: int, preset: str, bits: int, classes: int, seed: int = 0) -> dict[str, Generator]:
    task = dict(codebook_bits=bits, factorized_bits=None, grid=(side, side), num_classes=classes)
    torch.manual_seed(seed)
    ar = Generator.from_preset(preset, kind="ar", **task)
    for head in ar.codes.heads:
        torch.nn.init.normal_(head.weight, std=0.02)
    models = {"ar": ar}
    levels = tuple(sorted({_scale(k, None, side=side)[0] for _, kind, k, _, _ in METHODS.values() if kind == "randar"}))
    randar = Generator.from_preset(preset, kind="randar", merge_levels=levels, **task)
    maskgit = Generator.from_preset(preset, kind="maskgit", **task)
    for model in (randar, maskgit):  # the same weight tensors as AR: only the scheme differs
        model.trunk, model.codes, model.class_embedding = ar.trunk, ar.codes, ar.class_embedding
    models.update(randar=randar, maskgit=maskgit)
    for model in models.values():
        model.eval()
    return models


def _scale(k: int | None, t: int | None, *, side: int) -> tuple[int | None, int | None]:
    """RandAR's K and T are set for L = 256; on another grid keep their ratios to L."""
    if side == 16:
        return k, t
    length = side * side
    scaled = [None if v is None else max(1, round(v * length / 256)) for v in (k, t)]
    return scaled[0], scaled[1]


def token_forwards(key: str, *, side: int) -> int:
    """Tokens the trunk processes per image (what a compute-bound CPU pays for, unlike a latency-bound GPU)."""
    _, kind, k, t, ratio = METHODS[key]
    length = side * side
    if kind == "ar":
        return length  # [cls, x_0 … x_{L-2}], one token per pass after the prefill
    if kind == "randar":
        k, _ = _scale(k, t, side=side)
        return 2 * (k or length) + 1  # [cls, M_K, P_1, x_1, …, P_K]
    return t * (length - int(ratio * length) + 1)  # MaskGIT: T full passes over [cls] + L (ToMe: fewer per block)


def run_method(key: str, models: dict[str, Generator], *, batch: int, side: int, seed: int) -> dict[str, Any]:
    _, kind, k, t, ratio = METHODS[key]
    if kind == "randar":  # MaskGIT's passes do not depend on L
        k, t = _scale(k, t, side=side)
    model = models[kind]
    labels = torch.arange(batch) % model.config.num_classes
    rng = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(labels=labels, num_tokens=k, steps=t, tome_ratio=ratio, generator=rng)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "passes": int(out.stats.forward_passes), "indices": out.indices}


def decode_seconds(tokenizer: MergeVQ, *, batch: int, num_tokens: int, seed: int) -> float:
    """One decode of ``batch`` random K-token images; K < L goes through the learned Source Recovery."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, 2**tokenizer.config.codebook_bits, (batch, num_tokens), generator=g)
    start = time.perf_counter()
    with torch.inference_mode():
        if num_tokens == tokenizer.num_tokens_full:
            tokenizer.decode(indices, torch.arange(num_tokens).expand(batch, -1))
        else:
            tokenizer.decode(indices)  # the Source Recovery predicts the assignment
    return time.perf_counter() - start


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.quick:
        side, preset, bits, classes, tok_preset = 8, "tiny", 10, 10, "tiny-32"
    else:
        side, preset, bits, classes, tok_preset = 16, "B", 14, 1000, "gr-d64"
    models = build(side=side, preset=preset, bits=bits, classes=classes, seed=args.seed)
    torch.manual_seed(args.seed)
    tokenizer = MergeVQ.from_preset(tok_preset, codebook_bits=bits).eval()
    length = side * side
    merged = _scale(144, None, side=side)[0]
    rows = []
    for batch, rounds in zip(args.batches, args.rounds, strict=True):
        per_round: dict[str, list[float]] = {key: [] for key in METHODS}
        ratios: dict[str, list[float]] = {key: [] for key in METHODS}
        passes: dict[str, int] = {}
        decode = {"full": [], "recovery": []}
        for r in range(rounds):
            order = list(METHODS)[r % len(METHODS) :] + list(METHODS)[: r % len(METHODS)]
            times = {}
            for key in order:
                out = run_method(key, models, batch=batch, side=side, seed=args.seed + r)
                times[key] = out["seconds"]
                passes[key] = out["passes"]
                per_round[key].append(out["seconds"])
                print(f"batch {batch} round {r}: {key} {out['seconds']:.2f} s, {out['passes']} passes", flush=True)
            for key in METHODS:
                ratios[key].append(times["ar"] / times[key])
            decode["full"].append(decode_seconds(tokenizer, batch=batch, num_tokens=length, seed=r))
            decode["recovery"].append(decode_seconds(tokenizer, batch=batch, num_tokens=merged, seed=r))
        dec_full, dec_rec = statistics.median(decode["full"]), statistics.median(decode["recovery"])
        for key, (label, kind, k, _, _) in METHODS.items():
            gen = statistics.median(per_round[key])
            k_eff = _scale(k, None, side=side)[0]
            dec = dec_rec if kind == "randar" and k_eff is not None and k_eff < length else dec_full
            rows.append(
                {
                    "method": label,
                    "batch": batch,
                    "tokens": k_eff or length,
                    "passes/image": passes[key],
                    "token-forwards/image": token_forwards(key, side=side),
                    "generator images/s": batch / gen,
                    "vs AR (generator)": statistics.median(ratios[key]),
                    "decode s/batch": dec,
                    "end-to-end images/s": batch / (gen + dec),
                    "seconds (median)": gen,
                    "rounds": rounds,
                }
            )
        ar_e2e = next(r for r in rows if r["batch"] == batch and r["method"] == METHODS["ar"][0])["end-to-end images/s"]
        for row in rows:
            if row["batch"] == batch:
                row["vs AR (end to end)"] = row["end-to-end images/s"] / ar_e2e
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument(
        "--rounds", type=int, nargs="+", default=[2, 1], help="timed rounds for each batch size (methods rotate)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny preset on an 8×8 grid (smoke test)")
    parser.add_argument("--name", default=None, help="results name (default generation_speed[_quick])")
    args = parser.parse_args(argv)
    if len(args.rounds) != len(args.batches):
        parser.error(f"--rounds needs one value per batch size ({len(args.batches)}), got {args.rounds}")
    torch.set_num_threads(args.threads)
    rows = measure(args)
    columns = [
        "method", "batch", "tokens", "passes/image", "token-forwards/image", "generator images/s", "vs AR (generator)",
        "decode s/batch",
        "end-to-end images/s", "vs AR (end to end)",
    ]  # fmt: skip
    b16 = [r for r in rows if r["batch"] == max(args.batches)]
    randar = next((r for r in b16 if r["method"] == METHODS["randar-144"][0]), None)
    verdict = ""
    if randar is not None and not args.quick:
        met = randar["vs AR (end to end)"] >= TARGET
        verdict = (
            f"Target (RandAR K=144, T=64 ≥ {TARGET}× vanilla AR images/s end to end at batch {max(args.batches)}): "
            f"{randar['vs AR (end to end)']:.2f}× ({randar['vs AR (generator)']:.2f}× for the generator alone) — "
            f"{'met' if met else 'missed'}."
        )
    notes = f"""
{"Quick smoke test: the tiny preset on an 8×8 grid, K and T scaled by L/256." if args.quick else ""}
Random weights, {args.threads} thread(s) on the CPU, {args.rounds} rounds for batch sizes {args.batches} (medians;
ratios are medians of per-round ratios against AR in the same round). passes/image: sequential transformer forward
passes of one generation call (a prefill counts as one). token-forwards/image: tokens the transformer processes per
image (AR: L; RandAR: 2K + 1; MaskGIT: T·(L + 1), with ToMe T·((1 − r)·L + 1) inside the blocks): a compute-bound CPU
pays per token, a latency-bound GPU per pass. decode s/batch: the randomly initialised tokenizer decoding
the batch (identity assignment at K = L; learned Source Recovery + decoder at K = 144).

{verdict}

Command: `{" ".join([".venv/bin/python", "benchmarks/bench_generation_speed.py", *(argv or sys.argv[1:])])}`
"""
    name = args.name or ("generation_speed_quick" if args.quick else "generation_speed")
    write_results(
        name,
        title="Generation speed at L = 256, LlamaGen-B size, random weights (CPU)",
        rows=rows,
        columns=columns,
        notes=notes,
        extra={"args": vars(args)},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
