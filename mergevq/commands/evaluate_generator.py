"""``mergevq evaluate generator``: FID, precision/recall (and IS when possible) of generated samples."""

from __future__ import annotations

import argparse
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mergevq.commands.common import (
    CommandError,
    HelpFormatter,
    add_device_argument,
    check_output_file,
    guarded,
    positive_int,
    progress,
    resolve_device,
)
from mergevq.commands.evaluate_shared import (
    _EXAMPLES,
    COMMAND,
    _fid_bias_warning,
    _inception,
    command_line,
)
from mergevq.data.images import ImageDecodeError, load_image
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
    stack_batches,
)
from mergevq.eval.report import generator_table, save_result
from mergevq.eval.speed import machine_info

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

    def _readable_arrays(self, skipped: list[dict[str, str]]) -> Iterator[np.ndarray]:
        for path in self.files or []:
            try:
                yield np.asarray(load_image(path), dtype=np.uint8)
            except ImageDecodeError as exc:
                print(f"mergevq {COMMAND}: warning: skipping unreadable image {path}: {exc.reason}", file=sys.stderr)
                skipped.append({"input": str(path), "reason": exc.reason})

    def batches(self, *, batch_size: int, skipped: list[dict[str, str]]) -> Iterator[Tensor]:
        """uint8 ``[n, 3, H, W]`` batches; consecutive images of another size start a new batch."""
        if self.files is not None:
            yield from stack_batches(self._readable_arrays(skipped), batch_size=batch_size)
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
        "--save-reference-stats",
        metavar="FILE.npz",
        default=None,
        help="cache the reference mu/sigma (and its features, for precision/recall) here",
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
    check_output_file(args.output)  # before the work, not after it
    if args.save_reference_stats:
        check_output_file(args.save_reference_stats, option="--save-reference-stats")
    device = resolve_device(args.device)
    samples = _open_source(args.samples, max_images=args.max_images, what="--samples", allow_stats=False)
    reference = _open_source(args.reference, max_images=args.max_images, what="--reference", allow_stats=True)
    early_stats = None
    if reference.format == "stats":  # read (and checked) before any feature is computed
        try:
            early_stats = load_statistics(reference.path)
        except (KeyError, ValueError) as exc:
            raise CommandError(f"--reference: {exc}", code=1) from exc
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
    if early_stats is not None:
        reference_stats: FIDStatistics = early_stats
        if reference_stats.features is not None:  # a cache written by --save-reference-stats
            reference_features = torch.from_numpy(reference_stats.features)
        elif reference.num_images:  # ADM reference batches also hold their images: precision/recall use them
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
    if not np.isfinite(fid):  # JSON shows it as null: say why
        unavailable["fid"] = "not finite: the sample or reference features contain NaN or inf values"
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
        if reference_features is not None and reference_stats.features is None:
            reference_stats.features = reference_features.float().cpu().numpy()
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
