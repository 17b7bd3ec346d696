"""``mergevq finetune-recovery``: fine-tune the tokenizer's Source Recovery on a generator's samples."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from mergevq.commands.common import (
    CommandError,
    HelpFormatter,
    check_num_tokens,
    check_output_dir,
    guarded,
    load_model,
    positive_int,
    progress,
    resolve_device,
)

COMMAND = "finetune-recovery"

_EXAMPLES = """examples:
  mergevq sample --generator runs/cifar10-randar/export --tokenizer runs/cifar10-gr/export --output samples/ft \\
      --num-tokens 36 --num-per-class 500 --seed 1
  mergevq finetune-recovery --tokenizer runs/cifar10-gr/export --samples samples/ft/samples.npz --num-tokens 36 \\
      --output runs/cifar10-gr-recovery-ft
  mergevq sample --generator runs/cifar10-randar/export --tokenizer runs/cifar10-gr-recovery-ft \\
      --output samples/after --num-tokens 36 --num-per-class 200

The generated images are re-encoded at each K; the encoder's assignments are the targets, and only the Source Recovery
is trained (AdamW (0.9, 0.95), weight decay 1e-2, lr 1e-4: the paper's Table A2). The output directory is a complete
tokenizer (the same config, so generators trained on the original's tokens accept it) plus finetune.json with the
held-out recovery accuracy before and after. Sample the evaluation images with another --seed than the fine-tuning ones.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        COMMAND,
        help="fine-tune the learned Source Recovery on a generator's samples (for RandAR)",
        description=(
            "Fine-tune the tokenizer's learned Source Recovery on images a generator produced (samples.npz of\n"
            "mergevq sample), so it places generated merged tokens better (paper Table A2, 'optional' epochs)."
        ),
        epilog=_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--tokenizer", metavar="DIR", required=True, help="tokenizer directory (save_pretrained)")
    parser.add_argument(
        "--samples", metavar="NPZ", nargs="+", required=True, help="samples.npz files written by mergevq sample"
    )
    parser.add_argument(
        "--num-tokens", metavar="K", type=positive_int, nargs="+", required=True, help="merge levels K to train at"
    )
    parser.add_argument("--output", metavar="DIR", required=True, help="where to save the fine-tuned tokenizer")
    parser.add_argument("--epochs", type=positive_int, default=5, help="passes over the pairs (Table A2: 5)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (Table A2: 1e-4)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="pairs per optimizer step")
    parser.add_argument(
        "--heldout-fraction", type=float, default=0.1, help="share of the images held out to measure the accuracy"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split and the shuffling")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    parser.set_defaults(func=guarded(COMMAND, _run), _command=COMMAND)


def _load_samples(paths: list[str], *, size: int) -> torch.Tensor:
    arrays = []
    for path in paths:
        if not Path(path).is_file():
            raise CommandError(f"--samples {path}: no such file")
        try:
            with np.load(path) as data:
                arr = data["arr_0"]
        except (OSError, ValueError, KeyError) as error:
            raise CommandError(f"--samples {path}: not a samples.npz with arr_0 ({error})") from None
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise CommandError(f"--samples {path}: expected uint8 images [N, H, W, 3], got {arr.dtype} {arr.shape}")
        if arr.shape[1:3] != (size, size):
            raise CommandError(f"--samples {path}: images are {arr.shape[1]}×{arr.shape[2]}, the tokenizer's {size}²")
        arrays.append(arr)
    images = torch.from_numpy(np.concatenate(arrays)).permute(0, 3, 1, 2).float()
    return images / 127.5 - 1


def _run(args: argparse.Namespace) -> int:
    from mergevq.train.recovery_finetune import finetune_recovery, recovery_pairs

    output = check_output_dir(args.output)
    if not 0 <= args.heldout_fraction < 1:
        raise CommandError(f"--heldout-fraction {args.heldout_fraction} is outside [0, 1)")
    device = resolve_device(args.device)
    model = load_model(model_dir=args.tokenizer, device=device)
    if model.recovery is None:
        raise CommandError(f"tokenizer {args.tokenizer} has no learned Source Recovery (learned_recovery=False)")
    ks = check_num_tokens(args.num_tokens, model=model)
    images = _load_samples(args.samples, size=model.config.image_size).to(device)
    torch.manual_seed(args.seed)
    pairs = recovery_pairs(model=model, images=images, num_tokens=ks)
    steps = args.epochs * len(ks) * round(len(images) * (1 - args.heldout_fraction))
    with progress(total=steps, desc="finetune recovery", unit="pair") as bar:
        result = finetune_recovery(
            model=model,
            pairs=pairs,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            heldout_fraction=args.heldout_fraction,
            seed=args.seed,
            progress=bar.update,
        )
    model.save_pretrained(output)
    report = {
        "kind": "recovery_finetune",
        "tokenizer": str(args.tokenizer),
        "samples": [str(p) for p in args.samples],
        "num_images": len(images),
        "num_tokens": ks,
        "settings": {k: getattr(args, k) for k in ("epochs", "lr", "batch_size", "heldout_fraction", "seed")},
        "accuracy_before": result.accuracy_before,
        "accuracy_after": result.accuracy_after,
        "train_losses": result.train_losses,
        "num_train": result.num_train,
        "num_heldout": result.num_heldout,
        "seconds": result.seconds,
    }
    (output / "finetune.json").write_text(json.dumps(report, indent=2) + "\n")
    for k in ks:
        before, after = result.accuracy_before.get(k), result.accuracy_after.get(k)
        if before is not None:
            print(f"K={k}: held-out recovery accuracy {100 * before:.2f}% -> {100 * after:.2f}%")
    print(f"saved the fine-tuned tokenizer to {output} ({len(images)} images, {args.epochs} epochs)")
    return 0
