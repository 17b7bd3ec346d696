"""``mergevq evaluate tokenizer|generator|probe``: dataset-level metrics written to one JSON file each.

Every JSON holds ``"kind"``, the ``"command"`` line that reproduces it (all options spelled out), the inputs, the
metric definitions, timings and the machine; ``scripts/make_results.py`` turns them into docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mergevq.commands.common import (
    CommandError,
    HelpFormatter,
    add_device_argument,
    check_num_tokens,
    guarded,
    load_model,
    one_line_skip_warnings,
    positive_int,
    progress,
    resolve_device,
)
from mergevq.data.images import ImageDataset, ImageDecodeError, load_image, make_loader
from mergevq.data.transforms import eval_transform
from mergevq.eval.fid import (
    IS_UNAVAILABLE,
    FIDStatistics,
    InceptionFeatures,
    compute_statistics,
    frechet_distance,
    iter_npz_batches,
    list_image_files,
    load_statistics,
    precision_recall,
    save_statistics,
)
from mergevq.eval.probe import knn_accuracy, linear_probe
from mergevq.eval.report import generator_table, probe_table, save_result, tokenizer_table
from mergevq.eval.speed import machine_info
from mergevq.eval.tokenizer_eval import evaluate_tokenizer, extract_probe_features
from mergevq.tokenizer.model import MergeVQ

__all__ = ["command_line", "register", "strided_subset"]

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


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="DIR", help="model directory written by save_pretrained / training export")
    source.add_argument(
        "--preset", metavar="NAME", help="a randomly initialised preset instead (untrained: checks the pipeline only)"
    )


def _add_loader_arguments(parser: argparse.ArgumentParser, *, batch_size: int) -> None:
    parser.add_argument("--batch-size", metavar="N", type=positive_int, default=batch_size, help="images per batch")
    parser.add_argument(
        "--num-workers", metavar="N", type=int, default=0, help="data-loading worker processes (0: load in-process)"
    )
    add_device_argument(parser)


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
    parser.add_argument("--output", metavar="FILE.json", required=True, help="where to write the results")
    parser.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    parser.add_argument("--no-fid", action="store_true", help="skip rFID (the slow part on CPU)")
    parser.add_argument("--inception-weights", metavar="PATH", default=None, help="FID Inception TorchScript file")
    _add_loader_arguments(parser, batch_size=32)
    parser.set_defaults(func=guarded("evaluate tokenizer", _run_tokenizer), _command="evaluate tokenizer")


def _run_tokenizer(args: argparse.Namespace) -> int:
    start = time.perf_counter()
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
        )

    results = []
    for r in evaluation.results:
        psnr, ssim = r.metrics["psnr"], r.metrics["ssim"]
        lp = r.metrics.get("lpips")
        results.append(
            {
                "num_tokens": r.num_tokens,
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


# ----------------------------------------------------------------------------------------------------------------------
# evaluate generator
# ----------------------------------------------------------------------------------------------------------------------


def strided_subset(count: int, limit: int | None) -> list[int]:
    """Indices of an evenly strided subset of ``limit`` of ``count`` items (all when ``limit`` is None or larger).

    The same rule as ``ImageDataset(max_images=...)``: sorted class folders stay represented.
    """
    if limit is None or limit >= count:
        return list(range(count))
    return [(i * count) // limit for i in range(limit)]


@dataclass
class _ImageSource:
    """Images of an image folder or an ADM-style npz (``arr_0`` uint8 NHWC), or a statistics npz (``mu``/``sigma``)."""

    path: Path
    format: str  # "folder" | "npz" | "stats"
    files: list[Path] | None = None  # folder: the selected files
    rows: list[int] | None = None  # npz: the selected rows of arr_0 (None: no images)
    total: int = 0  # images available before --max-images

    @property
    def num_images(self) -> int:
        if self.files is not None:
            return len(self.files)
        return len(self.rows) if self.rows is not None else 0

    def batches(self, *, batch_size: int, skipped: list[dict[str, str]]) -> Iterator[Tensor]:
        """uint8 ``[n, 3, H, W]`` batches; consecutive images of another size start a new batch."""
        if self.files is not None:
            pending: list[np.ndarray] = []
            for path in self.files:
                try:
                    array = np.asarray(load_image(path), dtype=np.uint8)
                except ImageDecodeError as exc:
                    print(
                        f"mergevq {COMMAND}: warning: skipping unreadable image {path}: {exc.reason}", file=sys.stderr
                    )
                    skipped.append({"input": str(path), "reason": exc.reason})
                    continue
                if pending and (len(pending) == batch_size or array.shape != pending[0].shape):
                    yield torch.from_numpy(np.stack(pending)).permute(0, 3, 1, 2).contiguous()
                    pending = []
                pending.append(array)
            if pending:
                yield torch.from_numpy(np.stack(pending)).permute(0, 3, 1, 2).contiguous()
            return
        if self.rows is None:
            return
        wanted = np.asarray(self.rows)
        offset = 0
        # Stream the npz (samples files can be ~10 GB) and keep the selected rows.
        for chunk in iter_npz_batches(self.path, batch_size=batch_size):
            keep = wanted[(wanted >= offset) & (wanted < offset + chunk.shape[0])] - offset
            if keep.size:
                yield chunk[torch.from_numpy(keep)]
            offset += chunk.shape[0]


def _npz_contents(path: Path) -> tuple[set[str], tuple[int, ...] | None]:
    """Array names of an npz and the shape of ``arr_0`` (from its header: sample files can be ~10 GB)."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        keys = {name[: -len(".npy")] for name in names if name.endswith(".npy")}
        if "arr_0.npy" not in names:
            return keys, None
        with archive.open("arr_0.npy") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(handle)
    if dtype != np.uint8:
        raise ValueError(f"arr_0 must be uint8 images, got {dtype}")
    return keys, tuple(shape)


def _open_source(text: str, *, max_images: int | None, what: str, allow_stats: bool) -> _ImageSource:
    path = Path(text).expanduser()
    if path.is_dir():
        files = list_image_files(path)
        if not files:
            raise CommandError(f"{what}: no image files found under {path}")
        chosen = [files[i] for i in strided_subset(len(files), max_images)]
        return _ImageSource(path, "folder", files=chosen, total=len(files))
    if not path.is_file():
        raise CommandError(f"{what}: not found: {path}")
    if path.suffix.lower() != ".npz":
        raise CommandError(f"{what}: expected an image folder or an .npz file, got {path}")
    try:
        keys, shape = _npz_contents(path)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CommandError(f"{what}: cannot read {path}: {exc}") from exc
    has_stats = {"mu", "sigma"} <= keys
    if has_stats and not allow_stats:
        raise CommandError(f"{what}: {path} holds statistics (mu/sigma); samples must be images (arr_0 or a folder)")
    if shape is None and not has_stats:
        raise CommandError(f"{what}: {path} holds neither arr_0 images nor mu/sigma (keys: {', '.join(sorted(keys))})")
    if shape is not None and (len(shape) != 4 or shape[-1] != 3):
        raise CommandError(f"{what}: {path}: arr_0 must be uint8 [N, H, W, 3] (NHWC), got shape {shape}")
    rows = strided_subset(shape[0], max_images) if shape is not None else None
    return _ImageSource(path, "stats" if has_stats else "npz", rows=rows, total=shape[0] if shape is not None else 0)


def _register_generator(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generator",
        help="FID, precision/recall (k=3) and IS of generated samples against reference images or statistics",
        description=(
            "FID, improved precision/recall (k-NN manifolds, k=3) and Inception Score of --samples against\n"
            "--reference, with the TF Inception-v3 of the ADM/pytorch-fid evaluators (pool3 features).\n"
            "  --samples    an ADM-style .npz (arr_0, uint8 NHWC) or an image folder (recursive)\n"
            "  --reference  an image folder, such an .npz, or a statistics .npz (mu/sigma; then precision and\n"
            "               recall are unavailable unless the file also holds arr_0 images)\n"
            "The Inception Score needs the network's classifier head, which the offline weights lack: it is\n"
            "reported as null with the reason, never estimated."
        ),
        epilog=_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--samples", metavar="FILE.npz|DIR", required=True, help="generated images")
    parser.add_argument("--reference", metavar="DIR|NPZ", required=True, help="reference images or statistics")
    parser.add_argument("--output", metavar="FILE.json", required=True, help="where to write the results")
    parser.add_argument(
        "--max-images",
        metavar="N",
        type=positive_int,
        default=None,
        help="use an evenly strided subset of N images of each image source (statistics are used as given)",
    )
    parser.add_argument("--inception-weights", metavar="PATH", default=None, help="FID Inception TorchScript file")
    parser.add_argument(
        "--save-reference-stats", metavar="FILE.npz", default=None, help="cache the reference mu/sigma here"
    )
    parser.add_argument("--nearest-k", metavar="K", type=positive_int, default=3, help="k of precision/recall")
    parser.add_argument("--batch-size", metavar="N", type=positive_int, default=32, help="Inception batch size")
    add_device_argument(parser)
    parser.set_defaults(func=guarded("evaluate generator", _run_generator), _command="evaluate generator")


def _features(
    source: _ImageSource, extractor: InceptionFeatures, *, batch_size: int, skipped: list[dict[str, str]], desc: str
) -> Tensor:
    total = source.num_images
    with progress(total=total, desc=desc, unit="img") as bar:

        def counted() -> Iterator[Tensor]:
            for batch in source.batches(batch_size=batch_size, skipped=skipped):
                yield batch
                bar.update(batch.shape[0])

        return extractor.extract(counted(), total=total)


def _run_generator(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    device = resolve_device(args.device)
    samples = _open_source(args.samples, max_images=args.max_images, what="--samples", allow_stats=False)
    reference = _open_source(args.reference, max_images=args.max_images, what="--reference", allow_stats=True)
    extractor = _inception(weights=args.inception_weights, device=device, batch_size=args.batch_size)
    warnings: list[str] = []
    skipped: list[dict[str, str]] = []
    unavailable: dict[str, str] = {}

    t0 = time.perf_counter()
    sample_features = _features(samples, extractor, batch_size=args.batch_size, skipped=skipped, desc="samples")
    sample_seconds = time.perf_counter() - t0
    if sample_features.shape[0] < 2:
        raise CommandError(f"--samples: need at least 2 readable images, got {sample_features.shape[0]}", code=1)
    sample_stats = compute_statistics(sample_features)
    _fid_bias_warning(sample_stats.num_images or 0, "sample", warnings)

    t0 = time.perf_counter()
    reference_features: Tensor | None = None
    if reference.format == "stats":
        try:
            reference_stats: FIDStatistics = load_statistics(reference.path)
        except (KeyError, ValueError) as exc:
            raise CommandError(f"--reference: {exc}", code=1) from exc
        if reference.num_images:  # ADM reference batches also hold their images: precision/recall use them
            reference_features = _features(
                reference, extractor, batch_size=args.batch_size, skipped=skipped, desc="reference"
            )
        if reference_stats.mu.shape[0] != sample_stats.mu.shape[0]:
            raise CommandError(
                f"--reference: statistics have {reference_stats.mu.shape[0]} dimensions, the features "
                f"{sample_stats.mu.shape[0]}",
                code=1,
            )
    else:
        reference_features = _features(
            reference, extractor, batch_size=args.batch_size, skipped=skipped, desc="reference"
        )
        if reference_features.shape[0] < 2:
            raise CommandError(f"--reference: need at least 2 readable images, got {reference_features.shape[0]}")
        reference_stats = compute_statistics(reference_features)
        _fid_bias_warning(reference_stats.num_images or 0, "reference", warnings)
    reference_seconds = time.perf_counter() - t0

    fid = frechet_distance(sample_stats.mu, sample_stats.sigma, reference_stats.mu, reference_stats.sigma)
    precision = recall = None
    k = args.nearest_k
    if reference_features is None:
        unavailable["precision_recall"] = (
            "unavailable: the reference is a statistics file (mu/sigma) without images, and precision/recall need "
            "the reference features"
        )
    elif min(reference_features.shape[0], sample_features.shape[0]) <= k:
        unavailable["precision_recall"] = f"unavailable: need more than k={k} images in each set"
    else:
        precision, recall = precision_recall(reference_features, sample_features, k=k, device=device)
    unavailable["inception_score"] = IS_UNAVAILABLE

    if args.save_reference_stats:
        stats_path = Path(args.save_reference_stats).expanduser()
        stats_path.parent.mkdir(parents=True, exist_ok=True)
        save_statistics(stats_path, reference_stats)

    payload = {
        "kind": "generator_eval",
        "command": command_line(args),
        "samples": {
            "source": args.samples,
            "format": samples.format,
            "num_images": int(sample_features.shape[0]),
            "available": samples.total,
        },
        "reference": {
            "source": args.reference,
            "format": reference.format,
            "num_images": reference_stats.num_images,
            "num_images_for_precision_recall": None if reference_features is None else int(reference_features.shape[0]),
            "saved_statistics": args.save_reference_stats,
        },
        "metrics": {
            "fid": fid,
            "precision": precision,
            "recall": recall,
            "nearest_k": k,
            "inception_score": None,
            "inception_score_std": None,
            "unavailable": unavailable,
        },
        "definitions": {
            "fid": "Fréchet distance between Gaussians (mean, unbiased covariance) of Inception-v3 pool3 features "
            "(TF 2015-12-05 graph, TF bilinear resize to 299), as the ADM evaluator",
            "precision": f"fraction of samples inside the reference manifold (union of k-NN balls, k={k}), "
            "Kynkäänniemi et al. 2019",
            "recall": f"fraction of reference images inside the samples' manifold (k={k})",
            "inception_score": "null: " + IS_UNAVAILABLE,
        },
        "skipped": skipped,
        "timings": {
            "samples_features": sample_seconds,
            "reference": reference_seconds,
            "command_total": time.perf_counter() - start,
        },
        "warnings": warnings,
        "machine": machine_info(device=device),
    }
    path = save_result(args.output, payload)
    print(generator_table(payload))
    for name, reason in unavailable.items():
        print(f"{name}: {reason}")
    print(f"wrote {path}")
    return 0


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


# ----------------------------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        COMMAND,
        help="evaluate a tokenizer (reconstruction, probe) or generated samples (FID), writing JSON",
        description="Dataset-level evaluation; each sub-command writes one JSON file and prints a markdown table.",
        epilog=_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    inner = parser.add_subparsers(dest="evaluate_command", metavar="WHAT")
    _register_tokenizer(inner)
    _register_generator(inner)
    _register_probe(inner)

    def usage(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=usage)
