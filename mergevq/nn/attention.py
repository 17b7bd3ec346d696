"""Multi-head attention on PyTorch SDPA with proportional attention for merged tokens.

A merged token of size ``s`` stands for ``s`` original tokens. Proportional attention (ToMe; MergeVQ Eq. 14) adds
``log s_j`` to the logit of every key ``j``: ``softmax(QKᵀ/√d + log s)``. A token of size ``s`` then receives exactly
the attention that ``s`` identical copies of it would receive together.

Einstein legend:
    B   batch
    T   tokens (self-attention)
    Tq  query tokens, Tk key/value tokens (cross-attention)
    C   model width; Ckv width of the cross-attention key/value input
    H   heads, D = C / H head dimension
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Attention", "CrossAttention"]


def _split_heads(x_BTC: Tensor, num_heads: int) -> Tensor:
    batch, tokens, channels = x_BTC.shape
    return x_BTC.view(batch, tokens, num_heads, channels // num_heads).transpose(1, 2)  # [B, H, T, D]


def _merge_heads(x_BHTD: Tensor) -> Tensor:
    batch, _, tokens, _ = x_BHTD.shape
    return x_BHTD.transpose(1, 2).reshape(batch, tokens, -1)  # [B, T, C]


def _log_size_bias(size: Tensor | None, *, dtype: torch.dtype) -> Tensor | None:
    """``[B, Tk]`` key sizes -> additive mask ``[B, 1, 1, Tk]`` broadcast over heads and queries."""
    if size is None:
        return None
    return size.log().to(dtype)[:, None, None, :]


class Attention(nn.Module):
    """Self-attention; optionally proportional to token sizes, and returning the ToMe matching metric."""

    def __init__(self, dim: int, *, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: Tensor, *, size: Tensor | None = None, return_metric: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """``x`` ``[B, T, C]``, ``size`` ``[B, T]`` float token sizes (None: all 1).

        Returns ``(out [B, T, C], metric)``; ``metric`` is the key vectors averaged over heads, ``[B, T, D]``, when
        ``return_metric`` (the similarity used to pick tokens to merge), else None.
        """
        q, k, v = (_split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=_log_size_bias(size, dtype=q.dtype))
        metric = k.mean(dim=1) if return_metric else None
        return self.proj(_merge_heads(out)), metric


class CrossAttention(nn.Module):
    """Queries attend to a separate key/value sequence (e.g. recovery queries over merged tokens)."""

    def __init__(self, dim: int, *, num_heads: int, kv_dim: int | None = None, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_kv = nn.Linear(kv_dim or dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q: Tensor, kv: Tensor, *, kv_size: Tensor | None = None) -> Tensor:
        """``q`` ``[B, Tq, C]``, ``kv`` ``[B, Tk, Ckv]``, ``kv_size`` ``[B, Tk]`` (None: all 1) -> ``[B, Tq, C]``."""
        q_BHTD = _split_heads(self.to_q(q), self.num_heads)
        k_BHTD, v_BHTD = (_split_heads(t, self.num_heads) for t in self.to_kv(kv).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, attn_mask=_log_size_bias(kv_size, dtype=q.dtype))
        return self.proj(_merge_heads(out))
