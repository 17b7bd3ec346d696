"""``mergevq encode``: turn an image folder into a stage-2 token file (indices, assignments, labels, metadata).

Several K per file: ``--num-tokens 16 32 64`` stores one indices/assignment pair per K next to one label vector, so
a generator can train with K drawn per step from a single file per split. Images are decoded from disk once; the
encoder runs once per K on each batch (merging depends on K, so nothing is shared between K).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from mergevq.commands.common import (
    CommandError,
    HelpFormatter,
    add_device_argument,
    check_num_tokens,
    check_output_file,
    guarded,
    load_model,
    one_line_skip_warnings,
    positive_int,
    progress,
    resolve_device,
)
from mergevq.data.images import ImageDataset, make_loader
from mergevq.data.tokens import save_tokens
from mergevq.data.transforms import eval_transform

__all__ = ["register", "run"]

COMMAND = "encode"

_EXAMPLES = """\
examples:
  mergevq encode --model runs/tiny32/export --data data/cifar10/train --num-tokens 16 32 64 \\
      --output tok/train.safetensors
  mergevq encode --model runs/tiny32/export --data data/cifar10/test --num-tokens 16 32 64 \\
      --output tok/val.safetensors --split-name val --batch-size 256 --num-workers 8

The file holds labels [N] (-1 for a flat folder) and, for every K given, indices_k{K} [N,K] and assignment_k{K}
[N,L] (merged token of each grid position), in the dataset's sorted order. Images are resized (shorter side) and
center-cropped to the model's image size, decoded once and encoded once per K. Unreadable files are skipped with a
warning and counted in the metadata.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        COMMAND,
        help="encode an image folder into a token file for stage-2 training",
        description=(
            "Encode every image under --data with the MergeVQ tokenizer at each K merged tokens given and write the\n"
            "codebook indices and the assignment of each grid position (one pair per K) and the class labels to one\n"
            "safetensors token file."
        ),
        epilog=_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", metavar="DIR", required=True, help="model directory written by save_pretrained")
    parser.add_argument("--data", metavar="DIR", required=True, help="ImageFolder (class sub-folders) or flat folder")
    parser.add_argument(
        "--num-tokens",
        metavar="K",
        type=int,
        nargs="+",
        required=True,
        help="merged tokens per image, each in [1, L]; several values store one entry per K in the same file",
    )
    parser.add_argument("--output", metavar="FILE", required=True, help="token file to write (.safetensors)")
    parser.add_argument("--batch-size", metavar="N", type=positive_int, default=64, help="images encoded at once")
    parser.add_argument(
        "--num-workers",
        metavar="N",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="data-loading worker processes (0 decodes in the main process)",
    )
    parser.add_argument(
        "--max-images",
        metavar="N",
        type=positive_int,
        default=None,
        help="an evenly strided subset of N images, every class kept (default: all)",
    )
    parser.add_argument(
        "--split-name", metavar="NAME", default=None, help="split recorded in the metadata (default: the folder name)"
    )
    add_device_argument(parser)
    parser.set_defaults(func=run)


def _run(args: argparse.Namespace) -> int:
    if args.num_workers < 0:
        raise CommandError(f"--num-workers must be >= 0, got {args.num_workers}")
    check_output_file(args.output)  # before the work, not after it
    device = resolve_device(args.device)
    model = load_model(model_dir=args.model, device=device)
    config = model.config
    ks = sorted(check_num_tokens(args.num_tokens, model=model))
    root = Path(args.data).expanduser()
    try:
        dataset = ImageDataset(root, transform=eval_transform(config.image_size), max_images=args.max_images)
    except (OSError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    loader = make_loader(
        dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers, seed=0, drop_last=False
    )

    # With no shuffle, row p of the stream is sample p. The dataset replaces an unreadable sample by the next readable
    # one (returning that one's index), so a row whose index differs from its position is a duplicate: drop it.
    indices: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    assignments: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    labels, keep = [], []
    skipped: list[str] = []
    position = 0
    try:
        with torch.inference_mode(), one_line_skip_warnings(COMMAND):
            for batch in progress(loader, total=len(loader), desc=COMMAND, unit="batch"):
                images = batch["image"].to(device, non_blocking=True)  # decoded once, encoded once per K
                for k in ks:
                    encoded = model.encode(images, num_tokens=k)
                    indices[k].append(encoded.indices.cpu())
                    assignments[k].append(encoded.assignment.cpu())
                labels.append(batch["label"].cpu())
                for returned in batch["index"].tolist():
                    ok = returned == position
                    keep.append(ok)
                    if not ok:
                        skipped.append(dataset.samples[position][0].relative_to(root).as_posix())
                    position += 1
    except RuntimeError as exc:
        if "could be decoded" in str(exc):  # every file is unreadable (the text may carry a worker's traceback)
            raise CommandError(f"none of the {len(dataset)} image files under {root} could be decoded", code=1) from exc
        raise
    mask = torch.tensor(keep, dtype=torch.bool)
    entries = {k: (torch.cat(indices[k])[mask], torch.cat(assignments[k])[mask]) for k in ks}
    labels_n = torch.cat(labels)[mask]

    grid = (config.grid_size, config.grid_size)
    meta: dict[str, Any] = {
        "tokenizer": config.name,
        "tokenizer_config": config.to_dict(),
        "model_dir": str(Path(args.model).expanduser().resolve()),
        "num_tokens": ks,
        "num_positions": config.num_tokens_full,
        "grid": list(grid),
        "codebook_bits": config.codebook_bits,
        "vocab_size": 2**config.codebook_bits,
        "image_size": config.image_size,
        "transform": "resize shorter side (bilinear) + center crop",
        "dataset_root": str(root.resolve()),
        "split": args.split_name or root.resolve().name,
        "class_names": list(dataset.classes),
        "num_classes": len(dataset.classes),
        "num_images": int(labels_n.shape[0]),
        "max_images": args.max_images,
        "num_skipped": len(skipped),
        "skipped_files": skipped,
    }
    try:
        path = save_tokens(args.output, entries=entries, labels=labels_n, meta=meta)
    except OSError as exc:
        raise CommandError(f"cannot write token file {args.output}: {exc}", code=1) from exc
    note = f"; skipped {len(skipped)} unreadable file(s)" if skipped else ""
    k_text = ",".join(str(k) for k in ks)
    print(f"wrote {meta['num_images']} image(s) x K={k_text} tokens (L={config.num_tokens_full}) to {path}{note}")
    return 0


run = guarded(COMMAND, _run)
