"""Token recovery: K merged codes → L grid positions.

* :func:`recover` copies each group's code back to the positions it absorbed (``Ẑ_L = Sᵀ Ẑ_K``, paper Eq. 11); stage 1
  uses the encoder's true assignment.
* :class:`SourceRecovery` learns the assignment from the K codes alone (paper §3.2, Eq. 8–9, Table A2), for generators
  that produce only the K merged tokens (RandAR). L learnable recovery queries cross-attend to the K codes, then
  self-attention layers refine them; each position scores every merged token (``Q̃ Z̃_Kᵀ``) and takes the best.

Shapes: B batch, K merged tokens, L positions, d LFQ bits, W recovery width.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergevq.nn.attention import Attention, CrossAttention
from mergevq.nn.blocks import Mlp
from mergevq.nn.tome import unmerge


def recover(codes_BKd: Tensor, assignment_BL: Tensor) -> Tensor:
    """Copy merged codes to their positions: [B,K,d] + [B,L] → [B,L,d] (gradients flow to the codes)."""
    return unmerge(codes_BKd, assignment_BL)


def _order_embedding(num_tokens: int, dim: int, *, device: torch.device) -> Tensor:
    """Sinusoidal embedding of each merged token's relative rank (k + ½)/K: [K, dim].

    Merged tokens come in raster order of their first position, so the rank carries coarse location and works for
    any K (a learned per-index table would not).
    """
    rank = (torch.arange(num_tokens, device=device, dtype=torch.float32) + 0.5) / num_tokens
    freqs = torch.exp(torch.arange(dim // 2, device=device, dtype=torch.float32) * (-math.log(1000.0) / (dim // 2)))
    angles = rank[:, None] * freqs[None] * 2 * math.pi * 16
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return F.pad(emb, (0, dim - emb.shape[-1]))


class RecoveryLayer(nn.Module):
    """Decoder layer on the recovery queries: cross-attention to the K tokens, self-attention, MLP (pre-norm)."""

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.cross = CrossAttention(dim, num_heads=num_heads)
        self.norm_self = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden=int(dim * mlp_ratio))

    def forward(self, q: Tensor, kv: Tensor) -> Tensor:
        q = q + self.cross(self.norm_q(q), kv)
        q = q + self.attn(self.norm_self(q))[0]
        return q + self.mlp(self.norm_mlp(q))


class RecoveryOutput(NamedTuple):
    logits: Tensor  # [B, L, K] score of every merged token for every position
    assignment: Tensor  # [B, L] int64 argmax over K


class SourceRecovery(nn.Module):
    def __init__(
        self, *, num_positions: int, code_dim: int, width: int, depth: int, num_heads: int, mlp_ratio: float = 4.0
    ) -> None:
        super().__init__()
        self.num_positions = num_positions
        self.width = width
        self.kv_in = nn.Sequential(nn.Linear(code_dim, width), nn.LayerNorm(width))
        # "query position embeddings, similar to MaskFormer": one learnable query per grid position.
        self.queries = nn.Parameter(torch.randn(1, num_positions, width) * 0.02)
        self.layers = nn.ModuleList(
            RecoveryLayer(width, num_heads=num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.q_head = nn.Linear(width, width)
        self.k_head = nn.Linear(width, width)

    def forward(self, codes_BKd: Tensor) -> RecoveryOutput:
        b, k, _ = codes_BKd.shape
        kv = self.kv_in(codes_BKd) + _order_embedding(k, self.width, device=codes_BKd.device).to(codes_BKd.dtype)
        q = self.queries.expand(b, -1, -1)
        for layer in self.layers:
            q = layer(q, kv)
        q = self.q_head(self.norm(q))
        logits = torch.einsum("blw,bkw->blk", q, self.k_head(kv)) / math.sqrt(self.width)
        return RecoveryOutput(logits, logits.argmax(-1))

    def loss(self, logits_BLK: Tensor, assignment_BL: Tensor, *, kind: str = "ce") -> Tensor:
        """Source-recovery loss against the true assignment.

        ``ce``: cross-entropy over the K groups for every position (each column of S holds exactly one 1, so this is
        the natural likelihood). ``bce``: the paper's Eq. 9, binary cross-entropy on every entry of S, with Ŝ the
        softmax over K.
        """
        if kind == "ce":
            return F.cross_entropy(logits_BLK.flatten(0, 1).float(), assignment_BL.flatten())
        if kind == "bce":
            log_p = logits_BLK.float().log_softmax(-1)
            target = F.one_hot(assignment_BL, logits_BLK.shape[-1]).float()
            log_not_p = torch.log1p(-log_p.exp().clamp(max=1 - 1e-6))
            return -(target * log_p + (1 - target) * log_not_p).mean()
        raise ValueError(f"unknown source recovery loss {kind!r} (expected 'ce' or 'bce')")
