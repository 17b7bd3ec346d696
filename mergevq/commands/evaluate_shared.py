"""Pieces shared by the ``mergevq evaluate`` sub-commands: provenance, warnings, data and model loading."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from mergevq.commands.common import (
    CommandError,
    add_device_argument,
    one_line_skip_warnings,
    positive_int,
)
from mergevq.data.images import ImageDataset, make_loader
from mergevq.data.transforms import eval_transform
from mergevq.eval.fid import (
    InceptionFeatures,
)
from mergevq.tokenizer.model import MergeVQ

COMMAND = "evaluate"
FID_MIN_IMAGES = 2048  # below the feature dimension the covariance is singular and FID strongly biased upward
LPIPS_MIN_SIZE = 24  # the shift-tolerant LPIPS needs at least 24×24 inputs

_EXAMPLES = """\
examples:
  mergevq evaluate tokenizer --model runs/tiny32/export --data cifar10/test --num-tokens 16 36 64 \\
      --max-images 1000 --output results/tokenizer.json
  mergevq evaluate generator --samples samples.npz --reference imagenet_val/ --output results/fid.json \\
      --save-reference-stats val_stats.npz
  mergevq evaluate probe --model runs/tiny32/export --train cifar10/train --test cifar10/test \\
      --max-train 5000 --max-test 1000 --output results/probe.json
  mergevq evaluate probe --pixels --train cifar10/train --test cifar10/test \\
      --max-train 5000 --max-test 1000 --output results/probe_pixels.json
"""


# ----------------------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------------------


def command_line(args: argparse.Namespace) -> str:
    """The command as ``mergevq <sub-command> --option value ...`` with every option spelled out (defaults too).

    Rebuilt from the parsed namespace, so it is the same however the command was launched (console script,
    ``python -m mergevq``, tests) and it reproduces the run even if a default changes later.
    """
    parts = ["mergevq", *args._command.split()]
    for dest, value in vars(args).items():
        if dest.startswith("_") or dest in ("func", "command", "evaluate_command") or value is None or value is False:
            continue
        flag = "--" + dest.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag, *(str(v) for v in value)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def _warn(message: str, warnings: list[str]) -> None:
    print(f"mergevq {COMMAND}: warning: {message}", file=sys.stderr)
    warnings.append(message)


def _fid_bias_warning(count: int, what: str, warnings: list[str]) -> None:
    if count < FID_MIN_IMAGES:
        _warn(
            f"FID on {count} {what} images is biased upward; use ≥ 10k for comparisons "
            f"(below {FID_MIN_IMAGES} the 2048-d covariance is singular)",
            warnings,
        )


def _inception(*, weights: str | None, device: torch.device, batch_size: int) -> InceptionFeatures:
    """The FID feature network (a module-level hook so tests can substitute a small network)."""
    try:
        return InceptionFeatures(weights=weights, device=device, batch_size=batch_size)
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        raise CommandError(f"cannot load the FID Inception network: {exc}", code=1) from exc


def _lpips(device: torch.device) -> torch.nn.Module:
    try:
        from mergevq.losses.perceptual import LPIPS

        return LPIPS(variant="shift_tolerant").to(device)
    except (FileNotFoundError, ImportError, RuntimeError) as exc:
        raise CommandError(f"cannot load LPIPS: {exc} (or pass --no-lpips)", code=1) from exc


def _model_info(args: argparse.Namespace, model: MergeVQ) -> dict[str, Any]:
    return {
        "source": str(Path(args.model).expanduser()) if args.model else f"preset {args.preset}",
        "preset": model.config.name,
        "weights": "random (preset, untrained)" if args.preset is not None else "pretrained",
        "parameters": model.parameter_counts(),
        "config": model.config.to_dict(),
    }


def _untrained_notice(args: argparse.Namespace) -> None:
    if args.preset is not None:
        print(
            f"mergevq {COMMAND}: notice: preset {args.preset!r} is randomly initialised (untrained weights); "
            "the metrics check the pipeline, not the method's quality",
            file=sys.stderr,
        )


def _image_dataset(root: str, *, size: int, max_images: int | None, what: str) -> ImageDataset:
    path = Path(root).expanduser()
    try:
        dataset = ImageDataset(path, transform=eval_transform(size), max_images=max_images)
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        raise CommandError(f"{what}: {exc}") from exc
    try:
        # Drop unreadable files now: the dataset would otherwise replace them by their neighbour (a duplicate).
        with one_line_skip_warnings(COMMAND):
            dataset.scan(verify=True, num_threads=4)
    except RuntimeError as exc:
        raise CommandError(f"{what}: {exc}", code=1) from exc
    return dataset


def _loader(dataset: ImageDataset, args: argparse.Namespace):
    return make_loader(
        dataset,
        batch_size=args.batch_size,
        shuffle=False,
        num_workers=args.num_workers,
        seed=0,
        drop_last=False,
        distributed=False,
    )


def _add_model_arguments(parser: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
    """``--model DIR | --preset NAME`` (exactly one); the group is returned so a command can add an alternative."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="DIR", help="model directory written by save_pretrained / training export")
    source.add_argument(
        "--preset", metavar="NAME", help="a randomly initialised preset instead (untrained: checks the pipeline only)"
    )
    return source


def _add_loader_arguments(parser: argparse.ArgumentParser, *, batch_size: int) -> None:
    parser.add_argument("--batch-size", metavar="N", type=positive_int, default=batch_size, help="images per batch")
    parser.add_argument(
        "--num-workers", metavar="N", type=int, default=0, help="data-loading worker processes (0: load in-process)"
    )
    add_device_argument(parser)
