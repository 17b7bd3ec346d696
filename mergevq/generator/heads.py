"""Code embeddings and the (factorised) output head over ``2^d`` codes (SPEC §6.2, asymmetric token factorisation).

A code index is split into bit groups, lowest bits first (:func:`mergevq.nn.lfq.split_indices`), e.g. ``(6, 12)``:
64 and 4,096 classes instead of 262,144.

- input embedding of a code = the sum of its groups' embeddings;
- output: per position a short causal *intra* sequence ``[h_t, emb_0(i_0), …, emb_{G−2}(i_{G−2})]`` (G = number of
  groups) runs through ``factorized_depth`` blocks; slot g, after the final norm, feeds head g, which predicts group g.
  Group g thus sees the trunk state and the groups before it, so the G heads together model the joint distribution.
- a single group is a plain head: final norm then one linear layer over ``2^d``, no intra blocks.

Heads are zero-initialised, so an untrained model predicts the uniform distribution.

Einstein legend:
    B   batch, S positions; N = B·S flattened positions
    C   width
    G   bit groups; V_g = 2^bits_g classes of group g
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergevq.generator.config import GeneratorConfig
from mergevq.generator.gpt import Block, RMSNorm
from mergevq.nn.lfq import join_indices, split_indices

__all__ = ["FactorizedCodes"]


class FactorizedCodes(nn.Module):
    """Embeds codes and predicts them group by group."""

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.bits = tuple(config.bit_groups)
        self.embeddings = nn.ModuleList(nn.Embedding(2**b, config.width) for b in self.bits)
        intra_depth = config.factorized_depth if len(self.bits) > 1 else 0
        self.intra = nn.ModuleList(Block(config) for _ in range(intra_depth))
        self.norm = RMSNorm(config.width, eps=config.norm_eps)
        self.heads = nn.ModuleList(nn.Linear(config.width, 2**b, bias=False) for b in self.bits)

    @property
    def num_groups(self) -> int:
        return len(self.bits)

    def zero_heads(self) -> None:
        for head in self.heads:
            nn.init.zeros_(head.weight)

    def split(self, indices: Tensor) -> tuple[Tensor, ...]:
        return split_indices(indices, bits=self.bits)

    def join(self, parts: Sequence[Tensor]) -> Tensor:
        return join_indices(parts, bits=self.bits)

    def embed(self, indices: Tensor) -> Tensor:
        """``[...]`` codes -> ``[..., C]``: the sum of the group embeddings."""
        parts = self.split(indices)
        out = self.embeddings[0](parts[0])
        for emb, part in zip(self.embeddings[1:], parts[1:]):
            out = out + emb(part)
        return out

    def _intra(self, h_NC: Tensor, parts: Sequence[Tensor]) -> Tensor:
        """Run the intra blocks over ``[h, emb_0(p_0), …]`` (length 1 + len(parts)); returns ``[N, 1+len, C]``."""
        seq_NGC = torch.stack([h_NC] + [self.embeddings[g](p) for g, p in enumerate(parts)], dim=1)
        for block in self.intra:
            seq_NGC = block(seq_NGC, rotary=None, mask=None)  # plain causal, no positions
        return self.norm(seq_NGC)

    def logits(self, h_BSC: Tensor, targets_BS: Tensor) -> list[Tensor]:
        """Teacher-forced logits per group, ``[B, S, V_g]`` each; group g is conditioned on the true groups < g."""
        batch, length, channels = h_BSC.shape
        parts = [p.reshape(-1) for p in self.split(targets_BS)]
        states_NGC = self._intra(h_BSC.reshape(-1, channels), parts[:-1])
        return [head(states_NGC[:, g]).view(batch, length, -1) for g, head in enumerate(self.heads)]

    def loss(self, h_BSC: Tensor, targets_BS: Tensor, *, label_smoothing: float = 0.0) -> dict[str, Tensor]:
        """``ce_g{g}`` (mean over positions) per group, ``loss`` = their sum, ``accuracy`` = all groups right."""
        logits = self.logits(h_BSC, targets_BS)
        out: dict[str, Tensor] = {}
        correct = torch.ones_like(targets_BS, dtype=torch.bool)
        for g, (logits_BSV, part_BS) in enumerate(zip(logits, self.split(targets_BS))):
            out[f"ce_g{g}"] = F.cross_entropy(
                logits_BSV.flatten(0, 1).float(), part_BS.reshape(-1), label_smoothing=label_smoothing
            )
            correct &= logits_BSV.argmax(-1) == part_BS
        out["loss"] = torch.stack([out[f"ce_g{g}"] for g in range(self.num_groups)]).sum()
        out["accuracy"] = correct.float().mean().detach()
        return out

    def sample(self, h_NC: Tensor, *, choose: Callable[[int, Tensor], Tensor]) -> Tensor:
        """Draw one code per row, group by group: ``choose(g, logits_NV)`` returns group g's sub-index ``[N]``.

        ``choose`` may return fewer rows than it got (classifier-free guidance folds the cond/uncond halves into one
        draw); the draw is then tiled back over the rows so both halves condition on the same group. Returns the
        codes of the rows ``choose`` returned.
        """
        parts: list[Tensor] = []
        for g, head in enumerate(self.heads):
            logits_NV = head(self._intra(h_NC, parts)[:, g])
            part = choose(g, logits_NV)
            parts.append(part.repeat(h_NC.shape[0] // part.shape[0]))
        return self.join([p[: part.shape[0]] for p in parts])
