"""Decoder: a transformer part (depth-wise conv positional encoding, MixFFN, LayerScale) on the recovered L-grid,
then a CNN part (AdaGN modulated by the quantised map, ResBlocks, pixel-shuffle upsampling), SPEC §2.8.

Shapes: B batch, d LFQ bits, h×w token grid, C channels, H×W image.

Memory format: the CNN part runs in one layout chosen on purpose, ``Decoder.memory_format`` (contiguous NCHW by
default). On CPU a convolution's output follows its input's layout, so without this the layout of the incoming
``z`` decided it: the recovered map is a transposed view of the token tensor ([B, L, d] → [B, d, h, w]), i.e.
channels_last, and every conv and GroupNorm up to the full resolution, forward and backward, inherited it. On these
CPUs channels_last makes convolution forward+backward at [2, 64, 256, 256] about 2× slower and GroupNorm 3.5-4.5×
slower than NCHW, and a gr-d64 training step about 1.2× slower (``benchmarks/bench_tokenizer.py``: layout check and
``time_vs_nchw``). The transformer part's depth-wise conv (MixFFN) works on a channels_last view of the tokens by
design: it is on the small token grid and saves two transposing copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergevq.nn.attention import Attention
from mergevq.nn.blocks import (
    AdaptiveGroupNorm,
    LayerScale,
    MixFFN,
    PixelShuffleUpsample,
    ResBlock,
    group_norm,
    map_to_tokens,
    tokens_to_map,
)
from mergevq.tokenizer.config import TokenizerConfig


class DecoderBlock(nn.Module):
    """Pre-norm self-attention block whose MLP is a MixFFN (no merging, no CLS)."""

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float, layerscale_init: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.ls1 = LayerScale(dim, init=layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MixFFN(dim, hidden=int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init=layerscale_init)

    def forward(self, x: Tensor, *, grid: tuple[int, int]) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x))[0])
        return x + self.ls2(self.mlp(self.norm2(x), grid=grid))


class DecoderLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, *, num_blocks: int, cond_channels: int, upsample: bool):
        super().__init__()
        self.adanorm = AdaptiveGroupNorm(in_channels, cond_channels=cond_channels)
        blocks = []
        ch = in_channels
        for _ in range(num_blocks):
            blocks.append(ResBlock(ch, out_channels))
            ch = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.upsample = PixelShuffleUpsample(out_channels) if upsample else nn.Identity()

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        return self.upsample(self.blocks(self.adanorm(x, z)))


class Decoder(nn.Module):
    """Transformer on the token grid, then the CNN part in ``memory_format`` (see the module docstring).

    ``memory_format`` is ``torch.contiguous_format`` (NCHW) or ``torch.channels_last``; it may be changed after
    construction. The conv weights must stay NCHW for NCHW to hold (a channels_last weight also flips the output).
    """

    def __init__(
        self, config: TokenizerConfig, *, memory_format: torch.memory_format = torch.contiguous_format
    ) -> None:
        super().__init__()
        if memory_format not in (torch.contiguous_format, torch.channels_last):
            raise ValueError(
                f"memory_format must be torch.contiguous_format or torch.channels_last, not {memory_format}"
            )
        self.memory_format = memory_format
        width = config.decoder_width
        base, mult = config.dec_base_channels, config.dec_channel_mult
        self.conv_in = nn.Conv2d(config.codebook_bits, width, 3, padding=1)
        self.pos_conv = nn.Conv2d(width, width, 3, padding=1, groups=width)  # CPE, added once before the blocks
        self.blocks = nn.ModuleList(
            DecoderBlock(
                width,
                num_heads=config.decoder_heads,
                mlp_ratio=config.mlp_ratio,
                layerscale_init=config.layerscale_init,
            )
            for _ in range(config.decoder_depth)
        )
        levels = []
        ch = width
        for i in reversed(range(len(mult))):  # coarse to fine
            out = base * mult[i]
            extra = config.decoder_extra_res_blocks if i > 0 else 0
            levels.append(
                DecoderLevel(
                    ch,
                    out,
                    num_blocks=config.decoder_res_blocks + extra,
                    cond_channels=config.codebook_bits,
                    upsample=i > 0,
                )
            )
            ch = out
        self.levels = nn.ModuleList(levels)
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """z [B,d,h,w] (recovered quantised map, any layout) → image [B,3,H,W], contiguous NCHW."""
        z = z.contiguous(memory_format=self.memory_format)  # the caller's layout must not pick the decoder's
        x = self.conv_in(z)
        x = x + self.pos_conv(x)
        grid = (x.shape[-2], x.shape[-1])
        # Tokens contiguous [B,T,C] whatever the map layout: LayerNorm and the linears want it.
        tokens = map_to_tokens(x).contiguous()
        for block in self.blocks:
            tokens = block(tokens, grid=grid)
        # tokens_to_map gives a channels_last view: fix the layout again before the CNN part.
        x = tokens_to_map(tokens, grid).contiguous(memory_format=self.memory_format)
        for level in self.levels:
            x = level(x, z)
        # 3-channel output: converting it costs nothing and callers get an ordinary image tensor.
        return self.conv_out(F.silu(self.norm_out(x))).contiguous()
