"""``mergevq reconstruct``: encode images at one or more K, decode them, and write panels, PNGs and PSNRs.

For every input ``<stem>`` it writes ``OUTPUT/<stem>.png`` (input | per K: merge map + reconstruction with PSNR),
``OUTPUT/<stem>_k{K}.png`` (the raw reconstruction) and one ``OUTPUT/summary.json`` for the whole run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergevq.commands.common import (
    CommandError,
    HelpFormatter,
    add_device_argument,
    check_num_tokens,
    check_output_dir,
    guarded,
    load_model,
    positive_int,
    progress,
    resolve_device,
)
from mergevq.data.images import DEFAULT_EXTENSIONS, ImageDecodeError, load_image
from mergevq.data.transforms import ImageTransform, eval_transform, to_uint8_image
from mergevq.eval.metrics import psnr
from mergevq.tokenizer.model import MergeVQ
from mergevq.viz import save_reconstruction_panel

__all__ = ["InputImage", "find_inputs", "register", "run"]

COMMAND = "reconstruct"

_EXAMPLES = """\
examples:
  mergevq reconstruct --model runs/tiny32/export --input photo.jpg --num-tokens 16 36 64 --output recon/
  mergevq reconstruct --model runs/tiny32/export --input val_images/ --num-tokens 36 --output recon/ --max-images 50
  mergevq reconstruct --preset tiny-32 --input photo.jpg --num-tokens 8 64 --output try/   # untrained weights

Every K must lie in [1, L], L being the model's token-grid size (64 for tiny-32). With --size other than the
model's image size, K keeps its ratio to L (K=36 of 64 at 32 px becomes 144 of 256 at 64 px); summary.json records
the number of merged tokens actually used.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        COMMAND,
        help="reconstruct images through K merged tokens and write side-by-side panels with merge maps",
        description=(
            "Encode each image with the MergeVQ tokenizer at every K given, decode it, and write\n"
            "  OUTPUT/<stem>.png       input | merge map + reconstruction (with PSNR) for each K\n"
            "  OUTPUT/<stem>_k{K}.png  the raw reconstruction at K\n"
            "  OUTPUT/summary.json     per-image and mean PSNR for each K, and the skipped files"
        ),
        epilog=_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="DIR", help="model directory written by save_pretrained / training export")
    source.add_argument(
        "--preset", metavar="NAME", help="use a randomly initialised preset instead (for trying the tool; untrained)"
    )
    parser.add_argument(
        "--input", metavar="IMAGE_OR_DIR", required=True, help="an image file, or a folder searched recursively"
    )
    parser.add_argument(
        "--num-tokens",
        metavar="K",
        type=int,
        nargs="+",
        default=None,
        help="merged token counts to reconstruct at, each in [1, L] (default: the model's default K)",
    )
    parser.add_argument("--output", metavar="DIR", required=True, help="folder for panels, PNGs and summary.json")
    add_device_argument(parser)
    parser.add_argument("--batch-size", metavar="N", type=positive_int, default=16, help="images encoded at once")
    parser.add_argument(
        "--max-images", metavar="N", type=positive_int, default=None, help="stop after N readable images (default: all)"
    )
    parser.add_argument(
        "--size",
        metavar="S",
        type=positive_int,
        default=None,
        help="resize the shorter side to S and center-crop S×S (default: the model's image size)",
    )
    parser.add_argument(
        "--no-merge-maps", action="store_true", help="panels show only input and reconstructions, no merge maps"
    )
    parser.set_defaults(func=run)


# ----------------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputImage:
    path: Path
    name: str  # output file stem, unique within the run


def _walk(root: Path) -> list[Path]:
    found = []
    for current, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(
            Path(current, f)
            for f in filenames
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in DEFAULT_EXTENSIONS
        )
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def find_inputs(path: str | Path) -> list[InputImage]:
    """One image file, or every image under a folder (recursive, sorted), each with a unique output stem.

    A stem shared by files in different sub-folders is replaced by the relative path joined with ``_``
    (``cat/001.png`` → ``cat_001``), and a stem that looks like another input's reconstruction (``foo_k16`` next to
    ``foo``) gets a ``-2`` suffix, so no output overwrites another.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return [InputImage(path, path.stem)]
    if not path.is_dir():
        raise CommandError(f"input not found: {path}")
    files = _walk(path)
    if not files:
        raise CommandError(f"no image files ({', '.join(DEFAULT_EXTENSIONS)}) found under {path}")
    stems: dict[str, int] = {}
    for f in files:
        stems[f.stem] = stems.get(f.stem, 0) + 1
    wanted = [f.stem if stems[f.stem] == 1 else "_".join(f.relative_to(path).with_suffix("").parts) for f in files]
    plain = set(wanted)
    out, taken = [], set()
    for f, name in zip(files, wanted):
        base, n = name, 1
        # Taken, or the name of another input's reconstruction: <stem>_k<K>.png (e.g. "foo_k16" next to "foo").
        while name in taken or _is_reconstruction_name(name, plain):
            n += 1
            name = f"{base}-{n}"
        taken.add(name)
        out.append(InputImage(f, name))
    return out


def _is_reconstruction_name(name: str, stems: set[str]) -> bool:
    match = re.fullmatch(r"(.+)_k\d+", name)
    return match is not None and match.group(1) in stems


def _batches(
    inputs: list[InputImage],
    *,
    transform: ImageTransform,
    batch_size: int,
    max_images: int | None,
    skipped: list[dict[str, str]],
) -> Iterator[tuple[list[InputImage], Tensor]]:
    """Decode lazily; unreadable files are reported, recorded in ``skipped`` and left out."""
    items: list[InputImage] = []
    tensors: list[Tensor] = []
    used = 0
    for item in inputs:
        if max_images is not None and used >= max_images:
            break
        try:
            image = transform(load_image(item.path))
        except ImageDecodeError as exc:
            print(f"mergevq {COMMAND}: warning: skipping unreadable image {item.path}: {exc.reason}", file=sys.stderr)
            skipped.append({"input": str(item.path), "reason": exc.reason})
            continue
        items.append(item)
        tensors.append(image)
        used += 1
        if len(items) == batch_size:
            yield items, torch.stack(tensors)
            items, tensors = [], []
    if items:
        yield items, torch.stack(tensors)


# ----------------------------------------------------------------------------------------------------------------------
# Run
# ----------------------------------------------------------------------------------------------------------------------


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no inf; identical images give PSNR = inf


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return math.fsum(finite) / len(finite) if finite else None


@torch.inference_mode()
def _reconstruct_batch(model: MergeVQ, images: Tensor, ks: list[int]) -> dict[int, tuple[Tensor, Tensor, Tensor, int]]:
    """K → (reconstructions [B,3,H,W] clamped, assignment [B,L], PSNR [B], merged tokens used), all on CPU."""
    out = {}
    for k in ks:
        encoded = model.encode(images, num_tokens=k)
        reconstruction = model.decode(encoded).float().clamp(-1, 1)
        values = psnr(reconstruction, images.float())
        out[k] = (reconstruction.cpu(), encoded.assignment.cpu(), values.cpu(), encoded.num_tokens)
    return out


def _run(args: argparse.Namespace) -> int:
    output = check_output_dir(args.output)  # before the work, not after it
    device = resolve_device(args.device)
    inputs = find_inputs(args.input)
    model = load_model(model_dir=args.model, preset=args.preset, device=device)
    config = model.config
    if args.preset is not None:
        print(
            f"mergevq {COMMAND}: notice: preset {args.preset!r} is randomly initialised (untrained weights); "
            "reconstructions show the pipeline, not the method's quality",
            file=sys.stderr,
        )
    ks = check_num_tokens(args.num_tokens or [config.default_num_tokens], model=model)
    size = args.size or config.image_size
    if size % config.downsample:
        raise CommandError(f"--size {size} is not divisible by the model's downsampling factor {config.downsample}")
    grid = (size // config.downsample, size // config.downsample)

    output.mkdir(parents=True, exist_ok=True)
    transform = eval_transform(size)
    skipped: list[dict[str, str]] = []
    records: list[dict[str, Any]] = []
    total = len(inputs) if args.max_images is None else min(len(inputs), args.max_images)
    batches = _batches(
        inputs, transform=transform, batch_size=args.batch_size, max_images=args.max_images, skipped=skipped
    )
    with progress(total=total, desc=COMMAND, unit="img") as bar:
        for items, images in batches:
            results = _reconstruct_batch(model, images.to(device), ks)
            for i, item in enumerate(items):
                record: dict[str, Any] = {
                    "input": str(item.path),
                    "panel": f"{item.name}.png",
                    "reconstructions": {},
                    "psnr": {},
                    "merged_tokens": {},
                }
                for k, (reconstruction, _, values, used) in results.items():
                    to_uint8_image(reconstruction[i]).save(output / f"{item.name}_k{k}.png")
                    record["reconstructions"][str(k)] = f"{item.name}_k{k}.png"
                    record["psnr"][str(k)] = float(values[i])
                    record["merged_tokens"][str(k)] = used
                save_reconstruction_panel(
                    output / f"{item.name}.png",
                    original=images[i].cpu(),
                    reconstructions={k: r[0][i] for k, r in results.items()},
                    assignments=None if args.no_merge_maps else {k: r[1][i] for k, r in results.items()},
                    grid=grid,
                    psnr={k: float(r[2][i]) for k, r in results.items()},
                )
                records.append(record)
            bar.update(len(items))

    if not records:
        raise CommandError(f"none of the {len(skipped)} input file(s) could be read as an image", code=1)
    mean_psnr = {str(k): _mean([r["psnr"][str(k)] for r in records]) for k in ks}
    for record in records:
        record["psnr"] = {k: _finite_or_none(v) for k, v in record["psnr"].items()}
    summary = {
        "model": str(Path(args.model).expanduser()) if args.model else None,
        "preset": config.name,
        "weights": "random (preset)" if args.preset is not None else "pretrained",
        "image_size": size,
        "grid": list(grid),
        "num_positions": grid[0] * grid[1],
        "num_tokens": ks,
        "num_images": len(records),
        "num_skipped": len(skipped),
        "mean_psnr": mean_psnr,
        "images": records,
        "skipped": skipped,
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    for k in ks:
        value = mean_psnr[str(k)]
        shown = "n/a" if value is None else f"{value:.2f} dB"
        print(f"K={k}: mean PSNR {shown} over {len(records)} image(s)")
    note = f", skipped {len(skipped)} unreadable file(s)" if skipped else ""
    print(f"wrote {len(records)} panel(s) and summary.json to {output}{note}")
    return 0


run = guarded(COMMAND, _run)
