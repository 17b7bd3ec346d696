"""LLaMA-style decoder blocks (LlamaGen design, SPEC §6.2/§6.3): RMSNorm, SwiGLU, 2-D RoPE, no biases.

The trunk takes already-embedded tokens and explicit per-token grid positions, so every generator kind builds its own
sequence (class token, merge instruction, raster or permuted image tokens) and mask, and shares these blocks. Attention
runs in one of three ways:

- full sequence, ``mask`` = a boolean ``[B or 1, 1, S, S]`` (True = may attend) or ``None`` = plain causal (or, with
  ``causal=False``, bidirectional: every token sees every token, as MaskGIT). This is the training path and the
  no-cache reference of decoding;
- with a cache (:mod:`mergevq.generator.kv_cache`): the cache stores each layer's new keys/values and returns the
  keys to attend over, with the mask it built for the step.

Einstein legend:
    B   batch
    S   tokens in this forward (full sequence, or the new tokens of a decoding step)
    C   width; F SwiGLU hidden size
    H   heads, D = C / H head dimension
    T   keys attended (S without a cache)
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergevq.generator.config import GeneratorConfig
from mergevq.nn.rope import Rotary, apply_rotary, rotary_2d

__all__ = ["Attention", "Block", "FeedForward", "KVCache", "RMSNorm", "Transformer", "init_weights"]


class KVCache(Protocol):
    """What attention needs from a cache (see :mod:`mergevq.generator.kv_cache`)."""

    length: int  # sequence slots already stored

    def begin(self, values_BN: Tensor) -> Tensor | None: ...
    def update(self, layer: int, k_BHND: Tensor, v_BHND: Tensor) -> tuple[Tensor, Tensor]: ...
    def end(self) -> None: ...


class RMSNorm(nn.Module):
    """``x / rms(x) · weight``, computed in float32 whatever the input precision."""

    def __init__(self, dim: int, *, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU ``w2(silu(w1 x) · w3 x)`` without biases, dropout on the output."""

    def __init__(self, dim: int, *, hidden: int, dropout: float) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x_BSC: Tensor) -> Tensor:
        return self.drop(self.w2(F.silu(self.w1(x_BSC)) * self.w3(x_BSC)))


class Attention(nn.Module):
    """Causal, bidirectional or masked self-attention with fused qkv, RoPE on q and k, and an optional KV cache."""

    def __init__(self, dim: int, *, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x_BSC: Tensor,
        *,
        rotary: Rotary | None,
        mask: Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
        causal: bool = True,
    ) -> Tensor:
        batch, tokens, channels = x_BSC.shape
        qkv = self.qkv(x_BSC).view(batch, tokens, 3, self.num_heads, channels // self.num_heads)
        q_BHSD, k_BHSD, v_BHSD = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if rotary is not None:
            q_BHSD, k_BHSD = apply_rotary(q_BHSD, rotary), apply_rotary(k_BHSD, rotary)
        if cache is not None:
            k_BHTD, v_BHTD = cache.update(layer, k_BHSD, v_BHSD)
            out = F.scaled_dot_product_attention(q_BHSD, k_BHTD, v_BHTD, attn_mask=mask)
        elif mask is None:
            out = F.scaled_dot_product_attention(q_BHSD, k_BHSD, v_BHSD, is_causal=causal)
        else:
            out = F.scaled_dot_product_attention(q_BHSD, k_BHSD, v_BHSD, attn_mask=mask)
        return self.drop(self.proj(out.transpose(1, 2).reshape(batch, tokens, channels)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + ffn(norm(x))``."""

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.width, eps=config.norm_eps)
        self.attn = Attention(config.width, num_heads=config.num_heads, dropout=config.resid_dropout)
        self.ffn_norm = RMSNorm(config.width, eps=config.norm_eps)
        self.ffn = FeedForward(config.width, hidden=config.hidden_dim, dropout=config.ffn_dropout)

    def forward(
        self,
        x_BSC: Tensor,
        *,
        rotary: Rotary | None,
        mask: Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
        causal: bool = True,
    ) -> Tensor:
        x_BSC = x_BSC + self.attn(
            self.attn_norm(x_BSC), rotary=rotary, mask=mask, cache=cache, layer=layer, causal=causal
        )
        return x_BSC + self.ffn(self.ffn_norm(x_BSC))


class Transformer(nn.Module):
    """The spatial stack: ``depth`` blocks over an embedded sequence; returns the residual stream (no final norm).

    The final norm lives with the output heads (:mod:`mergevq.generator.heads`), after the intra-position blocks.
    """

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.rope_base = config.rope_base
        self.token_drop = nn.Dropout(config.token_dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))

    def forward(
        self,
        x_BSC: Tensor,
        *,
        positions_BS2: Tensor,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
        causal: bool = True,
    ) -> Tensor:
        """``positions_BS2``: each token's (row, col), row < 0 for no rotation; ``[1, S, 2]`` broadcasts.

        Without a cache, ``mask`` None means plain causal attention, or bidirectional attention with ``causal=False``.
        With a cache, ``mask`` is the one its ``begin`` returned (None: every cached key is visible).
        """
        rotary = rotary_2d(positions_BS2.to(x_BSC.device), head_dim=self.head_dim, base=self.rope_base)
        x_BSC = self.token_drop(x_BSC)
        for layer, block in enumerate(self.blocks):
            x_BSC = block(x_BSC, rotary=rotary, mask=mask, cache=cache, layer=layer, causal=causal)
        return x_BSC


def init_weights(module: nn.Module, *, std: float) -> None:
    """LlamaGen init: linear and embedding weights ~ N(0, std); RMSNorm weights stay 1 (output heads: zeroed later)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
