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
- a **ring** of ``window + 1`` slots holding the most recent duplicates: a duplicate's key takes part in the step
  that feeds it, stays visible while it is within the window, and is overwritten (evicted) when the window moves past
  it. The extra slot lets a one-token step write its key before attention without evicting a key still visible.

Both live in one buffer per layer, ring first, so a one-token step attends over a prefix view of it (no copy); a step
of several tokens attends over ``ring ∪ kept ∪ new`` concatenated. Never over the full history.

Einstein legend:
    B   batch
    H   heads, D head dimension
    N   new tokens of this step
    T   cached key slots (static: filled prefix; compact: kept slots in use)
    W   ring slots (window + 1)
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
    """MergeAR's cache: a growing store of prefix tokens and first occurrences plus a ring of recent duplicates.

    Per layer one ``[B, H, R + capacity, D]`` buffer: the ring (``R = window + 1`` slots) first, the kept store after
    it. The ring has one slot more than the window so that a one-token step can write its key before attention without
    evicting a key that is still visible; such a step then attends over a prefix view of the buffer (no copy).
    Steps of several tokens concatenate ``[ring, kept, new]`` instead.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        window: int,
        block: int = 16,
        initial: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if block < 1 or window < 0 or initial < 0:
            raise ValueError(f"need block >= 1, window >= 0, initial >= 0; got {block}, {window}, {initial}")
        self.num_layers, self.batch_size, self.num_heads, self.head_dim = num_layers, batch_size, num_heads, head_dim
        self.window, self.block, self.dtype, self.device = window, block, dtype, torch.device(device)
        self.ring = window + 1
        self.capacity = 0
        self.k = [self._empty(self.ring) for _ in range(num_layers)]
        self.v = [self._empty(self.ring) for _ in range(num_layers)]
        self.num_kept = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # per sample
        self.kept_values = torch.empty(batch_size, 0, dtype=torch.long, device=self.device)  # −2: empty slot
        self.kept_slots = torch.empty(batch_size, 0, dtype=torch.long, device=self.device)  # position cache
        self.ring_slots = torch.full((batch_size, self.ring), -1, dtype=torch.long, device=self.device)
        self.ring_valid = torch.zeros(batch_size, self.ring, dtype=torch.bool, device=self.device)
        self.length = 0  # sequence slots fed so far
        self.peak_bytes = self.allocated_bytes
        self._step: dict[str, Tensor] = {}
        self._used = 0
        self._view = 0  # one-token steps: attend over buffer slots [0, _view); 0: concatenate instead
        if initial:  # kept slots allocated up front, exactly; growth past them goes in blocks
            self._grow(initial, exact=True)
            self.peak_bytes = self.allocated_bytes

    def _empty(self, slots: int) -> Tensor:
        shape = (self.batch_size, self.num_heads, slots, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    @property
    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def _grow(self, needed: int, *, exact: bool = False) -> None:
        capacity = needed if exact else find_multiple(needed, self.block)
        extra = capacity - self.capacity
        self.k = [torch.cat([k, self._empty(extra)], dim=2) for k in self.k]
        self.v = [torch.cat([v, self._empty(extra)], dim=2) for v in self.v]
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
        if n > 1:
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
        b_M, n_M = keep_BN.nonzero(as_tuple=True)  # once per step, shared by every layer
        offset_M = offset_BN[b_M, n_M]
        # Ring: only the last `ring` tokens of a step stay there (slots are consecutive, so their indices differ).
        last_N = torch.arange(max(0, n - self.ring), n, device=device)
        ring_index = slots_N[last_N] % self.ring
        ring_slots = self.ring_slots.clone()
        ring_slots[:, ring_index] = slots_N[last_N]
        ring_valid = self.ring_valid.clone()
        ring_valid[:, ring_index] = ~keep_BN[:, last_N]  # kept tokens are visible from the store
        kept_slots = self.kept_slots.clone()
        kept_slots[b_M, offset_M] = slots_N[n_M]
        self._step = {
            "b": b_M, "n": n_M, "dest": self.ring + offset_M, "last": last_N, "ring_index": ring_index,
            "offset": offset_M, "values": values_BN[b_M, n_M], "keep": keep_BN, "ring_slots": ring_slots,
            "ring_valid": ring_valid, "kept_slots": kept_slots,
        }  # fmt: skip
        self._used = used

        if n == 1:  # written in place before attention; attend over the ring and the kept slots in use
            self._view = self.ring + needed
            ring_mask_BW = ring_valid & (self.length - ring_slots <= self.window)
            kept_mask_BT = kept_slots[:, :needed] >= 0
            return torch.cat([ring_mask_BW, kept_mask_BT], dim=1)[:, None, None, :]  # [B, 1, 1, R+T]
        self._view = 0
        ring_mask_BNW = self.ring_valid[:, None, :] & (
            slots_N[None, :, None] - self.ring_slots[:, None, :] <= self.window
        )
        kept_mask_BNT = (torch.arange(used, device=device) < self.num_kept[:, None])[:, None, :].expand(batch, n, used)
        distance_NN = slots_N[:, None] - slots_N[None, :]
        causal_NN = distance_NN >= 0
        new_mask_BNN = causal_NN & (keep_BN[:, None, :] | (distance_NN <= self.window))
        return torch.cat([ring_mask_BNW, kept_mask_BNT, new_mask_BNN], dim=2)[:, None]  # [B, 1, N, R+T+N]

    def update(self, layer: int, k_BHND: Tensor, v_BHND: Tensor) -> tuple[Tensor, Tensor]:
        k, v, step = self.k[layer], self.v[layer], self._step
        if self._view:
            index = int(self.length % self.ring)
            k[:, :, index] = k_BHND[:, :, 0]
            v[:, :, index] = v_BHND[:, :, 0]
            k_all, v_all = k[:, :, : self._view], v[:, :, : self._view]
        else:  # copy the visible keys out first: the writes below may overwrite ring slots this step still sees
            k_all = torch.cat([k[:, :, : self.ring + self._used], k_BHND], dim=2)
            v_all = torch.cat([v[:, :, : self.ring + self._used], v_BHND], dim=2)
            k[:, :, step["ring_index"]] = k_BHND[:, :, step["last"]]
            v[:, :, step["ring_index"]] = v_BHND[:, :, step["last"]]
        if step["b"].numel():
            k[step["b"], :, step["dest"]] = k_BHND[step["b"], :, step["n"]]
            v[step["b"], :, step["dest"]] = v_BHND[step["b"], :, step["n"]]
        return k_all, v_all

    def end(self) -> None:
        step = self._step
        self.kept_values[step["b"], step["offset"]] = step["values"]
        self.kept_slots = step["kept_slots"]
        self.num_kept += step["keep"].sum(1)
        self.ring_slots, self.ring_valid = step["ring_slots"], step["ring_valid"]
        self.length += int(step["keep"].shape[1])
        self._step = {}
