"""Generic building blocks (no MergeVQ knowledge): norms, ResBlocks, resampling, MLPs, LayerScale.

Shapes: B batch, C channels, H/W spatial size, T tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def group_norm(channels: int, *, groups: int = 32, affine: bool = True) -> nn.GroupNorm:
    """GroupNorm with at most ``groups`` groups (fewer when ``channels`` is small or not divisible)."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels, eps=1e-6, affine=affine)


class ResBlock(nn.Module):
    """``GN → SiLU → conv3×3 → GN → SiLU → conv3×3`` plus a (1×1) shortcut; all convs bias-free (SPEC §2.2)."""

    def __init__(self, in_channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class Downsample(nn.Module):
    """Stride-2 3×3 convolution (bias-free, as the encoder's other convs)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class PixelShuffleUpsample(nn.Module):
    """``conv3×3 C → 4C`` then depth-to-space ×2: [B,C,H,W] → [B,C,2H,2W]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels * 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.pixel_shuffle(self.conv(x), 2)


class AdaptiveGroupNorm(nn.Module):
    """GN without affine, modulated by image-global statistics of the quantised map ``z`` (SPEC §2.8).

    ``x · γ(std_hw(z)) + β(mean_hw(z))``; γ starts at 1 and β at 0, so an untrained block is a plain GroupNorm.
    """

    def __init__(self, channels: int, *, cond_channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels, affine=False)
        self.gamma = nn.Linear(cond_channels, channels)
        self.beta = nn.Linear(cond_channels, channels)
        nn.init.zeros_(self.gamma.weight)
        nn.init.ones_(self.gamma.bias)
        nn.init.zeros_(self.beta.weight)
        nn.init.zeros_(self.beta.bias)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        """x [B,C,H,W], z [B,c,h,w] → [B,C,H,W]."""
        z = z.flatten(2)
        std = z.var(dim=-1, unbiased=False).add(1e-5).sqrt()
        mean = z.mean(dim=-1)
        return self.norm(x) * self.gamma(std)[..., None, None] + self.beta(mean)[..., None, None]


class LayerScale(nn.Module):
    def __init__(self, dim: int, *, init: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """``fc1 → GELU → fc2`` on [B,T,C]."""

    def __init__(self, dim: int, *, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MixFFN(nn.Module):
    """``fc1 → depthwise conv3×3 → GELU → fc2`` (SegFormer's Mix-FFN); tokens form an [h, w] grid."""

    def __init__(self, dim: int, *, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, *, grid: tuple[int, int]) -> Tensor:
        b, t, _ = x.shape
        h = self.fc1(x)
        h = self.dwconv(h.transpose(1, 2).reshape(b, -1, *grid)).flatten(2).transpose(1, 2)
        return self.fc2(F.gelu(h))


def tokens_to_map(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """[B, T=h·w, C] → [B, C, h, w]."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)


def map_to_tokens(x: Tensor) -> Tensor:
    """[B, C, h, w] → [B, h·w, C] (raster order)."""
    return x.flatten(2).transpose(1, 2)
