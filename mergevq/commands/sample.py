"""``mergevq sample``: class-conditional images from a trained generator, decoded by its tokenizer.

Raster kinds (vanilla AR, MergeAR) and MaskGIT write the grid of L codebook indices, which the tokenizer decodes
directly. RandAR writes only the K merged codes; the tokenizer's learned Source Recovery then predicts which positions
each one covers before decoding. Outputs, all in ``--output``:

    samples.npz     ADM-style: ``arr_0`` uint8 [N, H, W, 3] and ``labels`` [N] (what ``mergevq evaluate generator``
                    and the ADM evaluator read)
    grid.png        one row per class (up to 16 images each); ``merge_maps.png`` beside it for MergeAR (the groups read
                    from the duplicate structure of each grid) and RandAR (the groups Source Recovery predicted)
    summary.json    settings, tokens/s and images/s (generator alone and end to end), forward passes per image, peak
                    KV-cache bytes, and the distinct groups per image against the requested K
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mergevq.commands.common import (
    CommandError,
    HelpFormatter,
    add_device_argument,
    check_output_dir,
    guarded,
    load_model,
    positive_int,
    progress,
    resolve_device,
)
from mergevq.data.transforms import to_uint8

__all__ = ["register", "run"]

COMMAND = "sample"

_EXAMPLES = """\
examples:
  mergevq sample --generator runs/cifar10-mergear/export --tokenizer runs/cifar10-gr/export --output samples/mergear \\
      --num-per-class 200 --num-tokens 16 --cfg 2.0
  mergevq sample --generator runs/cifar10-ar/export --tokenizer runs/cifar10-gr/export --output samples/ar \\
      --classes 0 3 5 --num-per-class 8 --top-k 100 --temperature 1.0
  mergevq evaluate generator --samples samples/ar/samples.npz --reference cifar10/test --output fid.json

--num-tokens is the merge instruction of MergeAR and RandAR (one of the K the generator was trained with; default: the
smallest). --steps: RandAR's parallel-decoding passes (default K; the paper uses 64 for K=144 and 88 for K=256) or
MaskGIT's iterations (default: its config). --tome-ratio merges that fraction of tokens inside MaskGIT's blocks.
Sampling settings take one value, or one per bit group of a factorised head (e.g. --top-k 0 100). --seed fixes the
samples: the same command writes the same images on the same machine.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        COMMAND,
        help="sample images from a trained generator (PNG grids, an ADM-style npz, speed and cache figures)",
        description=(
            "Generate class-conditional token grids with a stage-2 generator, decode them with the MergeVQ tokenizer\n"
            "and write samples.npz (for mergevq evaluate generator), PNG grids and a JSON summary. Runs on a CPU."
        ),
        epilog=_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--generator", metavar="DIR", required=True, help="generator directory (save_pretrained)")
    parser.add_argument(
        "--tokenizer", metavar="DIR", required=True, help="the tokenizer whose tokens it was trained on"
    )
    parser.add_argument("--output", metavar="DIR", required=True, help="where to write the samples and summary")
    parser.add_argument(
        "--classes", type=int, nargs="+", default=None, metavar="C", help="class ids to sample (default: every class)"
    )
    parser.add_argument("--num-per-class", type=positive_int, default=8, metavar="N", help="images per class")
    parser.add_argument(
        "--num-tokens", type=positive_int, default=None, metavar="K", help="merge level K (MergeAR, RandAR)"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None, metavar="T", help="decoding passes (RandAR, MaskGIT)"
    )
    parser.add_argument(
        "--tome-ratio", type=float, default=0.0, metavar="R", help="MaskGIT: fraction of tokens merged in each block"
    )
    parser.add_argument("--cfg", type=float, default=1.0, metavar="S", help="classifier-free guidance scale (1: off)")
    parser.add_argument(
        "--cfg-schedule",
        choices=("constant", "linear"),
        default=None,
        help="guidance over the steps: constant S, or linear from --cfg-start to S (default: linear for RandAR, "
        "constant otherwise)",
    )
    parser.add_argument("--cfg-start", type=float, default=1.0, metavar="S0", help="first weight of a linear schedule")
    parser.add_argument("--temperature", type=float, nargs="+", default=[1.0], metavar="T", help="softmax temperature")
    parser.add_argument(
        "--top-k", type=int, nargs="+", default=[0], metavar="K", help="keep the K most likely (0: all)"
    )
    parser.add_argument("--top-p", type=float, nargs="+", default=[1.0], metavar="P", help="nucleus mass (1: all)")
    parser.add_argument("--batch-size", type=positive_int, default=32, metavar="B", help="images per generation call")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole sequence at every step (slow)")
    add_device_argument(parser)
    parser.set_defaults(func=guarded(COMMAND, run))


def _per_group(values: list[Any], *, name: str, groups: int) -> Any:
    if len(values) == 1:
        return values[0]
    if len(values) != groups:
        raise CommandError(f"--{name} takes one value or one per bit group ({groups}), got {len(values)}")
    return tuple(values)


def _load_generator(directory: str, *, device: torch.device) -> Any:
    from mergevq.generator import Generator

    path = Path(directory).expanduser()
    if not path.is_dir():
        raise CommandError(f"generator directory not found: {path}")
    if not (path / "config.json").is_file() and (path / "export" / "config.json").is_file():
        raise CommandError(f"{path} is a training run; try --generator {path / 'export'}")
    try:
        model = Generator.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CommandError(f"cannot load the generator in {path}: {exc}") from exc
    return model.to(device).eval()


def _check_pair(generator: Any, tokenizer: Any, *, generator_dir: str, tokenizer_dir: str) -> None:
    """The generator's vocabulary and grid must be the tokenizer's; a pair from two runs fails here, not in decode."""
    from mergevq.data.tokens import check_same_tokenizer

    g = generator.config
    trained_on = {**g.tokenizer, "codebook_bits": g.codebook_bits, "grid": list(g.grid)}
    try:
        check_same_tokenizer(
            trained_on, tokenizer.config, what_a=f"generator {generator_dir}", what_b=f"tokenizer {tokenizer_dir}"
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from exc


def run(args: argparse.Namespace) -> int:
    from mergevq.generator.mergear import groups_from_values
    from mergevq.viz import image_grid, merge_map

    device = resolve_device(args.device)
    output = check_output_dir(args.output)

    generator = _load_generator(args.generator, device=device)
    tokenizer = load_model(model_dir=args.tokenizer, device=device)
    _check_pair(generator, tokenizer, generator_dir=args.generator, tokenizer_dir=args.tokenizer)
    config = generator.config
    classes = list(range(config.num_classes)) if args.classes is None else args.classes
    bad = [c for c in classes if not 0 <= c < config.num_classes]
    if bad:
        raise CommandError(f"--classes {bad} outside [0, {config.num_classes}) for generator {args.generator}")
    num_tokens = args.num_tokens
    if config.kind in ("mergear", "randar"):
        levels = tuple(config.merge_levels)
        num_tokens = min(levels) if num_tokens is None else num_tokens
        if num_tokens not in levels:
            raise CommandError(f"--num-tokens {num_tokens}: generator {args.generator} was trained with K in {levels}")
    elif num_tokens not in (None, config.num_positions):
        raise CommandError(
            f"--num-tokens applies to MergeAR and RandAR; this {config.kind!r} generator samples all L tokens"
        )
    if config.kind == "randar" and getattr(tokenizer, "recovery", None) is None:
        raise CommandError(
            f"tokenizer {args.tokenizer} has no learned Source Recovery, which RandAR needs to place its K tokens"
        )
    if args.steps is not None and config.kind not in ("randar", "maskgit"):
        raise CommandError(f"--steps applies to RandAR and MaskGIT, not to a {config.kind!r} generator")
    if args.tome_ratio and config.kind != "maskgit":
        raise CommandError(f"--tome-ratio applies to MaskGIT, not to a {config.kind!r} generator")
    groups = len(config.factorized_bits) if config.factorized_bits else 1
    sampling = {
        "temperature": _per_group(args.temperature, name="temperature", groups=groups),
        "top_k": _per_group(args.top_k, name="top-k", groups=groups),
        "top_p": _per_group(args.top_p, name="top-p", groups=groups),
    }

    labels_all = torch.tensor([c for c in classes for _ in range(args.num_per_class)], dtype=torch.long)
    rng = torch.Generator(device=device).manual_seed(args.seed)
    height, width = config.grid
    images: list[np.ndarray] = []
    assignments: list[Tensor] = []
    distinct: list[int] = []
    gen_seconds = decode_seconds = 0.0
    passes = 0
    peak_cache = 0
    start = time.perf_counter()
    with progress(total=len(labels_all), desc="sample", unit="img") as bar:
        for first in range(0, len(labels_all), args.batch_size):
            labels = labels_all[first : first + args.batch_size].to(device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = generator.generate(
                    labels=labels,
                    num_tokens=num_tokens,
                    cfg_scale=args.cfg,
                    cfg_schedule=args.cfg_schedule,
                    cfg_start=args.cfg_start,
                    steps=args.steps,
                    tome_ratio=args.tome_ratio,
                    generator=rng,
                    use_cache=not args.no_cache,
                    **sampling,
                )
                t1 = time.perf_counter()
                batch = out.indices.shape[0]
                if out.assignment is None:  # RandAR: Source Recovery predicts where the K tokens go
                    assignment_BL = tokenizer.predict_assignment(out.indices)
                    pixels = tokenizer.decode(out.indices, assignment_BL)
                    groups_BL, counts = assignment_BL, [int(a.unique().numel()) for a in assignment_BL]
                else:  # a raster grid of L codes with the identity assignment: decode it as is
                    pixels = tokenizer.decode(out.indices, out.assignment)
                    counts = [int(c) for c in out.stats.distinct_groups]
                    # MergeAR's merge map: its groups are its repeated codes
                    groups_BL = groups_from_values(out.indices).assignment if config.kind == "mergear" else None
            t2 = time.perf_counter()
            gen_seconds += t1 - t0
            decode_seconds += t2 - t1
            passes += out.stats.forward_passes
            peak_cache = max(peak_cache, int(out.stats.peak_cache_bytes))
            images.append(to_uint8(pixels).permute(0, 2, 3, 1).numpy())  # NHWC, the npz convention
            if groups_BL is not None:
                assignments.append(groups_BL.cpu())
            distinct.extend(counts)
            bar.update(batch)
    total_seconds = time.perf_counter() - start

    arr = np.concatenate(images)
    labels_np = labels_all.numpy()
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "samples.npz", "wb") as handle:  # a file object keeps NumPy from renaming it
        np.savez(handle, arr_0=arr, labels=labels_np)
    per_row = min(args.num_per_class, 16)
    shown = [i for c in range(len(classes)) for i in range(c * args.num_per_class, c * args.num_per_class + per_row)]
    tiles = torch.from_numpy(arr[shown]).permute(0, 3, 1, 2).float() / 127.5 - 1
    image_grid(tiles, nrow=per_row).save(output / "grid.png")
    if assignments:
        all_assignments = torch.cat(assignments)
        maps = [
            torch.from_numpy(np.array(merge_map(all_assignments[i], grid=(height, width), image=tiles[j])))
            for j, i in enumerate(shown)
        ]
        map_tiles = torch.stack(maps).permute(0, 3, 1, 2).float() / 127.5 - 1
        image_grid(map_tiles, nrow=per_row).save(output / "merge_maps.png")

    n = len(arr)
    tokens = n * (num_tokens if config.kind == "randar" else config.num_positions)
    distinct_np = np.asarray(distinct)
    summary = {
        "kind": "samples",
        "command": "mergevq " + " ".join(sys.argv[1:]) if sys.argv[1:2] == [COMMAND] else None,
        "generator": str(args.generator),
        "tokenizer": str(args.tokenizer),
        "generator_kind": config.kind,
        "num_images": n,
        "classes": classes,
        "num_tokens": num_tokens,
        "settings": {
            "cfg": args.cfg,
            "cfg_schedule": args.cfg_schedule,
            "cfg_start": args.cfg_start,
            "steps": args.steps,
            "tome_ratio": args.tome_ratio,
            "seed": args.seed,
            **sampling,
        },
        "use_cache": not args.no_cache,
        "batch_size": args.batch_size,
        "device": device.type,
        "speed": {
            "generator_tokens_per_s": tokens / gen_seconds if gen_seconds > 0 else None,
            "generator_images_per_s": n / gen_seconds if gen_seconds > 0 else None,
            "end_to_end_images_per_s": n / (gen_seconds + decode_seconds),
            "decode_seconds": decode_seconds,
            "generator_seconds": gen_seconds,
            "total_seconds": total_seconds,
            "forward_passes_per_image": passes / max(1, len(range(0, n, args.batch_size))),
        },
        "peak_cache_bytes": peak_cache,
        "distinct_groups": {
            "requested": num_tokens if num_tokens is not None else config.num_positions,
            "mean": float(distinct_np.mean()),
            "min": int(distinct_np.min()),
            "max": int(distinct_np.max()),
            "per_image": distinct,
        },
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    speed = summary["speed"]
    print(
        f"wrote {n} samples to {output / 'samples.npz'} ({speed['end_to_end_images_per_s']:.2f} images/s end to end, "
        f"{distinct_np.mean():.1f} distinct groups per image, peak KV cache {peak_cache / 2**20:.2f} MiB)"
    )
    return 0
