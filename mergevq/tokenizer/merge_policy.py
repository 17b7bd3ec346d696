"""Which tokens merge in each encoder block: ToMe's bipartite matching under several splits, or a fixed grid.

Every policy runs through :func:`mergevq.nn.tome.merge_step`, so the assignment, sizes, first positions and the
raster order of the merged tokens (by first source position, which stage 2 relies on) are produced by the same code;
only the choice of sets A (sources) and B (destinations) differs. Config keys (:class:`TokenizerConfig`):

``merge_policy``
    ``"tome"`` (default): bipartite soft matching (SPEC §2.3). ``"grid"``: the same blocks and per-layer schedule,
    but every token may only join the group of its own ``b×b`` block of the grid, so the final assignment is the
    square blocks (e.g. 2×2 cells → 16 groups on an 8×8 grid). ``K`` must tile the grid: ``K = (h/b)·(w/b)``.
    This is the fixed-grid baseline of the fair comparison (equal architecture, equal token counts per layer).
    Within a block the merges are still ordered by ToMe's similarity scores; the end result does not depend on it.

``merge_split`` (``"tome"`` only)
    ``"alternate"`` (default): our tokens stay in raster order of their first position and alternate A/B at every
    layer (even index → A, odd → B), the fast path of :func:`~mergevq.nn.tome.merge_step`.
    ``"resplit"``: the authors' alternation (SPEC §2.3). Their merge leaves the sequence ``[CLS, unmerged A (in A
    order), all B (in B order)]`` and the next layer alternates A/B over *that* sequence, CLS included at index 0
    (in A, never merged). We keep our output order and track each group's rank ``p`` in the authors' sequence
    instead: B holds the groups of even ``p`` (odd index ``p + 1``), A those of odd ``p``.
    ``"window"``: ToMe for Stable Diffusion's 2-D split: one destination per ``merge_window × merge_window`` window of
    the grid, the other tokens of the window are sources (matched globally, against every destination). Each group
    sits at the grid position of its destination token; a window's destination is a random group of it in training
    and its top-left (raster-first) group in evaluation. When a layer needs more sources than the windows leave
    (groups coalesce over the layers), the window side doubles until it does.

Shapes: B batch, N current non-CLS groups, L grid positions (h·w), K groups after the last block.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mergevq.nn.tome import MergeState, carry_destination, merge_step

__all__ = ["MERGE_POLICIES", "MERGE_SPLITS", "MergePlan", "grid_block_side"]

MERGE_POLICIES = ("tome", "grid")
MERGE_SPLITS = ("alternate", "resplit", "window")


def grid_block_side(*, grid: tuple[int, int], num_tokens: int) -> int:
    """Side ``b`` of the square blocks that cut an ``h×w`` grid into ``num_tokens`` groups (``merge_policy='grid'``).

    Raises:
        ValueError: when no integer ``b`` dividing both ``h`` and ``w`` gives ``(h/b)·(w/b) = num_tokens``.
    """
    h, w = grid
    length = h * w
    side = math.isqrt(length // num_tokens) if num_tokens >= 1 and length % num_tokens == 0 else 0
    if side < 1 or side * side * num_tokens != length or h % side or w % side:
        raise ValueError(
            f"merge_policy='grid' needs num_tokens K = (h/b)·(w/b) for a block side b dividing the {h}×{w} grid; "
            f"K={num_tokens} does not tile it"
        )
    return side


class MergePlan:
    """The A/B split (and, for the grid, the region constraint) of every merge step of one encoder pass.

    Args:
        policy: ``"tome"`` or ``"grid"`` (see the module docstring).
        split: ``"alternate"``, ``"resplit"`` or ``"window"`` (``"tome"`` only).
        window: window side of the ``"window"`` split.
        grid: ``(h, w)`` of the token grid.
        num_tokens: K after the last merge (checked against the grid for ``"grid"``).
        training: the ``"window"`` split draws its destinations at random (global torch generator) in training.
    """

    def __init__(
        self, *, policy: str, split: str, window: int, grid: tuple[int, int], num_tokens: int, training: bool
    ) -> None:
        if policy not in MERGE_POLICIES:
            raise ValueError(f"merge_policy {policy!r} is not one of {MERGE_POLICIES}")
        if split not in MERGE_SPLITS:
            raise ValueError(f"merge_split {split!r} is not one of {MERGE_SPLITS}")
        if window < 2:
            raise ValueError(f"merge_window must be >= 2, got {window}")
        self.policy = policy
        self.split_kind = split
        self.window = window
        self.grid = grid
        self.training = training
        self.block = grid_block_side(grid=grid, num_tokens=num_tokens) if policy == "grid" else 0
        self._rank: Tensor | None = None  # "resplit": position of each group in the authors' order
        self._anchor: Tensor | None = None  # "window": grid position of each group's destination token

    @property
    def is_default(self) -> bool:
        """True for ToMe with the alternate split: :func:`merge_step`'s own fast path."""
        return self.policy == "tome" and self.split_kind == "alternate"

    def split(self, state: MergeState, *, r: int) -> tuple[Tensor | None, Tensor | None]:
        """``(destinations, regions)`` for the next merge of ``r`` tokens (see :func:`merge_step`); None: default."""
        if self.policy == "grid":
            return self._grid_split(state)
        if self.split_kind == "resplit":
            return self._resplit(state), None
        if self.split_kind == "window":
            return self._window_split(state, r=r), None
        return None, None

    def merge(self, state: MergeState, *, metric: Tensor, r: int) -> MergeState:
        """One merge step of ``r`` tokens under this plan (``metric`` as for :func:`merge_step`)."""
        if r == 0:
            return state
        destinations, regions = self.split(state, r=r)
        after = merge_step(state, metric=metric, r=r, destinations=destinations, regions=regions)
        if self.policy == "tome" and self.split_kind == "resplit":
            self._advance_rank(state, after, destinations)
        elif self.policy == "tome" and self.split_kind == "window":
            self._anchor = carry_destination(self._anchor, before=state, after=after, destinations=destinations)
        return after

    # ---------------------------------------------------------------------------------------------- grid
    def _grid_split(self, state: MergeState) -> tuple[Tensor, Tensor]:
        """B = the groups holding a block's top-left cell; region = block of the group's first position.

        Only a block's top-left group ever receives merges, so every other group is a single position of the same
        block, and after ``L − K`` merges each block is one group.
        """
        _, w = self.grid
        b = self.block
        row, col = state.first_position // w, state.first_position % w
        regions = (row // b) * (w // b) + col // b
        destinations = (row % b == 0) & (col % b == 0)
        return destinations, regions

    # ---------------------------------------------------------------------------------------------- resplit
    def _resplit(self, state: MergeState) -> Tensor:
        if self._rank is None:  # first merge: the authors' order is the raster order
            n = state.num_groups
            self._rank = torch.arange(n, device=state.tokens.device).expand(state.tokens.shape[0], n)
        # Alternation over the authors' full sequence, CLS at index 0: a non-CLS rank p is at index p + has_cls.
        return (self._rank + int(state.has_cls)) % 2 == 1

    def _advance_rank(self, before: MergeState, after: MergeState, destinations: Tensor) -> None:
        """Authors' order after a merge: unmerged A tokens in their previous order, then all B in theirs."""
        rank = self._rank
        assert rank is not None
        key = rank + destinations.long() * before.num_groups  # A ranks < N <= B ranks
        key_after = carry_destination(key, before=before, after=after, destinations=destinations)
        self._rank = key_after.argsort(dim=1, stable=True).argsort(dim=1)

    # ---------------------------------------------------------------------------------------------- window
    def _window_split(self, state: MergeState, *, r: int) -> Tensor:
        batch, n = state.tokens.shape[0], state.num_groups
        device = state.tokens.device
        if self._anchor is None:  # first merge: every group is one position, raster order
            self._anchor = state.first_position.clone()
        anchor = self._anchor
        h, w = self.grid
        if self.training:  # random destination per window: a random permutation rank as priority
            priority = torch.rand(batch, n, device=device).argsort(dim=1).argsort(dim=1)
        else:  # top-left: the raster-first destination position of the window wins
            priority = (h * w - anchor).long()
        side = self.window
        while True:
            cols = -(-w // side)
            window_id = (anchor // w // side) * cols + (anchor % w) // side  # [B, N]
            best = torch.full((batch, cols * -(-h // side)), -1, dtype=torch.int64, device=device)
            best.scatter_reduce_(1, window_id, priority, reduce="amax")
            destinations = priority == best.gather(1, window_id)  # exactly one per non-empty window
            sources = n - destinations.sum(dim=1)
            if int(sources.min()) >= r or side >= max(h, w):
                return destinations
            side *= 2  # too few sources left in this layer: coarser windows
