"""Key/value caches for incremental decoding: a static pre-allocated cache and MergeAR's compact cache.

Both follow one protocol, driven once per transformer forward by the decoding loop::

    mask = cache.begin(values_BN)          # N new tokens; their code values (−1 for prefix tokens); mask for SDPA
    ... every layer: k_all, v_all = cache.update(layer, k_BHND, v_BHND)   # store the new keys, return what to attend
    cache.end()                            # commit the bookkeeping

Keys are stored already rotated (RoPE), so a cached key never needs its position again.

**Static cache** (LlamaGen): ``capacity`` slots per layer allocated up front; step ``t`` writes slots ``[t, t+N)`` and
attends over ``[0, t+N)`` causally.

**Compact cache** (MergeAR, SPEC §4): the keys visible to a query are the prefix, every *first occurrence* of a code
value, and the last ``window`` positions. So the cache keeps

- a **kept store** of prefix tokens and first occurrences, kept forever. It grows in blocks of ``block`` slots, and a
  duplicate never enters it. Samples fill it at their own pace (different numbers of distinct values); slots past a
  sample's count are masked out. The kept values and their sequence slots (the position cache) are recorded.
- a **ring** of ``window`` slots holding the most recent duplicates: a duplicate's key takes part in the step that
  feeds it, stays visible while it is within the window, and is overwritten (evicted) when the window moves past it.

A step attends over ``kept ∪ ring ∪ new``, never over the full history.

Einstein legend:
    B   batch
    H   heads, D head dimension
    N   new tokens of this step
    T   cached key slots (static: filled prefix; compact: kept slots in use)
    W   ring (window) slots
"""

from __future__ import annotations

import torch
from torch import Tensor

from mergevq.generator.config import find_multiple

__all__ = ["CompactKVCache", "StaticKVCache"]


class StaticKVCache:
    """Pre-allocated ``[B, H, capacity, D]`` keys and values per layer, filled left to right."""

    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch_size, num_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity
        self.length = 0
        self._end = 0
        self.peak_bytes = self.allocated_bytes

    @property
    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def begin(self, values_BN: Tensor) -> Tensor | None:
        n = values_BN.shape[1]
        start, self._end = self.length, self.length + n
        if self._end > self.capacity:
            raise RuntimeError(f"static KV cache full: {self._end} tokens for {self.capacity} slots")
        if n == 1:
            return None  # one query sees every cached key and itself
        q_N1 = torch.arange(start, self._end, device=values_BN.device)[:, None]
        return (torch.arange(self._end, device=values_BN.device) <= q_N1)[None, None]  # [1, 1, N, T]

    def update(self, layer: int, k_BHND: Tensor, v_BHND: Tensor) -> tuple[Tensor, Tensor]:
        start = self._end - k_BHND.shape[2]
        self.k[layer][:, :, start : self._end] = k_BHND
        self.v[layer][:, :, start : self._end] = v_BHND
        return self.k[layer][:, :, : self._end], self.v[layer][:, :, : self._end]

    def end(self) -> None:
        self.length = self._end


class CompactKVCache:
    """MergeAR's cache: a growing store of prefix tokens and first occurrences plus a ring of recent duplicates."""

    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        window: int,
        block: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if block < 1 or window < 0:
            raise ValueError(f"block must be >= 1 and window >= 0, got block={block}, window={window}")
        self.num_layers, self.batch_size, self.num_heads, self.head_dim = num_layers, batch_size, num_heads, head_dim
        self.window, self.block, self.dtype, self.device = window, block, dtype, torch.device(device)
        self.capacity = 0
        self.k_kept: list[Tensor] = [self._empty(0)] * num_layers
        self.v_kept: list[Tensor] = [self._empty(0)] * num_layers
        self.k_ring = [self._empty(window) for _ in range(num_layers)]
        self.v_ring = [self._empty(window) for _ in range(num_layers)]
        self.num_kept = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # per sample
        self.kept_values = torch.empty(batch_size, 0, dtype=torch.long, device=self.device)  # −2: empty slot
        self.kept_slots = torch.empty(batch_size, 0, dtype=torch.long, device=self.device)  # position cache
        self.ring_slots = torch.full((batch_size, window), -1, dtype=torch.long, device=self.device)
        self.ring_valid = torch.zeros(batch_size, window, dtype=torch.bool, device=self.device)
        self.length = 0  # sequence slots fed so far
        self.peak_bytes = self.allocated_bytes
        self._step: dict[str, Tensor] = {}
        self._used = 0

    def _empty(self, slots: int) -> Tensor:
        shape = (self.batch_size, self.num_heads, slots, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    @property
    def allocated_bytes(self) -> int:
        tensors = self.k_kept + self.v_kept + self.k_ring + self.v_ring
        return sum(t.numel() * t.element_size() for t in tensors)

    def _grow(self, needed: int) -> None:
        capacity = find_multiple(needed, self.block)
        extra = capacity - self.capacity
        self.k_kept = [torch.cat([k, self._empty(extra)], dim=2) for k in self.k_kept]
        self.v_kept = [torch.cat([v, self._empty(extra)], dim=2) for v in self.v_kept]
        pad = torch.full((self.batch_size, extra), -2, dtype=torch.long, device=self.device)
        self.kept_values = torch.cat([self.kept_values, pad], dim=1)
        self.kept_slots = torch.cat([self.kept_slots, pad], dim=1)
        self.capacity = capacity

    def begin(self, values_BN: Tensor) -> Tensor:
        """Classify the new tokens (prefix/first occurrence → kept; else duplicate) and build the step's mask."""
        batch, n = values_BN.shape
        device = self.device
        values_BN = values_BN.to(device)
        prefix_BN = values_BN < 0
        # A value is new if no kept entry and no earlier token of this step holds it.
        seen_BN = (values_BN[:, :, None] == self.kept_values[:, None, :]).any(-1)
        earlier_NN = torch.ones(n, n, dtype=torch.bool, device=device).tril(-1)
        seen_BN |= ((values_BN[:, :, None] == values_BN[:, None, :]) & earlier_NN).any(-1)
        keep_BN = prefix_BN | ~seen_BN
        slots_N = torch.arange(self.length, self.length + n, device=device)

        used = int(self.num_kept.max())  # kept slots any sample uses before this step
        needed = int((self.num_kept + keep_BN.sum(1)).max())
        if needed > self.capacity:
            self._grow(needed)
            self.peak_bytes = max(self.peak_bytes, self.allocated_bytes)
        offset_BN = self.num_kept[:, None] + keep_BN.long().cumsum(1) - 1  # kept slot of each new kept token
        self._step = {"keep": keep_BN, "slots": slots_N, "offset": offset_BN, "values": values_BN}
        self._used = used

        kept_mask_BNT = (torch.arange(used, device=device) < self.num_kept[:, None])[:, None, :].expand(batch, n, used)
        ring_mask_BNW = self.ring_valid[:, None, :] & (
            slots_N[None, :, None] - self.ring_slots[:, None, :] <= self.window
        )
        distance_NN = slots_N[:, None] - slots_N[None, :]
        causal_NN = distance_NN >= 0
        new_mask_BNN = causal_NN & (keep_BN[:, None, :] | (distance_NN <= self.window))
        return torch.cat([kept_mask_BNT, ring_mask_BNW, new_mask_BNN], dim=2)[:, None]  # [B, 1, N, T+W+N]

    def update(self, layer: int, k_BHND: Tensor, v_BHND: Tensor) -> tuple[Tensor, Tensor]:
        used = self._used
        k_all = torch.cat([self.k_kept[layer][:, :, :used], self.k_ring[layer], k_BHND], dim=2)
        v_all = torch.cat([self.v_kept[layer][:, :, :used], self.v_ring[layer], v_BHND], dim=2)
        keep_BN, offset_BN = self._step["keep"], self._step["offset"]
        b_M, n_M = keep_BN.nonzero(as_tuple=True)
        dest_M = offset_BN[b_M, n_M]
        self.k_kept[layer][b_M, :, dest_M] = k_BHND[b_M, :, n_M]
        self.v_kept[layer][b_M, :, dest_M] = v_BHND[b_M, :, n_M]
        if self.window:
            # Written in order, so a later token of the step overwrites the ring slot of one that left the window.
            for i, slot in enumerate(self._step["slots"].tolist()):
                self.k_ring[layer][:, :, slot % self.window] = k_BHND[:, :, i]
                self.v_ring[layer][:, :, slot % self.window] = v_BHND[:, :, i]
        return k_all, v_all

    def end(self) -> None:
        keep_BN, offset_BN, slots_N = self._step["keep"], self._step["offset"], self._step["slots"]
        b_M, n_M = keep_BN.nonzero(as_tuple=True)
        dest_M = offset_BN[b_M, n_M]
        self.kept_values[b_M, dest_M] = self._step["values"][b_M, n_M]
        self.kept_slots[b_M, dest_M] = slots_N[n_M]
        self.num_kept += keep_BN.sum(1)
        if self.window:
            for i, slot in enumerate(slots_N.tolist()):
                self.ring_slots[:, slot % self.window] = slot
                self.ring_valid[:, slot % self.window] = ~keep_BN[:, i]  # kept tokens are visible from the store
        self.length += int(slots_N.numel())
        self._step = {}
