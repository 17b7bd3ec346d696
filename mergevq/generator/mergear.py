"""MergeAR: raster AR over the K-sparse grid with a merge instruction, a sparsity-inducing mask and a compact cache.

SPEC §4 (paper §4.1, Fig. 6, A.2; absent from the official code). Reading used here:

- **Target.** The L raster positions, each carrying its merged group's code: ``target = indices.gather(1, assignment)``
  (``Z̃_L = Sᵀ Z̃_K``). Every position is supervised.
- **Sequence.** ``[cls, M_K, x_0 … x_{L−2}]``: ``M_K`` is one learned embedding per merge level K (the "merge
  instruction"); the state at ``M_K`` predicts ``x_0`` and the state at ``x_j`` predicts ``x_{j+1}``. Prefix tokens
  are not rotated; ``x_j`` is rotated by its true grid cell.
- **Mask.** The printed Eq. 12, ``M(i,j) = 1 when S(i,j) = 1 and 1 ∉ ⋃_{k<i} S(k,j)``, indexes the K×L source matrix
  with L×L indices and cannot be read literally. Its stated intent is that each merged token appears at most once in
  the context. Here: a query at ``x_i`` may attend to an earlier ``x_j`` only if ``x_j`` is the *first raster
  occurrence of its code value* among ``x_0 … x_j``, or if ``i − j ≤ window`` (recent positions stay visible). Every
  query sees itself and the prefix. The rule is defined **by value**, not by group: at inference only values are known,
  so this makes training and decoding see exactly the same context. Two groups that happen to share a code collapse
  into one (the later group's first position counts as a duplicate).
- **Decoding.** Tokens are generated in raster order; :class:`~mergevq.generator.kv_cache.CompactKVCache` keeps the
  prefix and first occurrences forever and duplicates only while they are inside the window, so the cache holds about
  ``2 + K + window`` entries instead of L. Positions stay true grid cells (RoPE is applied before caching).
- :func:`groups_from_values` turns a generated grid back into (K codes, assignment) for ``MergeVQ.decode``.

Einstein legend:
    B   batch
    N   image tokens in a sequence, P prefix tokens, S = P + N
    L   raster positions, K merged groups
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from mergevq.generator.ar import RasterAR
from mergevq.generator.config import GeneratorConfig, find_multiple
from mergevq.generator.gpt import KVCache
from mergevq.generator.kv_cache import CompactKVCache

if TYPE_CHECKING:
    from mergevq.generator.model import Generator

__all__ = ["Groups", "MergeAR", "first_occurrence", "groups_from_values", "mergear_mask"]


class Groups(NamedTuple):
    indices: Tensor  # [B, K_max] code of each group, groups in raster order of first occurrence; padded with 0
    assignment: Tensor  # [B, L] group of every position
    counts: Tensor  # [B] number of groups (distinct values) per sample


def _sorted_runs(values_BN: Tensor) -> tuple[Tensor, Tensor]:
    """Stable sort by value: ``order`` [B, N] and ``run_start`` [B, N] (True at the first element of each value)."""
    sorted_BN, order_BN = values_BN.sort(dim=1, stable=True)
    run_start_BN = torch.ones_like(sorted_BN, dtype=torch.bool)
    run_start_BN[:, 1:] = sorted_BN[:, 1:] != sorted_BN[:, :-1]
    return order_BN, run_start_BN


def first_occurrence(values_BN: Tensor) -> Tensor:
    """``[B, N]`` bool: ``values[b, j]`` does not occur in ``values[b, :j]``."""
    order_BN, run_start_BN = _sorted_runs(values_BN)
    # The stable sort puts the earliest position of each value first in its run.
    return torch.zeros_like(run_start_BN).scatter(1, order_BN, run_start_BN)


def mergear_mask(values_BN: Tensor, *, num_prefix: int, window: int) -> Tensor:
    """``[B, 1, S, S]`` bool attention mask (True = may attend) for ``prefix + N`` image tokens with these values.

    Key j is visible to query i iff ``j ≤ i`` and (j is a prefix token, or a first occurrence, or ``i − j ≤ window``).
    """
    batch, n = values_BN.shape
    s = num_prefix + n
    device = values_BN.device
    always_BS = torch.ones(batch, s, dtype=torch.bool, device=device)
    always_BS[:, num_prefix:] = first_occurrence(values_BN)
    slots_S = torch.arange(s, device=device)
    distance_SS = slots_S[:, None] - slots_S[None, :]
    mask_BSS = (distance_SS >= 0) & (always_BS[:, None, :] | (distance_SS <= window))
    return mask_BSS[:, None]


def groups_from_values(indices_BL: Tensor) -> Groups:
    """The merge map of a grid from its duplicate structure: positions with the same code form one group.

    Groups are numbered by the raster order of their first position (the tokenizer's order), so
    ``MergeVQ.decode(groups.indices, groups.assignment)`` equals decoding the grid with the identity assignment.
    Rows with fewer groups are padded with code 0 (never referenced by their assignment).
    """
    batch, length = indices_BL.shape
    order_BL, run_start_BL = _sorted_runs(indices_BL)
    first_BL = torch.zeros_like(run_start_BL).scatter(1, order_BL, run_start_BL)
    rank_BL = first_BL.long().cumsum(1) - 1  # group number, valid at first occurrences
    # Position of the first element of each sorted element's run, then that position's group number.
    start_idx_BL = (torch.arange(length, device=indices_BL.device) * run_start_BL).cummax(1).values
    group_sorted_BL = rank_BL.gather(1, order_BL.gather(1, start_idx_BL))
    assignment_BL = torch.empty_like(group_sorted_BL).scatter(1, order_BL, group_sorted_BL)
    counts_B = first_BL.sum(1)
    codes_BK = torch.zeros(batch, int(counts_B.max()) if batch else 0, dtype=indices_BL.dtype, device=indices_BL.device)
    b_M, l_M = first_BL.nonzero(as_tuple=True)
    codes_BK[b_M, rank_BL[b_M, l_M]] = indices_BL[b_M, l_M]
    return Groups(codes_BK, assignment_BL, counts_B)


class MergeAR(RasterAR):
    """The MergeAR scheme: ``[cls, M_K]`` prefix, value-based sparse mask, compact cache."""

    num_prefix = 2

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__(config)
        self.levels = tuple(config.merge_levels)

    def check_num_tokens(self, num_tokens: int | None) -> int:
        if num_tokens not in self.levels:
            raise ValueError(f"num_tokens={num_tokens} has no merge instruction; this MergeAR knows K in {self.levels}")
        return int(num_tokens)  # type: ignore[arg-type]

    def level_index(self, num_tokens: int) -> int:
        return self.levels.index(self.check_num_tokens(num_tokens))

    def prefix(self, model: Generator, labels_B: Tensor, num_tokens: int) -> Tensor:
        cls_B1C = model.class_embedding(labels_B)[:, None]
        merge_C = model.merge_embedding.weight[self.level_index(num_tokens)]
        return torch.cat([cls_B1C, merge_C.expand_as(cls_B1C)], dim=1)

    def attention_mask(self, values_BN: Tensor) -> Tensor | None:
        return mergear_mask(values_BN, num_prefix=self.num_prefix, window=self.config.window)

    def new_cache(
        self,
        model: Generator,
        *,
        batch_size: int,
        dtype: torch.dtype,
        device: torch.device,
        num_tokens: int | None = None,
    ) -> KVCache:
        config = self.config
        return CompactKVCache(
            num_layers=config.depth,
            batch_size=batch_size,
            num_heads=config.num_heads,
            head_dim=config.head_dim,
            window=config.window,
            # Growth overhead at most ~L/16 slots; small enough for 8×8 grids, few reallocations for 32×32.
            block=find_multiple(max(1, config.num_positions // 16), 8),
            # A sample that follows its merge instruction keeps the prefix and K first occurrences: allocate exactly
            # that up front; only samples with more distinct codes grow the store.
            initial=self.num_prefix + num_tokens if num_tokens else 0,
            dtype=dtype,
            device=device,
        )
