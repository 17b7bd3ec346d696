"""``mergevq evaluate probe``: linear-probe and k-NN accuracy of frozen encoder features at each K.

``--pixels`` probes the raw image pixels instead of a tokenizer, through exactly the same protocol, so that a
tokenizer's probe can be read as a gain over what a linear classifier gets from the images themselves. Both write the
same JSON schema: ``feature_kinds`` names the feature entries of each ``results`` row (``cls`` and ``mean_tokens`` per
K for a tokenizer; one ``pixels`` entry with ``num_tokens`` null for the baseline).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import Tensor

from mergevq.commands.common import (
    CommandError,
    HelpFormatter,
    check_num_tokens,
    check_output_file,
    guarded,
    load_model,
    one_line_skip_warnings,
    positive_int,
    progress,
    resolve_device,
)
from mergevq.commands.evaluate_shared import (
    _EXAMPLES,
    COMMAND,
    _add_loader_arguments,
    _add_model_arguments,
    _image_dataset,
    _loader,
    _model_info,
    _untrained_notice,
    _warn,
    command_line,
)
from mergevq.data.images import ImageDataset
from mergevq.eval.probe import knn_accuracy, linear_probe, pixel_features
from mergevq.eval.report import probe_table, save_result
from mergevq.eval.speed import machine_info
from mergevq.eval.tokenizer_eval import extract_probe_features

# ----------------------------------------------------------------------------------------------------------------------
# evaluate probe
# ----------------------------------------------------------------------------------------------------------------------


PIXELS_IMAGE_SIZE = 32  # the baseline's default resolution: CIFAR-10's own, and that of the tiny-32 tokenizers
_INPUT_RANGE = "[-1, 1] (the tokenizer's input scaling)"
_TRANSFORM = "shorter side resized (bilinear) to the image size, then centre-cropped"


def _register_probe(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "probe",
        help="linear-probe and k-NN accuracy of frozen encoder features (CLS and mean of merged tokens) at each K, "
        "or of raw pixels (--pixels, the baseline)",
        description=(
            "Frozen-encoder representation quality on a labelled ImageFolder pair (--train, --test, same classes):\n"
            "  features  CLS token, and the size-weighted mean of the K merged tokens (width D, taken before the\n"
            "            D→d projection and quantizer; weighting by group size makes it the mean over the L grid\n"
            "            positions, comparable across K)\n"
            "  pixels    with --pixels instead of a model: the raw image pixels flattened to 3·S·S values in the\n"
            "            [-1, 1] scaling the tokenizer sees (S = --image-size, default 32), the baseline a\n"
            "            tokenizer's features should beat; no K\n"
            "  linear    standardised features + one linear layer, AdamW, cosine LR (paper A.4 after MAE: 90\n"
            "            epochs, batch 1024, LR 1e-3)\n"
            "  k-NN      cosine similarity, temperature-weighted vote of the k=20 nearest training images (DINO)\n"
            "Images are resized (shorter side, bilinear) and centre-cropped to the model's resolution, or to\n"
            "--image-size for --pixels. Pixels and models go through the same probes with the same settings and\n"
            'write the same JSON schema ("features": "encoder" or "pixels").\n'
            "The paper probes with all tokens (K = L, no merging), the default here."
        ),
        epilog=_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    source = _add_model_arguments(parser)
    source.add_argument(
        "--pixels",
        action="store_true",
        help="probe the raw pixels instead of a model (the baseline; takes --image-size, not --num-tokens)",
    )
    parser.add_argument("--train", metavar="DIR", required=True, help="labelled training images (class sub-folders)")
    parser.add_argument("--test", metavar="DIR", required=True, help="labelled test images (the same class folders)")
    parser.add_argument(
        "--num-tokens",
        metavar="K",
        type=positive_int,
        nargs="+",
        default=None,
        help="K values (default: L; not with --pixels)",
    )
    parser.add_argument(
        "--image-size",
        metavar="S",
        type=positive_int,
        default=None,
        help=f"--pixels only: resolution of the pixel features (default: {PIXELS_IMAGE_SIZE}; a model is probed at "
        "its own resolution)",
    )
    parser.add_argument("--max-train", metavar="N", type=positive_int, default=None, help="strided training subset")
    parser.add_argument("--max-test", metavar="N", type=positive_int, default=None, help="strided test subset")
    parser.add_argument("--output", metavar="FILE.json", required=True, help="where to write the results")
    parser.add_argument("--epochs", metavar="N", type=positive_int, default=90, help="linear-probe epochs")
    parser.add_argument("--lr", metavar="LR", type=float, default=1e-3, help="linear-probe peak learning rate")
    parser.add_argument(
        "--probe-batch-size", metavar="N", type=positive_int, default=1024, help="linear-probe mini-batch size"
    )
    parser.add_argument("--knn-k", metavar="K", type=positive_int, default=20, help="neighbours of the k-NN vote")
    _add_loader_arguments(parser, batch_size=64)
    parser.set_defaults(func=guarded("evaluate probe", _run_probe), _command="evaluate probe")


def _labelled_datasets(args: argparse.Namespace, *, size: int) -> tuple[ImageDataset, ImageDataset]:
    train = _image_dataset(args.train, size=size, max_images=args.max_train, what="--train")
    test = _image_dataset(args.test, size=size, max_images=args.max_test, what="--test")
    if not train.classes:
        raise CommandError(f"--train: {args.train} has no class sub-folders, so there are no labels to probe")
    if train.classes != test.classes:
        raise CommandError(
            f"--train and --test have different class folders ({len(train.classes)} vs {len(test.classes)}); "
            "the probe needs the same classes in both"
        )
    return train, test


def _probe_entry(
    *,
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    args: argparse.Namespace,
    knn_k: int,
    device: torch.device,
) -> dict[str, Any]:
    """One feature kind through both probes: the single place the protocol lives, so pixels and models match."""
    probe = linear_probe(
        x_train,
        y_train,
        x_test,
        y_test,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.probe_batch_size,
        device=device,
    )
    return {
        "dim": int(x_train.shape[1]),
        "linear_top1": probe.top1,
        "linear_top5": probe.top5,
        "linear_train_top1": probe.train_top1,
        "linear_final_loss": probe.final_loss,
        "knn_top1": knn_accuracy(x_train, y_train, x_test, y_test, k=knn_k, device=device),
    }


def _run_probe(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    check_output_file(args.output)  # before the work, not after it
    if args.pixels and args.num_tokens:
        raise CommandError("--num-tokens does not apply to --pixels: raw pixels have no tokens")
    if args.image_size is not None and not args.pixels:
        raise CommandError(
            "--image-size applies to --pixels only: a model is probed at its own resolution (its config.json)"
        )
    device = resolve_device(args.device)
    model = None
    if args.pixels:
        size = args.image_size = args.image_size or PIXELS_IMAGE_SIZE  # spelled out in the recorded command
        ks: list[int | None] = [None]
        kinds = ["pixels"]
    else:
        model = load_model(model_dir=args.model, preset=args.preset, device=device)
        _untrained_notice(args)
        size = model.config.image_size
        ks = list(check_num_tokens(args.num_tokens or [model.config.num_tokens_full], model=model))
        kinds = ["cls", "mean_tokens"]
    train, test = _labelled_datasets(args, size=size)

    # features[split][K][kind] and labels[split][K]: one layout for pixels (K = None) and models.
    features: dict[str, dict[int | None, dict[str, Tensor]]] = {}
    labels: dict[str, dict[int | None, Tensor]] = {}
    t0 = time.perf_counter()
    for name, dataset in (("train", train), ("test", test)):
        batches = ((batch["image"], batch["label"]) for batch in _loader(dataset, args))
        with one_line_skip_warnings(COMMAND), progress(total=len(dataset), desc=f"features {name}", unit="img") as bar:
            if model is None:
                x, y = pixel_features(batches=batches, progress=bar.update)
                features[name], labels[name] = {None: {"pixels": x}}, {None: y}
            else:
                per_k = extract_probe_features(
                    model=model, batches=batches, num_tokens=ks, device=device, progress=bar.update
                )
                features[name] = {k: {"cls": f.cls, "mean_tokens": f.mean_tokens} for k, f in per_k.items()}
                labels[name] = {k: f.labels for k, f in per_k.items()}
    feature_seconds = time.perf_counter() - t0

    knn_k = min(args.knn_k, len(train))
    warnings: list[str] = []
    if knn_k < args.knn_k:
        _warn(f"k-NN uses k={knn_k}: only {len(train)} training images", warnings)
    t0 = time.perf_counter()
    results = []
    for k in ks:
        row: dict[str, Any] = {"num_tokens": k}
        for kind in kinds:
            row[kind] = _probe_entry(
                x_train=features["train"][k][kind],
                y_train=labels["train"][k],
                x_test=features["test"][k][kind],
                y_test=labels["test"][k],
                args=args,
                knn_k=knn_k,
                device=device,
            )
        results.append(row)
    probe_seconds = time.perf_counter() - t0

    if model is None:
        feature_definitions = {
            "pixels": f"raw RGB pixels flattened to 3·{size}·{size} = {3 * size * size} values in {_INPUT_RANGE}, "
            "no encoder (the baseline)"
        }
    else:
        feature_definitions = {
            "cls": "CLS token after the last encoder block (width D)",
            "mean_tokens": "mean of the K merged tokens weighted by group size (= mean over the L grid positions), "
            "taken at the input of the encoder's output head (width D, before the D→d projection and LFQ)",
        }
    payload = {
        "kind": "probe_eval",
        "features": "pixels" if model is None else "encoder",
        "feature_kinds": kinds,
        "command": command_line(args),
        "model": None if model is None else _model_info(args, model),
        "input": {"image_size": size, "range": _INPUT_RANGE, "transform": _TRANSFORM},
        "train": {"root": args.train, "num_images": len(train), "num_skipped": train.num_skipped},
        "test": {"root": args.test, "num_images": len(test), "num_skipped": test.num_skipped},
        "classes": train.classes,
        "num_tokens": None if model is None else ks,
        "knn_k": knn_k,
        "linear_probe": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.probe_batch_size},
        "definitions": {
            **feature_definitions,
            "linear_top1": "test top-1 of a linear classifier on standardised frozen features (AdamW, cosine LR)",
            "knn_top1": f"test top-1 of a cosine-similarity k-NN vote, k={knn_k}, temperature 0.07 (DINO)",
        },
        "results": results,
        "timings": {"features": feature_seconds, "probes": probe_seconds, "command_total": time.perf_counter() - start},
        "warnings": warnings,
        "machine": machine_info(device=device),
    }
    path = save_result(args.output, payload)
    print(probe_table(payload))
    print(f"wrote {path}")
    return 0
