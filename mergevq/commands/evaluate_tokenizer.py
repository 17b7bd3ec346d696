"""``mergevq evaluate tokenizer``: PSNR, SSIM, LPIPS, rFID and codebook usage of reconstructions at each K."""

from __future__ import annotations

import argparse
import time

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
    LPIPS_MIN_SIZE,
    _add_loader_arguments,
    _add_model_arguments,
    _fid_bias_warning,
    _image_dataset,
    _inception,
    _loader,
    _lpips,
    _model_info,
    _untrained_notice,
    _warn,
    command_line,
)
from mergevq.eval.report import save_result, tokenizer_table
from mergevq.eval.speed import machine_info
from mergevq.eval.tokenizer_eval import evaluate_tokenizer

# ----------------------------------------------------------------------------------------------------------------------
# evaluate tokenizer
# ----------------------------------------------------------------------------------------------------------------------

TOKENIZER_DEFINITIONS = {
    "psnr": "mean over images of the per-image PSNR 10·log10(2²/MSE), data range [-1,1] (= [0,1] with range 1), "
    "reconstructions clamped to [-1,1]; images reconstructed exactly (PSNR = inf) are counted in psnr_num_inf and "
    "left out of the mean",
    "ssim": "mean over images of the per-image SSIM (11×11 Gaussian window, σ=1.5, RGB channels averaged, "
    "valid region only; as skimage structural_similarity with gaussian_weights=True)",
    "lpips": "mean over images of the shift-tolerant VGG LPIPS (ST-LPIPS weights of stlpips-pytorch; not "
    "numerically identical to the pip lpips package)",
    "rfid": "Fréchet distance between the Gaussians of the Inception-v3 pool3 features (TF 2015-12-05 graph, "
    "TF bilinear resize to 299, 8-bit rounding) of the originals and of the reconstructions at this K; the "
    "originals' features are computed once and shared by every K",
    "codebook_usage": "fraction of the 2^d LFQ codes used at least once over all merged tokens of all images",
    "codebook_perplexity": "exp of the entropy (nats) of the empirical code distribution: the effective number of "
    "equally used codes",
    "assignment": "how the K merged tokens were put back on the grid: 'true' = the encoder's assignment (stage 1), "
    "'predicted' = the learned Source Recovery's from the K codes alone, as for a RandAR sample",
    "recovery_accuracy": "predicted only: share of grid positions the Source Recovery gave their true merged token",
    "merged_tokens": "the K the encoder used (differs from the requested K only when --image-size differs from the "
    "model's image size: the ratio K/L is kept)",
}


def _register_tokenizer(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tokenizer",
        help="reconstruction quality at each K: PSNR, SSIM, LPIPS, rFID, codebook usage",
        description=(
            "Reconstruct every image of --data at each K and report PSNR, SSIM, LPIPS, rFID and codebook usage\n"
            "and perplexity (one pass over the data; the originals' Inception features are computed once).\n"
            "Images are resized (shorter side, bilinear) and center-cropped to the model's image size.\n"
            "rFID on fewer than ~10k images is biased upward: compare numbers only at equal image counts."
        ),
        epilog=_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    _add_model_arguments(parser)
    parser.add_argument("--data", metavar="DIR", required=True, help="image folder (ImageFolder or flat, recursive)")
    parser.add_argument(
        "--num-tokens", metavar="K", type=positive_int, nargs="+", default=None, help="K values (default: model's K)"
    )
    parser.add_argument(
        "--max-images", metavar="N", type=positive_int, default=None, help="an evenly strided subset of N images"
    )
    parser.add_argument(
        "--image-size", metavar="S", type=positive_int, default=None, help="evaluation resolution (default: model's)"
    )
    parser.add_argument(
        "--assignment",
        nargs="+",
        choices=["true", "predicted"],
        default=["true"],
        help="decode with the encoder's assignment ('true'), the learned Source Recovery's ('predicted'), or both "
        "(one row each; the gap is the cost of predicting S, as for RandAR samples)",
    )
    parser.add_argument("--output", metavar="FILE.json", required=True, help="where to write the results")
    parser.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    parser.add_argument("--no-fid", action="store_true", help="skip rFID (the slow part on CPU)")
    parser.add_argument("--inception-weights", metavar="PATH", default=None, help="FID Inception TorchScript file")
    _add_loader_arguments(parser, batch_size=32)
    parser.set_defaults(func=guarded("evaluate tokenizer", _run_tokenizer), _command="evaluate tokenizer")


def _run_tokenizer(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    check_output_file(args.output)  # before the work, not after it
    device = resolve_device(args.device)
    model = load_model(model_dir=args.model, preset=args.preset, device=device)
    _untrained_notice(args)
    config = model.config
    ks = check_num_tokens(args.num_tokens or [config.default_num_tokens], model=model)
    size = args.image_size or config.image_size
    if size % config.downsample:
        raise CommandError(
            f"--image-size {size} is not divisible by the model's downsampling factor {config.downsample}"
        )
    assignments = list(dict.fromkeys(args.assignment))
    if "predicted" in assignments:
        if model.recovery is None:
            raise CommandError(
                f"--assignment predicted: preset {config.name!r} has no learned Source Recovery "
                "(learned_recovery=False)"
            )
        if size != config.image_size:
            raise CommandError(
                f"--assignment predicted needs the model's own image size {config.image_size} "
                f"(got --image-size {size}): the Source Recovery predicts the assignment of its fixed grid"
            )
    dataset = _image_dataset(args.data, size=size, max_images=args.max_images, what="--data")
    count = len(dataset)
    warnings: list[str] = []
    lpips = None
    if not args.no_lpips:
        if size < LPIPS_MIN_SIZE:
            _warn(f"LPIPS skipped: it needs images of at least {LPIPS_MIN_SIZE}×{LPIPS_MIN_SIZE}", warnings)
        else:
            lpips = _lpips(device)
    inception = None
    if not args.no_fid:
        _fid_bias_warning(count, "reconstructed", warnings)
        inception = _inception(weights=args.inception_weights, device=device, batch_size=args.batch_size)

    loader = _loader(dataset, args)
    with one_line_skip_warnings(COMMAND), progress(total=count, desc="evaluate tokenizer", unit="img") as bar:
        evaluation = evaluate_tokenizer(
            model=model,
            batches=(batch["image"] for batch in loader),
            num_tokens=ks,
            device=device,
            lpips=lpips,
            inception=inception,
            progress=bar.update,
            assignments=assignments,
        )

    results = []
    for r in evaluation.results:
        psnr, ssim = r.metrics["psnr"], r.metrics["ssim"]
        lp = r.metrics.get("lpips")
        results.append(
            {
                "num_tokens": r.num_tokens,
                "assignment": r.assignment,
                "recovery_accuracy": r.recovery_accuracy,
                "merged_tokens": r.merged_tokens,
                "psnr": psnr.mean,
                "psnr_num_finite": psnr.num_finite,
                "psnr_num_inf": psnr.num_inf,
                "ssim": ssim.mean,
                "lpips": lp.mean if lp is not None else None,
                "rfid": r.rfid,
                "codebook_usage": r.codebook_usage,
                "codebook_used_codes": r.codebook_used,
                "codebook_size": r.num_codes,
                "codebook_perplexity": r.codebook_perplexity,
                "seconds": r.seconds,
            }
        )
    payload = {
        "kind": "tokenizer_eval",
        "command": command_line(args),
        "model": _model_info(args, model),
        "data": {
            "root": args.data,
            "num_images": evaluation.num_images,
            "num_skipped": dataset.num_skipped,
            "image_size": size,
            "transform": "resize shorter side (bilinear) + center crop, to [-1,1]",
            "subset": "all images" if args.max_images is None else f"evenly strided subset, --max-images {count}",
        },
        "num_tokens": ks,
        "definitions": TOKENIZER_DEFINITIONS,
        "results": results,
        "timings": {**evaluation.seconds, "command_total": time.perf_counter() - start},
        "warnings": warnings,
        "machine": machine_info(device=device),
    }
    path = save_result(args.output, payload)
    print(tokenizer_table(payload))
    print(f"wrote {path} ({evaluation.num_images} images, K = {' '.join(map(str, ks))})")
    return 0
