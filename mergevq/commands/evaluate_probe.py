"""``mergevq evaluate probe``: linear-probe and k-NN accuracy of frozen encoder features at each K."""

from __future__ import annotations

import argparse
import time
from typing import Any

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
from mergevq.eval.probe import knn_accuracy, linear_probe
from mergevq.eval.report import probe_table, save_result
from mergevq.eval.speed import machine_info
from mergevq.eval.tokenizer_eval import extract_probe_features

# ----------------------------------------------------------------------------------------------------------------------
# evaluate probe
# ----------------------------------------------------------------------------------------------------------------------


def _register_probe(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "probe",
        help="linear-probe and k-NN accuracy of frozen encoder features (CLS and mean of merged tokens) at each K",
        description=(
            "Frozen-encoder representation quality on a labelled ImageFolder pair (--train, --test, same classes):\n"
            "  features  CLS token, and the size-weighted mean of the K merged tokens (width D, taken before the\n"
            "            D→d projection and quantizer; weighting by group size makes it the mean over the L grid\n"
            "            positions, comparable across K)\n"
            "  linear    standardised features + one linear layer, AdamW, cosine LR (paper A.4 after MAE: 90\n"
            "            epochs, batch 1024, LR 1e-3)\n"
            "  k-NN      cosine similarity, temperature-weighted vote of the k=20 nearest training images (DINO)\n"
            "The paper probes with all tokens (K = L, no merging), the default here."
        ),
        epilog=_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    _add_model_arguments(parser)
    parser.add_argument("--train", metavar="DIR", required=True, help="labelled training images (class sub-folders)")
    parser.add_argument("--test", metavar="DIR", required=True, help="labelled test images (the same class folders)")
    parser.add_argument(
        "--num-tokens",
        metavar="K",
        type=positive_int,
        nargs="+",
        default=None,
        help="K values (default: L)",
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


def _run_probe(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    check_output_file(args.output)  # before the work, not after it
    device = resolve_device(args.device)
    model = load_model(model_dir=args.model, preset=args.preset, device=device)
    _untrained_notice(args)
    config = model.config
    ks = check_num_tokens(args.num_tokens or [config.num_tokens_full], model=model)
    train = _image_dataset(args.train, size=config.image_size, max_images=args.max_train, what="--train")
    test = _image_dataset(args.test, size=config.image_size, max_images=args.max_test, what="--test")
    if not train.classes:
        raise CommandError(f"--train: {args.train} has no class sub-folders, so there are no labels to probe")
    if train.classes != test.classes:
        raise CommandError(
            f"--train and --test have different class folders ({len(train.classes)} vs {len(test.classes)}); "
            "the probe needs the same classes in both"
        )

    features = {}
    t0 = time.perf_counter()
    for name, dataset in (("train", train), ("test", test)):
        loader = _loader(dataset, args)
        with one_line_skip_warnings(COMMAND), progress(total=len(dataset), desc=f"features {name}", unit="img") as bar:
            features[name] = extract_probe_features(
                model=model,
                batches=((batch["image"], batch["label"]) for batch in loader),
                num_tokens=ks,
                device=device,
                progress=bar.update,
            )
    feature_seconds = time.perf_counter() - t0

    knn_k = min(args.knn_k, len(train))
    warnings: list[str] = []
    if knn_k < args.knn_k:
        _warn(f"k-NN uses k={knn_k}: only {len(train)} training images", warnings)
    t0 = time.perf_counter()
    results = []
    for k in ks:
        row: dict[str, Any] = {"num_tokens": k}
        tr, te = features["train"][k], features["test"][k]
        for name in ("cls", "mean_tokens"):
            x_train, x_test = getattr(tr, name), getattr(te, name)
            probe = linear_probe(
                x_train,
                tr.labels,
                x_test,
                te.labels,
                epochs=args.epochs,
                lr=args.lr,
                batch_size=args.probe_batch_size,
                device=device,
            )
            row[name] = {
                "dim": int(x_train.shape[1]),
                "linear_top1": probe.top1,
                "linear_top5": probe.top5,
                "linear_train_top1": probe.train_top1,
                "linear_final_loss": probe.final_loss,
                "knn_top1": knn_accuracy(x_train, tr.labels, x_test, te.labels, k=knn_k, device=device),
            }
        results.append(row)
    probe_seconds = time.perf_counter() - t0

    payload = {
        "kind": "probe_eval",
        "command": command_line(args),
        "model": _model_info(args, model),
        "train": {"root": args.train, "num_images": len(train), "num_skipped": train.num_skipped},
        "test": {"root": args.test, "num_images": len(test), "num_skipped": test.num_skipped},
        "classes": train.classes,
        "num_tokens": ks,
        "knn_k": knn_k,
        "linear_probe": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.probe_batch_size},
        "definitions": {
            "cls": "CLS token after the last encoder block (width D)",
            "mean_tokens": "mean of the K merged tokens weighted by group size (= mean over the L grid positions), "
            "taken at the input of the encoder's output head (width D, before the D→d projection and LFQ)",
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
