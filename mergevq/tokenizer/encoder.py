"""E1 (CNN or patch stem) + E2 (transformer with token merging after attention in every block).

Shapes: B batch, H×W image, h×w token grid (L = h·w), K merged tokens, D width, d LFQ bits.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergevq.nn.attention import Attention
from mergevq.nn.blocks import Downsample, LayerScale, Mlp, ResBlock, group_norm, map_to_tokens
from mergevq.nn.tome import MergeState, init_merge_state, merge_schedule, merge_step
from mergevq.tokenizer.config import TokenizerConfig
from mergevq.tokenizer.merge_policy import MergePlan


class CNNStem(nn.Module):
    """``conv_in`` then per level ``num_res_blocks`` ResBlocks and a stride-2 conv (all but the last level)."""

    def __init__(self, *, base_channels: int, channel_mult: tuple[int, ...], num_res_blocks: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, base_channels, 3, padding=1, bias=False)
        layers: list[nn.Module] = []
        ch = base_channels
        for i, mult in enumerate(channel_mult):
            out = base_channels * mult
            for _ in range(num_res_blocks):
                layers.append(ResBlock(ch, out))
                ch = out
            if i < len(channel_mult) - 1:
                layers.append(Downsample(ch))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """[B,3,H,W] → [B,D,h,w]."""
        return self.layers(self.conv_in(x))


class PatchStem(nn.Module):
    """R variant: ``Conv2d(3, D, k=p, s=p)`` + GroupNorm with one group per channel (SPEC §2.2)."""

    def __init__(self, *, width: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch_size, stride=patch_size)
        self.norm = nn.GroupNorm(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x))


class MergeBlock(nn.Module):
    """Pre-norm ViT block; ToMe merging runs after the attention residual and before the MLP (SPEC §2.3)."""

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float, layerscale_init: float, prop_attn: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.ls1 = LayerScale(dim, init=layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden=int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init=layerscale_init)
        self.prop_attn = prop_attn

    def forward(self, state: MergeState, *, r: int, plan: MergePlan | None = None) -> MergeState:
        """One block; ``plan`` chooses the merge split (None: ToMe's alternate split, :func:`merge_step`)."""
        x = state.tokens
        attn, metric = self.attn(self.norm1(x), size=state.size if self.prop_attn else None, return_metric=r > 0)
        state = replace(state, tokens=x + self.ls1(attn))
        if r > 0:
            state = merge_step(state, metric=metric, r=r) if plan is None else plan.merge(state, metric=metric, r=r)
        x = state.tokens
        return replace(state, tokens=x + self.ls2(self.mlp(self.norm2(x))))


class EncoderOutput(NamedTuple):
    latents: Tensor  # [B, K, d] pre-quantisation values
    assignment: Tensor  # [B, L] int64 group of every position
    sizes: Tensor  # [B, K] positions per group
    cls: Tensor  # [B, D] CLS token after the last block
    grid: tuple[int, int]  # (h, w)


class Encoder(nn.Module):
    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        if config.stem == "cnn":
            self.stem: nn.Module = CNNStem(
                base_channels=config.base_channels,
                channel_mult=config.channel_mult,
                num_res_blocks=config.num_res_blocks,
            )
        else:
            self.stem = PatchStem(width=config.width, patch_size=config.patch_size)
        # No positional embedding anywhere (SPEC §2.2): position reaches the tokens through the stem only.
        self.cls_token = nn.Parameter(torch.randn(1, 1, config.width) * 1e-6)
        self.blocks = nn.ModuleList(
            MergeBlock(
                config.width,
                num_heads=config.num_heads,
                mlp_ratio=config.mlp_ratio,
                layerscale_init=config.layerscale_init,
                prop_attn=config.proportional_attention,
            )
            for _ in range(config.depth)
        )
        # GN → SiLU → 1×1 conv D → d (the authors apply it on a √K×√K reshape; a 1-D layout is equivalent
        # because GroupNorm pools over all positions, and it allows any K).
        self.norm_out = group_norm(config.width)
        self.proj_out = nn.Conv1d(config.width, config.codebook_bits, 1)

    def schedule(self, *, num_tokens: int, target: int) -> list[int]:
        return merge_schedule(
            num_tokens=num_tokens, target=target, num_layers=self.config.depth, kind=self.config.merge_schedule
        )

    def forward(self, x: Tensor, *, num_tokens: int) -> EncoderOutput:
        """x [B,3,H,W] in [-1,1] → K latent tokens (in raster order of their first source position)."""
        feats = self.stem(x)
        grid = (feats.shape[-2], feats.shape[-1])
        tokens = map_to_tokens(feats)
        length = tokens.shape[1]
        if not 1 <= num_tokens <= length:
            raise ValueError(f"num_tokens={num_tokens} is outside [1, L={length}] for a {grid[0]}×{grid[1]} grid")
        plan = MergePlan(
            policy=self.config.merge_policy,
            split=self.config.merge_split,
            window=self.config.merge_window,
            grid=grid,
            num_tokens=num_tokens,
            training=self.training,
        )
        state = init_merge_state(torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], 1), has_cls=True)
        for block, r in zip(self.blocks, self.schedule(num_tokens=length, target=num_tokens)):
            state = block(state, r=r, plan=None if plan.is_default else plan)
        cls, merged = state.tokens[:, 0], state.tokens[:, 1:]
        latents = self.proj_out(F.silu(self.norm_out(merged.transpose(1, 2)))).transpose(1, 2)
        return EncoderOutput(latents, state.assignment, state.size[:, 1:], cls, grid)


def build_align_head(kind: str, *, dim: int, out_dim: int) -> nn.Module | None:
    """CLS → teacher space. ``mlp_ln`` (G): Linear–GELU–LN–Linear; ``mlp3`` (G+R, R): three Linear layers."""
    hidden = 4 * dim
    if kind == "none":
        return None
    if kind == "mlp_ln":
        return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, out_dim))
    if kind == "mlp3":
        return nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, out_dim)
        )
    raise ValueError(f"unknown align head {kind!r}")
