"""``mergevq benchmark``: tokenizer throughput (encode, decode, both, training step) at each K, as JSON + a table."""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mergevq.commands.common import (
    CommandError,
    HelpFormatter,
    add_device_argument,
    check_num_tokens,
    check_output_file,
    guarded,
    load_model,
    positive_int,
    resolve_device,
)
from mergevq.commands.evaluate import command_line
from mergevq.eval.report import benchmark_table, save_result
from mergevq.eval.speed import Timing, machine_info, peak_memory_mb, reset_peak_memory, time_callable
from mergevq.losses.tokenizer_loss import LossWeights
from mergevq.tokenizer.model import MergeVQ

__all__ = ["default_num_tokens", "register"]

COMMAND = "benchmark"

_DESCRIPTION = """\
Time the tokenizer at each K on a fixed batch and write medians (with min/max) to JSON:
  encode         images → K merged tokens (ToMe encoder + LFQ), inference mode
  decode         K tokens + assignment → images, inference mode
  encode+decode  both, one call
  train step     forward (with the LFQ entropy/commitment and source-recovery losses) + backward + AdamW step,
                 on L1 reconstruction + the weighted quantizer terms; LPIPS, discriminator and teacher alignment
                 are left out (they time other networks)
Each figure is the median of --repeats calls after --warmup untimed ones; images/s = batch / time.
The inputs are uniform noise: the amount of work does not depend on image content.

Generation speed is not measured: the stage-2 generators (AR, MergeAR, RandAR) are not part of this
package yet. On shared machines, compare figures measured in the same run, and set
MALLOC_TRIM_THRESHOLD_=1000000000 MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TOP_PAD_=1000000000
(recorded in the JSON as machine.malloc_env) to stop glibc from returning memory between iterations.
"""

_EXAMPLES = """\
examples:
  mergevq benchmark --preset tiny-32 --output results/speed_tiny32.json
  mergevq benchmark --preset gr-d64 --batch-size 2 --num-tokens 144 256 --repeats 3 --output results/speed_d64.json
  mergevq benchmark --model runs/tiny32/export --device cuda --precision bf16 --batch-size 64 --output speed.json
"""


def default_num_tokens(*, model: MergeVQ) -> list[int]:
    """A sweep from heavy merging to none: L/8, L/4, the model's default K and L."""
    full = model.config.num_tokens_full
    return sorted({max(1, full // 8), max(1, full // 4), model.config.default_num_tokens, full})


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        COMMAND,
        help="tokenizer speed at each K: encode, decode, encode+decode images/s and training-step time",
        description=_DESCRIPTION,
        epilog=_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="DIR", help="model directory written by save_pretrained / training export")
    source.add_argument("--preset", metavar="NAME", help="a randomly initialised preset (speed does not need weights)")
    parser.add_argument("--batch-size", metavar="N", type=positive_int, default=8, help="images per call")
    parser.add_argument(
        "--num-tokens",
        metavar="K",
        type=positive_int,
        nargs="+",
        default=None,
        help="K values (default: L/8, L/4, the model's default K and L)",
    )
    parser.add_argument("--repeats", metavar="N", type=positive_int, default=5, help="timed calls per figure")
    parser.add_argument("--warmup", metavar="N", type=int, default=2, help="untimed calls before timing")
    parser.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 runs the model under autocast"
    )
    parser.add_argument("--threads", metavar="N", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-train", action="store_true", help="do not time the training step")
    parser.add_argument("--seed", metavar="N", type=int, default=0, help="seed of the inputs and preset weights")
    parser.add_argument("--output", metavar="FILE.json", required=True, help="where to write the results")
    add_device_argument(parser)
    parser.set_defaults(func=run, _command=COMMAND)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _train_step(model: MergeVQ, images: Tensor, *, num_tokens: int, device: torch.device, precision: str):
    """A closure doing one optimisation step of ``model`` (a private copy) on ``images``."""
    weights = LossWeights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with _autocast(device, precision):
            out = model(images, num_tokens=num_tokens)
            losses = out.losses
            loss = F.l1_loss(out.reconstruction.float(), images)
            loss = loss + weights.entropy * losses["entropy"] + weights.commitment * losses["commitment"]
            if "source_recovery" in losses:
                loss = loss + weights.source_recovery * losses["source_recovery"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _measure(fn: Callable[[], object], args: argparse.Namespace, device: torch.device) -> Timing:
    return time_callable(fn, warmup=args.warmup, repeats=args.repeats, device=device)


def _run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.warmup < 0:
        raise CommandError(f"--warmup must be >= 0, got {args.warmup}")
    check_output_file(args.output)  # before the work, not after it
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load_model(model_dir=args.model, preset=args.preset, device=device, seed=args.seed)
    config = model.config
    ks = check_num_tokens(args.num_tokens or default_num_tokens(model=model), model=model)
    generator = torch.Generator().manual_seed(args.seed)
    size = config.image_size
    images = (torch.rand(args.batch_size, 3, size, size, generator=generator) * 2 - 1).to(device)
    trainee = None if args.skip_train else copy.deepcopy(model).train()  # optimizer steps must not touch `model`
    batch = args.batch_size

    rows: list[dict[str, Any]] = []
    for k in ks:
        print(f"mergevq {COMMAND}: K={k} ...", file=sys.stderr, flush=True)
        reset_peak_memory(device)
        phases: dict[str, Any] = {}
        with torch.inference_mode(), _autocast(device, args.precision):
            encoded = model.encode(images, num_tokens=k)
            timings = {
                "encode": _measure(lambda k=k: model.encode(images, num_tokens=k), args, device),
                "decode": _measure(lambda e=encoded: model.decode(e), args, device),
                "encode_decode": _measure(lambda k=k: model.decode(model.encode(images, num_tokens=k)), args, device),
            }
        if trainee is not None:
            step = _train_step(trainee, images, num_tokens=k, device=device, precision=args.precision)
            timings["train_step"] = _measure(step, args, device)
        for name, timing in timings.items():
            phases[name] = timing.to_dict(items=batch)
        rows.append({"num_tokens": k, "merged_tokens": encoded.num_tokens, "phases": phases, **peak_memory_mb(device)})

    payload = {
        "kind": "benchmark",
        "command": command_line(args),
        "model": {
            "source": args.model if args.model else f"preset {args.preset}",
            "preset": config.name,
            "weights": "random (preset, untrained)" if args.preset is not None else "pretrained",
            "parameters": model.parameter_counts(),
            "image_size": size,
            "num_tokens_full": config.num_tokens_full,
            "codebook_bits": config.codebook_bits,
        },
        "settings": {
            "batch_size": batch,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "device": str(device),
            "precision": args.precision,
            "image_size": size,
            "threads": torch.get_num_threads(),
        },
        "notes": [
            "inputs are uniform noise in [-1, 1]; the work done does not depend on image content",
            "train step = forward + backward + AdamW step with L1 + entropy + commitment + source-recovery losses "
            "(no LPIPS, discriminator or teacher alignment)",
            "generation speed is not measured: the stage-2 generators are not part of this package yet",
        ],
        "rows": rows,
        "timings": {"command_total": time.perf_counter() - start},
        "machine": machine_info(device=device),
    }
    path = save_result(args.output, payload)
    print(benchmark_table(payload))
    print(f"wrote {path}")
    return 0


run = guarded(COMMAND, _run)
