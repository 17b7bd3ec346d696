"""MaskGIT over the L grid tokens, with an optional ToMe-for-SD merge inside every block at inference.

Facts used (SPEC §6.3, the public MaskGIT and ToMe-for-SD designs):

- **Model.** A bidirectional transformer (the shared LLaMA blocks with no causal mask) over ``[cls] + L`` tokens.
  Masked inputs are replaced by one learned ``[MASK]`` embedding; image tokens are rotated by their grid cell (2-D
  RoPE), the class token is not. Class conditioning is the class token, dropped to the null class with probability
  ``class_dropout`` in training, which enables classifier-free guidance.
- **Training.** Targets ``indices.gather(1, assignment)`` with K = L, as vanilla AR. Per sample a mask ratio
  ``r = cos(π/2·u)``, ``u ~ U(0, 1)``; ``max(1, ceil(r·L))`` positions, chosen uniformly, are masked; the loss (the sum
  over bit groups of the mean cross-entropy, label smoothing 0.1 by default for this kind) covers the masked positions
  only. A factorised head predicts each masked position group by group with the intra stack, teacher-forced
  (:class:`~mergevq.generator.heads.FactorizedCodes`). Masks come from torch's global RNG.
- **Decoding** in T steps (MaskGIT: 8–16; ``config.maskgit_steps`` by default). Every step samples every masked
  position (per bit group, with guidance, temperature, top-k and top-p). With ``ratio = (t+1)/T`` the number left
  masked is ``floor(L·cos(π/2·ratio))`` clamped to ``[1, remaining − 1]`` (the last step: 0):
  :func:`maskgit_schedule`. Confidence = log p(sampled) (summed over bit groups, under the guided distribution before
  temperature and filtering) + τ·Gumbel with ``τ = 4.5·(1 − ratio)``; known tokens get +∞; the least confident are
  masked again. No KV cache (every step is a full bidirectional pass).
- **ToMe for SD** (``tome_ratio`` r ∈ [0, 1), inference only): inside each block a fraction r of the L non-class
  tokens is merged before attention and before the MLP and unmerged after (each merged output is copied back to every
  position it absorbed), so the block output keeps all L tokens. The matching is :func:`mergevq.nn.tome.merge_step`
  (bipartite soft matching, alternate split, size-weighted averages) on the block *input*, computed once per block and
  applied to both sub-layers' normalised inputs. ``int(r·L)`` tokens merge per block; above L/2 the matching runs in
  several rounds (one round merges at most half). Differences from tomesd: its destinations are one random token per
  2×2 window, ours the alternate (odd) tokens; there is no proportional attention (as in tomesd). A merged token is
  rotated by its *destination* token's grid cell (the token the others merged into,
  :func:`mergevq.nn.tome.carry_destination`).

Einstein legend:
    B   batch (doubled under classifier-free guidance)
    L   grid positions, S = 1 + L sequence tokens, R masked positions of a step
    N   tokens after a block's merge (class included), C width
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mergevq.generator.ar import check_full_grid, steps_of
from mergevq.generator.config import GeneratorConfig
from mergevq.generator.gpt import Block
from mergevq.generator.outputs import GenerationOutput, GeneratorOutput, generation_stats
from mergevq.generator.sampling import Sampler
from mergevq.nn.rope import rotary_2d
from mergevq.nn.tome import carry_destination, init_merge_state, merge_by_assignment, merge_step, unmerge

if TYPE_CHECKING:
    from mergevq.generator.model import Generator

__all__ = ["MaskGIT", "maskgit_schedule", "tome_block"]


def maskgit_schedule(*, num_tokens: int, steps: int) -> list[int]:
    """Positions still masked after each of ``steps`` steps, starting from ``num_tokens`` masked (the last is 0)."""
    if steps < 1 or num_tokens < 1:
        raise ValueError(f"need steps >= 1 and num_tokens >= 1, got steps={steps}, num_tokens={num_tokens}")
    left, remaining = [], num_tokens
    for t in range(steps):
        if t == steps - 1:
            remaining = 0
        else:
            wanted = math.floor(num_tokens * math.cos(math.pi / 2 * (t + 1) / steps))
            remaining = max(1, min(remaining - 1, wanted))
        left.append(remaining)
    return left


def tome_block(block: Block, x_BSC: Tensor, *, positions_BS2: Tensor, num_merge: int, rope_base: float) -> Tensor:
    """One bidirectional block with ToMe for SD: ``num_merge`` of the non-class tokens merged around each sub-layer.

    ``x_BSC`` = ``[cls, L tokens]``, ``positions_BS2`` their (row, col) (class: −1). With ``num_merge = 0`` this is
    exactly ``block(x, causal=False)``.
    """
    state = init_merge_state(x_BSC, has_cls=True)
    positions_BN2 = positions_BS2[:, 1:].expand(x_BSC.shape[0], -1, -1)
    left = num_merge
    while left > 0 and state.num_groups > 1:
        r = min(left, state.num_groups // 2)
        merged = merge_step(state, metric=state.tokens, r=r)
        positions_BN2 = carry_destination(positions_BN2, before=state, after=merged)
        state, left = merged, left - r
    groups, assignment_BL = state.num_groups, state.assignment
    none_B12 = positions_BN2.new_full((x_BSC.shape[0], 1, 2), -1)
    rotary = rotary_2d(
        torch.cat([none_B12, positions_BN2], dim=1), head_dim=x_BSC.shape[-1] // block.attn.num_heads, base=rope_base
    )

    def merge(y_BSC: Tensor) -> Tensor:
        return merge_by_assignment(y_BSC, assignment_BL, num_groups=groups, has_cls=True)

    def spread(y_BNC: Tensor) -> Tensor:
        return torch.cat([y_BNC[:, :1], unmerge(y_BNC[:, 1:], assignment_BL)], dim=1)

    x_BSC = x_BSC + spread(block.attn(merge(block.attn_norm(x_BSC)), rotary=rotary, mask=None, causal=False))
    return x_BSC + spread(block.ffn(merge(block.ffn_norm(x_BSC))))


class MaskGIT:
    """The MaskGIT scheme: ``[cls] + L`` tokens, bidirectional attention, [MASK] inputs, iterative decoding."""

    num_prefix = 1

    def __init__(self, config: GeneratorConfig) -> None:
        self.config = config

    def check_num_tokens(self, num_tokens: int | None) -> int:
        return check_full_grid(num_tokens, length=self.config.num_positions, what="MaskGIT")

    @staticmethod
    def draw_mask(batch: int, length: int, *, device: torch.device) -> Tensor:
        """``[B, L]`` bool, True = masked: ``max(1, ceil(cos(π/2·u)·L))`` uniform positions per sample (global RNG)."""
        u_B = torch.rand(batch, device=device)
        count_B = torch.ceil(torch.cos(math.pi / 2 * u_B) * length).long().clamp(1, length)
        rank_BL = torch.rand(batch, length, device=device).argsort(dim=1).argsort(dim=1)
        return rank_BL < count_B[:, None]

    def embed(self, model: Generator, labels_B: Tensor, tokens_BL: Tensor, masked_BL: Tensor) -> Tensor:
        """``[B, 1 + L, C]``: class token, then each position's code embedding or [MASK]."""
        codes_BLC = model.codes.embed(tokens_BL)
        codes_BLC = torch.where(masked_BL[..., None], model.mask_embedding.to(codes_BLC.dtype), codes_BLC)
        return torch.cat([model.class_embedding(labels_B)[:, None], codes_BLC], dim=1)

    def states(self, model: Generator, x_BSC: Tensor, *, tome_ratio: float = 0.0) -> Tensor:
        """``[B, L, C]`` bidirectional states of the grid tokens (ToMe for SD inside every block when r > 0)."""
        if not 0.0 <= tome_ratio < 1.0:
            raise ValueError(f"tome_ratio must lie in [0, 1), got {tome_ratio}")
        none_12 = torch.full((1, 2), -1, dtype=torch.long, device=model.grid_positions.device)
        positions_1S2 = torch.cat([none_12, model.grid_positions])[None]
        trunk = model.trunk
        if tome_ratio == 0.0:
            return trunk(x_BSC, positions_BS2=positions_1S2, causal=False)[:, 1:]
        num_merge = int(tome_ratio * self.config.num_positions)
        x_BSC = trunk.token_drop(x_BSC)
        for block in trunk.blocks:
            x_BSC = tome_block(
                block, x_BSC, positions_BS2=positions_1S2, num_merge=num_merge, rope_base=trunk.rope_base
            )
        return x_BSC[:, 1:]

    # ------------------------------------------------------------------ training
    def loss(
        self,
        model: Generator,
        *,
        indices: Tensor,
        assignment: Tensor,
        labels: Tensor,
        num_tokens: int,
        return_logits: bool = False,
    ) -> GeneratorOutput:
        """Cross-entropy on the masked positions; ``logits`` (when asked): teacher-forced at all L positions."""
        target_BL = indices.long().gather(1, assignment.long())
        masked_BL = self.draw_mask(*target_BL.shape, device=target_BL.device)
        h_BLC = self.states(model, self.embed(model, labels, target_BL, masked_BL))
        losses = model.codes.loss(
            h_BLC[masked_BL][None], target_BL[masked_BL][None], label_smoothing=self.config.label_smoothing
        )
        loss = losses.pop("loss")
        logits = model.codes.logits(h_BLC, target_BL) if return_logits else None
        return GeneratorOutput(loss, losses, logits)

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        model: Generator,
        *,
        labels: Tensor,
        num_tokens: int | None,
        sampler: Sampler,
        steps: int | None = None,
        tome_ratio: float = 0.0,
        use_cache: bool = True,
        progress: bool = False,
    ) -> GenerationOutput:
        """Iterative parallel decoding in ``steps`` passes; ``[B, L]`` grid with the identity assignment.

        ``use_cache`` is accepted for a uniform call and ignored: MaskGIT has no KV cache.
        """
        from mergevq.generator.mergear import groups_from_values

        length = self.check_num_tokens(num_tokens)
        schedule = maskgit_schedule(num_tokens=length, steps=self.config.maskgit_steps if steps is None else steps)
        if not 0.0 <= tome_ratio < 1.0:
            raise ValueError(f"tome_ratio must lie in [0, 1), got {tome_ratio}")
        batch, device = labels.shape[0], labels.device
        guide = sampler.guide
        copies = 2 if guide else 1
        labels_in = torch.cat([labels, torch.full_like(labels, self.config.null_class)]) if guide else labels
        start = time.perf_counter()
        tokens_BL = torch.zeros(batch, length, dtype=torch.long, device=device)
        masked_BL = torch.ones(batch, length, dtype=torch.bool, device=device)
        remaining = length
        for t in steps_of(progress, range(len(schedule)), unit="step"):
            x_BSC = self.embed(model, labels_in, tokens_BL.repeat(copies, 1), masked_BL.repeat(copies, 1))
            h_BLC = self.states(model, x_BSC, tome_ratio=tome_ratio)
            # Every sample has the same number of masked positions; their indices in increasing order.
            where_BR = masked_BL.nonzero()[:, 1].view(batch, remaining)
            h_BRC = h_BLC.gather(1, where_BR.repeat(copies, 1)[..., None].expand(-1, -1, h_BLC.shape[-1]))
            log_probs: list[Tensor] = []
            choose = sampler.choose(sampler.weight((length - remaining) / length), log_probs=log_probs)
            codes_BR = model.codes.sample(h_BRC.reshape(-1, h_BRC.shape[-1]), choose=choose).view(batch, remaining)
            ratio = (t + 1) / len(schedule)
            u_BR = torch.rand(batch, remaining, device=device, generator=sampler.generator).clamp_(1e-20, 1.0)
            gumbel_BR = -torch.log(-torch.log(u_BR))
            confidence_BR = torch.stack(log_probs).sum(0).view(batch, remaining) + 4.5 * (1 - ratio) * gumbel_BR
            tokens_BL = tokens_BL.scatter(1, where_BR, codes_BR)
            confidence_BL = torch.full((batch, length), math.inf, device=device).scatter(1, where_BR, confidence_BR)
            remaining = schedule[t]
            masked_BL = torch.zeros_like(masked_BL)
            if remaining:
                masked_BL.scatter_(1, confidence_BL.topk(remaining, dim=1, largest=False).indices, True)
        stats = generation_stats(
            seconds=time.perf_counter() - start,
            batch=batch,
            tokens=length,
            forward_passes=len(schedule),
            peak_cache_bytes=0,
            distinct_groups=groups_from_values(tokens_BL).counts,
        )
        identity_BL = torch.arange(length, device=device).expand(batch, length).clone()
        return GenerationOutput(tokens_BL, identity_BL, stats)
