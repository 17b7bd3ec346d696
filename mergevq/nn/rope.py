"""2-D rotary position embedding with explicit per-token positions.

Every token carries its own ``(row, col)``; a negative row marks a token without a position (class or instruction
tokens), which gets a zero angle, i.e. the identity rotation. Positions are data, not a table index, so a caller can
rotate tokens by any grid cell in any order (raster, random permutation, a sparse kept set).

Head channels are used in adjacent pairs ``(2m, 2m+1)``. The first ``D/4`` pairs rotate with the row, the last ``D/4``
with the column; within each axis pair ``m`` turns at frequency ``base^(−2m/(D/2))``.

Einstein legend:
    B   batch (or 1, broadcast)
    H   heads
    S   tokens
    D   head dimension; R = D/2 rotated pairs
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Rotary", "apply_rotary", "rotary_2d"]


class Rotary(NamedTuple):
    cos: Tensor  # [B, S, R] float32
    sin: Tensor  # [B, S, R] float32


def rotary_2d(positions_BS2: Tensor, *, head_dim: int, base: float = 10000.0) -> Rotary:
    """Rotation tables for tokens at ``positions_BS2`` (int, ``[..., 0] = row``, ``[..., 1] = col``; row < 0: none)."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
    if positions_BS2.shape[-1] != 2:
        raise ValueError(f"positions must end in (row, col), got shape {tuple(positions_BS2.shape)}")
    quarter = head_dim // 4
    device = positions_BS2.device
    freqs_Q = base ** (-torch.arange(quarter, device=device, dtype=torch.float32) * 2 / (head_dim // 2))
    pos = positions_BS2.to(torch.float32)
    angles_BSR = torch.cat([pos[..., :1] * freqs_Q, pos[..., 1:] * freqs_Q], dim=-1)
    # A token's angles depend only on its own position: cached and uncached paths compute identical tables.
    angles_BSR = angles_BSR.masked_fill(positions_BS2[..., :1] < 0, 0.0)
    return Rotary(angles_BSR.cos().float(), angles_BSR.sin().float())


def apply_rotary(x_BHSD: Tensor, rotary: Rotary) -> Tensor:
    """Rotate each channel pair of ``x`` by its token's angle; computed in float32, returned in ``x``'s dtype."""
    pairs = x_BHSD.float().reshape(*x_BHSD.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = rotary.cos.unsqueeze(-3), rotary.sin.unsqueeze(-3)  # [B, 1, S, R]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x_BHSD)
