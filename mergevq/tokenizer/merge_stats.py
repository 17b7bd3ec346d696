"""Diagnostics of a merge: how large the groups are, whether they follow the grid rows, and whether large groups sit
on uniform image regions (what ToMe's similarity merging is meant to do; issue 9 §2's comparison of merge policies).

All functions read an assignment ``[B, L]`` (``assignment[b, l] = k``, groups ``0..K-1`` all non-empty, as
:meth:`mergevq.MergeVQ.encode` returns) on an ``h×w`` grid in raster order, and optionally the images ``[B, C, H, W]``
whose ``f×f`` pixel cells the positions cover (``H = f·h``, ``W = f·w``).

Shapes: B batch, L = h·w positions, K groups, C image channels.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "MergeStats",
    "group_pixel_variance",
    "image_pixel_variance",
    "merge_stats",
    "pearson",
    "row_confined",
    "size_histogram",
]


class MergeStats(NamedTuple):
    size_histogram: Tensor  # [max size + 1] int64: number of groups of each size, pooled over the batch
    mean_size: float  # L / K averaged over the batch
    max_size: int  # largest group in the batch
    row_share: float  # share of groups whose positions all lie in one grid row (single positions included)
    row_share_multi: float  # the same among groups of two or more positions (nan when there are none)
    size_variance_corr: float  # Pearson r over all groups of (size, pixel variance); nan without images
    image_corr: float  # Pearson r over the images of (pixel variance, largest group size); nan without images


def _check(assignment: Tensor, grid: tuple[int, int]) -> int:
    if assignment.dim() != 2 or assignment.dtype != torch.int64:
        raise ValueError(f"assignment must be int64 [B, L], got {assignment.dtype} {tuple(assignment.shape)}")
    h, w = grid
    if assignment.shape[1] != h * w:
        raise ValueError(f"assignment has L={assignment.shape[1]} positions but the grid is {h}×{w}")
    return int(assignment.max()) + 1


def _sizes(assignment: Tensor, num_groups: int) -> Tensor:
    counts = torch.zeros(assignment.shape[0], num_groups, dtype=torch.int64, device=assignment.device)
    return counts.scatter_add_(1, assignment, torch.ones_like(assignment))


def size_histogram(*, assignment: Tensor) -> Tensor:
    """``[max size + 1]`` int64: entry ``s`` counts the groups of ``s`` positions, over the whole batch."""
    sizes = _sizes(assignment, int(assignment.max()) + 1)
    return torch.bincount(sizes[sizes > 0])


def row_confined(*, assignment: Tensor, grid: tuple[int, int]) -> Tensor:
    """``[B, K]`` bool: the group's positions all lie in one row of the ``h×w`` grid."""
    k = _check(assignment, grid)
    row = (torch.arange(assignment.shape[1], device=assignment.device) // grid[1]).expand_as(assignment)
    shape = (assignment.shape[0], k)
    lo = torch.full(shape, grid[0], device=assignment.device).scatter_reduce(1, assignment, row, reduce="amin")
    hi = torch.full(shape, -1, device=assignment.device).scatter_reduce(1, assignment, row, reduce="amax")
    return lo == hi


def _cell_moments(images: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor, int]:
    """Per position and channel: pixel sum and sum of squares ``[B, L, C]`` (float64), and pixels per cell."""
    b, c, height, width = images.shape
    h, w = grid
    if height % h or width % w or height // h != width // w:
        raise ValueError(f"images {tuple(images.shape)} do not split into square cells of a {h}×{w} grid")
    f = height // h
    cells = images.double().reshape(b, c, h, f, w, f).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c, f * f)
    return cells.sum(-1), cells.square().sum(-1), f * f


def group_pixel_variance(*, assignment: Tensor, images: Tensor, grid: tuple[int, int]) -> Tensor:
    """``[B, K]`` float64: variance of the pixels a group covers, per channel, averaged over channels."""
    k = _check(assignment, grid)
    s1, s2, pixels = _cell_moments(images, grid)
    index = assignment.unsqueeze(-1).expand(-1, -1, s1.shape[-1])
    g1 = s1.new_zeros(assignment.shape[0], k, s1.shape[-1]).scatter_add_(1, index, s1)
    g2 = s2.new_zeros(assignment.shape[0], k, s2.shape[-1]).scatter_add_(1, index, s2)
    n = (_sizes(assignment, k) * pixels).double().clamp_min(1).unsqueeze(-1)  # empty slots: variance 0
    return (g2 / n - (g1 / n).square()).clamp_min(0).mean(-1)


def image_pixel_variance(*, images: Tensor) -> Tensor:
    """``[B]`` float64: pixel variance of each image, per channel, averaged over channels."""
    return images.double().flatten(2).var(dim=-1, unbiased=False).mean(-1)


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two equally long vectors (float64); nan when either is constant or shorter than 2."""
    x, y = x.double().flatten(), y.double().flatten()
    if x.numel() != y.numel():
        raise ValueError(f"pearson needs equally long vectors, got {x.numel()} and {y.numel()}")
    if x.numel() < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx.square().sum()) * float(dy.square().sum()))
    return float((dx * dy).sum()) / denom if denom > 0 else math.nan


def merge_stats(*, assignment: Tensor, grid: tuple[int, int], images: Tensor | None = None) -> MergeStats:
    """All diagnostics of one batch of assignments (and images, for the uniformity correlations)."""
    k = _check(assignment, grid)
    sizes = _sizes(assignment, k)
    present = sizes > 0  # samples with fewer groups than the batch's largest index leave empty slots
    in_row = row_confined(assignment=assignment, grid=grid)
    multi = sizes > 1
    row_share_multi = float(in_row[multi].double().mean()) if bool(multi.any()) else math.nan
    size_corr = image_corr = math.nan
    if images is not None:
        if images.shape[0] != assignment.shape[0]:
            raise ValueError(f"images hold {images.shape[0]} samples but assignment {assignment.shape[0]}")
        variance = group_pixel_variance(assignment=assignment, images=images, grid=grid)
        size_corr = pearson(sizes[present], variance[present])
        image_corr = pearson(image_pixel_variance(images=images), sizes.amax(dim=1))
    return MergeStats(
        size_histogram=torch.bincount(sizes[present]),
        mean_size=float(sizes[present].double().mean()),
        max_size=int(sizes.max()),
        row_share=float(in_row[present].double().mean()),
        row_share_multi=row_share_multi,
        size_variance_corr=size_corr,
        image_corr=image_corr,
    )
