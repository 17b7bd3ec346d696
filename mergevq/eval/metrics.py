"""Reconstruction metrics (PSNR, SSIM, LPIPS) and codebook usage, per image and streaming.

Conventions. Images are ``[B, 3, H, W]`` in ``[-1, 1]`` (clamp reconstructions before calling). Every metric is
computed **per image** and the dataset figure is the mean of the per-image values (the authors' script added the
whole-batch PSNR once per image, SPEC §10.1 item 8, which makes the result depend on the batch size).
:class:`MetricAccumulator` keeps every per-image value and sums with ``math.fsum``, so the result is bit-identical
for any batching or DDP sharding. Identical images have PSNR ``+inf``; :func:`summarize` averages the finite values
and reports the number of infinite ones instead of silently dropping or propagating them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "CodebookUsage",
    "MetricAccumulator",
    "ReconstructionEvaluator",
    "Summary",
    "psnr",
    "ssim",
    "summarize",
]


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two [B, C, H, W] tensors of equal shape, got {tuple(x.shape)}, {tuple(y.shape)}")


def psnr(x: Tensor, y: Tensor, *, data_range: float = 2.0) -> Tensor:
    """Per-image PSNR in dB, ``10 log10(data_range² / MSE)``: ``x, y [B, C, H, W]`` → float64 ``[B]``.

    The MSE is over all channels and pixels of one image, in float64. ``data_range=2`` for ``[-1, 1]`` images
    (the same value as ``data_range=1`` on ``[0, 1]``). Identical images give ``+inf``.
    """
    _check_pair(x, y)
    mse = (x.double() - y.double()).square().flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)  # mse == 0 → +inf


def _gaussian_window(window: int, sigma: float, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    offsets = torch.arange(window, dtype=dtype, device=device) - (window - 1) / 2
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    return weights / weights.sum()


def ssim(
    x: Tensor,
    y: Tensor,
    *,
    data_range: float = 2.0,
    window: int = 11,
    sigma: float = 1.5,
    min_value: float = -1.0,
) -> Tensor:
    """Per-image SSIM (Wang et al. 2004): ``x, y [B, C, H, W]`` → float64 ``[B]`` in ``[-1, 1]``.

    Local statistics use a normalised ``window×window`` Gaussian (σ=1.5), population (biased) variances and
    ``C1 = (0.01 L)², C2 = (0.03 L)²`` with ``L = data_range``. The SSIM map is evaluated only where the window lies
    inside the image (no padding) and averaged over those positions and over the **RGB channels separately** (not on
    luminance). This is ``skimage.metrics.structural_similarity(a, b, channel_axis=-1, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=L)``, which also crops the border before averaging.

    SSIM's luminance term assumes non-negative intensities, so the images are shifted by ``-min_value`` first: with
    the defaults, ``[-1, 1]`` inputs are scored as ``[0, 2]`` intensities, identical to skimage on the same images
    in ``[0, 1]`` (``data_range=1``) or in 0..255. Pass ``min_value=0`` to score the raw values instead.
    """
    _check_pair(x, y)
    height, width = x.shape[-2:]
    if min(height, width) < window:
        raise ValueError(f"images of {height}×{width} are smaller than the {window}×{window} SSIM window")
    channels = x.shape[1]
    x = x.double() - min_value
    y = y.double() - min_value
    g = _gaussian_window(window, sigma, dtype=x.dtype, device=x.device)
    # One separable depthwise filter over the five moment maps of every channel.
    maps = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    groups = maps.shape[1]
    maps = F.conv2d(maps, g.view(1, 1, window, 1).expand(groups, 1, window, 1), groups=groups)
    maps = F.conv2d(maps, g.view(1, 1, 1, window).expand(groups, 1, 1, window), groups=groups)
    mu_x, mu_y, e_xx, e_yy, e_xy = maps.split(channels, dim=1)
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov_xy = e_xy - mu_x * mu_y
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
    denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return (numerator / denominator).flatten(1).mean(1)


@dataclass(frozen=True)
class Summary:
    """Mean over the finite values plus how many were ``+inf``, ``-inf`` or NaN (never silently dropped)."""

    mean: float
    num_finite: int
    num_inf: int = 0
    num_nan: int = 0

    @property
    def count(self) -> int:
        return self.num_finite + self.num_inf + self.num_nan

    def __str__(self) -> str:
        text = f"{self.mean:.4f} (n={self.num_finite}"
        if self.num_inf:
            text += f", plus {self.num_inf} inf"
        if self.num_nan:
            text += f", plus {self.num_nan} nan"
        return text + ")"


def summarize(values: Tensor | np.ndarray | list[float]) -> Summary:
    """Exact (``math.fsum``) mean of the finite entries of ``values [N]``, with counts of the non-finite ones.

    If there are no finite values the mean is ``+inf`` when all non-NaN values are ``+inf`` (e.g. every PSNR of a
    lossless codec), otherwise NaN.
    """
    if isinstance(values, Tensor):
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = array[np.isfinite(array)]
    num_nan = int(np.isnan(array).sum())
    num_inf = int(array.size - finite.size - num_nan)
    if finite.size:
        mean = math.fsum(finite.tolist()) / finite.size
    elif num_inf and bool(np.all(array[~np.isnan(array)] > 0)):
        mean = math.inf
    else:
        mean = math.nan
    return Summary(mean=mean, num_finite=int(finite.size), num_inf=num_inf, num_nan=num_nan)


class MetricAccumulator:
    """Streaming per-image metrics whose summaries do not depend on batch size or order.

    ``update(psnr=[B], ssim=[B], ...)`` appends the per-image values; ``summary()`` returns a :class:`Summary` per
    name. All values are kept (8 bytes per image and metric: 400 KB for 50k images), which makes the sums exact
    and lets :meth:`merge` combine shards from DDP ranks.
    """

    def __init__(self) -> None:
        self._values: dict[str, list[np.ndarray]] = {}

    def update(self, **values: Tensor | np.ndarray) -> None:
        for name, batch in values.items():
            if isinstance(batch, Tensor):
                batch = batch.detach().cpu().double().numpy()
            self._values.setdefault(name, []).append(np.asarray(batch, dtype=np.float64).reshape(-1))

    def merge(self, other: MetricAccumulator) -> MetricAccumulator:
        for name, chunks in other._values.items():
            self._values.setdefault(name, []).extend(chunks)
        return self

    def values(self, name: str) -> np.ndarray:
        """All per-image values of one metric, in update order, ``[N]`` float64."""
        chunks = self._values.get(name, [])
        return np.concatenate(chunks) if chunks else np.zeros(0)

    def names(self) -> list[str]:
        return list(self._values)

    def summary(self) -> dict[str, Summary]:
        return {name: summarize(self.values(name)) for name in self._values}


def _default_lpips() -> nn.Module:
    try:
        from mergevq.losses.perceptual import LPIPS
    except ImportError as error:
        raise ImportError(f"LPIPS needs mergevq.losses.perceptual.LPIPS ({error})") from error
    return LPIPS(variant="shift_tolerant").eval()


class ReconstructionEvaluator:
    """Per-image PSNR, SSIM and (optionally) LPIPS of reconstructions, accumulated over a dataset.

    ``lpips``: an ``nn.Module`` mapping two ``[B, 3, H, W]`` images in ``[-1, 1]`` to ``[B]`` distances; ``"auto"``
    builds ``mergevq.losses.perceptual.LPIPS(variant="shift_tolerant")`` (the shift-tolerant VGG LPIPS whose weights
    exist offline; not numerically identical to the pip ``lpips`` package the authors used); None skips LPIPS.
    """

    def __init__(self, *, lpips: nn.Module | str | None = None, data_range: float = 2.0) -> None:
        if isinstance(lpips, str):
            if lpips != "auto":
                raise ValueError(f"lpips must be an nn.Module, 'auto' or None, got {lpips!r}")
            lpips = _default_lpips()
        self.lpips = lpips
        self.data_range = data_range
        self.accumulator = MetricAccumulator()

    @torch.no_grad()
    def update(self, originals: Tensor, reconstructions: Tensor) -> dict[str, Tensor]:
        """Score one batch ``[B, 3, H, W]``; returns the per-image values ``{name: [B]}`` that were accumulated."""
        values = {
            "psnr": psnr(reconstructions, originals, data_range=self.data_range),
            "ssim": ssim(reconstructions, originals, data_range=self.data_range),
        }
        if self.lpips is not None:
            values["lpips"] = self.lpips(reconstructions, originals).reshape(-1).double()
        self.accumulator.update(**values)
        return values

    def merge(self, other: ReconstructionEvaluator) -> ReconstructionEvaluator:
        self.accumulator.merge(other.accumulator)
        return self

    def summary(self) -> dict[str, Summary]:
        return self.accumulator.summary()


class CodebookUsage:
    """Streaming histogram of code indices over a codebook of ``num_codes`` entries (``2**d`` for a d-bit LFQ).

    ``usage`` is the fraction of codes seen at least once (the authors' "utilization"); ``perplexity`` is
    ``exp(H)`` of the empirical code distribution (natural log), i.e. the effective number of equally used codes.
    Counting is one vectorised ``torch.bincount`` per batch; :meth:`merge` / :meth:`all_reduce` combine ranks.
    """

    def __init__(self, *, num_codes: int, device: str | torch.device = "cpu") -> None:
        if num_codes < 1:
            raise ValueError(f"num_codes must be >= 1, got {num_codes}")
        self.num_codes = num_codes
        self.counts = torch.zeros(num_codes, dtype=torch.int64, device=device)

    def update(self, indices: Tensor) -> None:
        """Count ``indices`` (any shape, integer, each in ``[0, num_codes)``)."""
        if indices.is_floating_point() or indices.is_complex():
            raise TypeError(f"indices must be integers, got {indices.dtype}")
        flat = indices.reshape(-1).to(device=self.counts.device, dtype=torch.int64)
        if flat.numel() == 0:
            return
        low, high = int(flat.min()), int(flat.max())
        if low < 0 or high >= self.num_codes:
            raise ValueError(f"indices must lie in [0, {self.num_codes}), got range [{low}, {high}]")
        self.counts += torch.bincount(flat, minlength=self.num_codes)

    def merge(self, other: CodebookUsage) -> CodebookUsage:
        if other.num_codes != self.num_codes:
            raise ValueError(f"cannot merge {other.num_codes} codes into {self.num_codes}")
        self.counts += other.counts.to(self.counts.device)
        return self

    def all_reduce(self, group: object | None = None) -> CodebookUsage:
        """Sum the counts over all ranks in place (no-op without an initialised process group)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts, op=dist.ReduceOp.SUM, group=group)
        return self

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def num_used(self) -> int:
        return int((self.counts > 0).sum())

    @property
    def usage(self) -> float:
        return self.num_used / self.num_codes

    @property
    def perplexity(self) -> float:
        total = self.total
        if total == 0:
            return math.nan
        p = self.counts[self.counts > 0].double() / total
        return math.exp(float(-(p * p.log()).sum()))
