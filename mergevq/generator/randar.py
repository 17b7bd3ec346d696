"""RandAR over the K merged tokens: random-order AR with position instructions and parallel decoding.

Facts used (SPEC §5: MergeVQ paper §4.2, Eq. 13, A.1, A.2, Table A2, absent from the official code; SPEC §6.3: the
public RandAR design):

- **Objective** (Eq. 13): ``p(x) = Π_n p(x_π(n) | P_π(1), x_π(1), …, x_π(n−1), P_π(n))`` for a random permutation π.
  With MergeVQ the N = K targets are the *merged* tokens; after generation the tokenizer's Source Recovery model
  predicts the merge map (``MergeVQ.decode(indices)``), so :class:`GenerationOutput` carries ``assignment=None``.
- **Sequence.** ``[cls, M_K, P_π1, x_π1, P_π2, x_π2, …, P_πK]`` (RandAR's ``[cls, P_π1, x_π1, …]`` plus MergeAR's
  merge instruction ``M_K``, one learned embedding per trained K, so one model samples at every trained K). The last
  ``x_πK`` is not fed: no state after it is used. ``P`` is ONE shared learned vector (init 0.02·randn); the input of
  ``P_πn`` is that vector rotated (per head, 2-D RoPE) by its target position, and inside attention the q/k of both
  ``P_πn`` and ``x_πn`` are rotated by the same position, so P's are rotated twice, as in RandAR's code. The class
  token and ``M_K`` are not rotated. Plain causal attention, no extra mask.
- **Loss** only at the position-instruction slots 2, 4, …, 2K (the state at ``P_πn`` predicts ``x_πn``), targets in
  π order: the sum over bit groups of the mean cross-entropy, label smoothing from the config (0.1 by default for
  this kind, Table A2).
- **Order.** A fresh uniform random permutation per sample at every training step, drawn from torch's global RNG, so
  the trainer's per-step reseeding makes it reproducible; at inference one per sample from the caller's
  ``torch.Generator``.
- **Positions of merged tokens.** The paper does not say what "position" means for a merged token. Here it is its
  rank r = 0 … K−1 (raster order of its first position, the tokenizer's order), laid out by ``config.rank_layout``:
  ``"2d"`` (default) puts rank r at cell ``(r // c, r % c)`` of a ``c × c`` grid, ``c = ceil(√K)`` (the √K×√K reshape
  of the authors' code); ``"1d"`` rotates both halves of every head by the rank, i.e. position ``(r, r)`` — every
  channel pair carries the order, as plain 1-D RoPE would, rather than leaving the column half unrotated. Which one
  generates better is to be measured (the CIFAR runs); both are available.
- **Parallel decoding.** After step s of T, ``int((1 − cos(π/2·(s+1)/T))·N + 1)`` tokens are decoded (clamped to N,
  at least one new token per step): :func:`randar_schedule`. N = 256, T = 88 gives 88 forward passes with at most 5
  tokens per pass; N = 144, T = 64 gives 64 passes with at most 4 (Table 3's step counts). A step feeds
  ``[x of the previous step's tokens…, P_next_1, …, P_next_m]`` through a static KV cache (the first step: the
  prefix and the first queries, so T steps are T forward passes); later queries see earlier ones causally, and the m
  tokens of a step are drawn independently.
- **CFG.** Doubled batch with null-class rows, the same order for both halves; RandAR's linear schedule
  ``w = w0 + (w1 − w0)·k/N`` with k tokens already decoded (``cfg_start`` = w0, default 1; ``cfg_scale`` = w1;
  RandAR's default is (1, 4)).

Einstein legend:
    B   batch (doubled under classifier-free guidance)
    K   merged tokens (N of RandAR), P prefix tokens (2), S sequence tokens
    M   tokens of one decoding step, C width, H heads, D head dimension
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mergevq.generator.ar import steps_of
from mergevq.generator.config import GeneratorConfig, find_multiple
from mergevq.generator.kv_cache import StaticKVCache
from mergevq.generator.outputs import GenerationOutput, GeneratorOutput, generation_stats
from mergevq.generator.sampling import Sampler
from mergevq.nn.rope import apply_rotary, rotary_2d

if TYPE_CHECKING:
    from mergevq.generator.model import Generator

__all__ = ["RandAR", "RandARDecoder", "randar_schedule", "rank_positions"]


def randar_schedule(*, num_tokens: int, steps: int) -> list[int]:
    """Tokens decoded at each of ``steps`` steps for ``num_tokens`` tokens (sums to ``num_tokens``).

    After step s, ``int((1 − cos(π/2·(s+1)/T))·N + 1)`` tokens are known, at least one more than before and at most
    N. A further cap keeps one token for every later step; it never binds for ``T ≤ N`` but makes the step count
    exact by construction.
    """
    if not 1 <= steps <= num_tokens:
        raise ValueError(f"steps must lie in [1, num_tokens={num_tokens}], got {steps}")
    counts: list[int] = []
    done = 0
    for s in range(steps):
        known = int((1 - math.cos(math.pi / 2 * (s + 1) / steps)) * num_tokens + 1)
        known = min(num_tokens - (steps - 1 - s), max(done + 1, known))
        counts.append(known - done)
        done = known
    return counts


def rank_positions(num_tokens: int, *, layout: str, device: torch.device | str | None = None) -> Tensor:
    """``[K, 2]`` RoPE (row, col) of ranks 0 … K−1: ``"2d"`` on a ``ceil(√K)``-wide grid, ``"1d"`` as ``(r, r)``."""
    ranks = torch.arange(num_tokens, device=device)
    if layout == "1d":
        return torch.stack([ranks, ranks], dim=-1)
    if layout != "2d":
        raise ValueError(f"rank layout must be '1d' or '2d', got {layout!r}")
    width = math.isqrt(num_tokens)
    width += width * width < num_tokens
    return torch.stack([ranks // width, ranks % width], dim=-1)


class RandAR:
    """The RandAR scheme over K merged tokens: ``[cls, M_K]`` prefix, interleaved position queries, causal."""

    num_prefix = 2

    def __init__(self, config: GeneratorConfig) -> None:
        self.config = config
        self.levels = tuple(config.merge_levels)

    def check_num_tokens(self, num_tokens: int | None) -> int:
        if num_tokens not in self.levels:
            raise ValueError(f"num_tokens={num_tokens} has no merge instruction; this RandAR knows K in {self.levels}")
        return int(num_tokens)  # type: ignore[arg-type]

    def prefix(self, model: Generator, labels_B: Tensor, num_tokens: int) -> Tensor:
        """``[B, 2, C]``: the class embedding and the merge instruction ``M_K``."""
        cls_B1C = model.class_embedding(labels_B)[:, None]
        merge_C = model.merge_embedding.weight[self.levels.index(self.check_num_tokens(num_tokens))]
        return torch.cat([cls_B1C, merge_C.expand_as(cls_B1C)], dim=1)

    def positions(self, num_tokens: int, *, device: torch.device) -> Tensor:
        """``[K, 2]`` RoPE position of every rank."""
        return rank_positions(num_tokens, layout=self.config.rank_layout, device=device)

    def position_queries(self, model: Generator, positions_BN2: Tensor) -> Tensor:
        """``[B, N, C]``: the shared position instruction rotated (per head) by each target position."""
        batch, n, _ = positions_BN2.shape
        config = self.config
        heads, head_dim = config.num_heads, config.head_dim
        rotary = rotary_2d(positions_BN2, head_dim=head_dim, base=config.rope_base)
        query_BHND = model.position_query.view(1, heads, 1, head_dim).expand(batch, heads, n, head_dim)
        return apply_rotary(query_BHND, rotary).transpose(1, 2).reshape(batch, n, config.width)

    @staticmethod
    def draw_order(
        batch: int, num_tokens: int, *, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        """``[B, K]`` a uniform random permutation of the ranks per sample (torch's global RNG without a generator)."""
        return torch.rand(batch, num_tokens, device=device, generator=generator).argsort(dim=1)

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
        """Cross-entropy at the position-instruction slots; ``logits`` (when asked) are returned in rank order."""
        batch, k = indices.shape
        device = indices.device
        order_BK = self.draw_order(batch, k, device=device)
        target_BK = indices.long().gather(1, order_BK)  # π order
        pos_BK2 = self.positions(k, device=device)[order_BK]
        # Interleave [P_π1, x_π1, P_π2, x_π2, …, P_πK]: the last token is never an input.
        pairs_BKC = torch.stack([self.position_queries(model, pos_BK2), model.codes.embed(target_BK)], dim=2)
        image_BSC = pairs_BKC.flatten(1, 2)[:, :-1]
        image_pos_BS2 = torch.stack([pos_BK2, pos_BK2], dim=2).flatten(1, 2)[:, :-1]
        x_BSC = torch.cat([self.prefix(model, labels, k), image_BSC], dim=1)
        none_BP2 = torch.full((batch, self.num_prefix, 2), -1, dtype=torch.long, device=device)
        h_BSC = model.trunk(x_BSC, positions_BS2=torch.cat([none_BP2, image_pos_BS2], dim=1))
        h_BKC = h_BSC[:, self.num_prefix :: 2]  # the states at P_π1 … P_πK
        losses = model.codes.loss(h_BKC, target_BK, label_smoothing=self.config.label_smoothing)
        loss = losses.pop("loss")
        logits = None
        if return_logits:
            logits = [
                torch.empty_like(lg).scatter_(1, order_BK[:, :, None].expand_as(lg), lg)
                for lg in model.codes.logits(h_BKC, target_BK)
            ]
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
        """Parallel decoding in ``steps`` passes (default K: one token per pass); ``[B, K]`` codes in rank order."""
        k = self.check_num_tokens(num_tokens)
        if tome_ratio:
            raise ValueError("tome_ratio applies to MaskGIT only, not to a 'randar' generator")
        counts = randar_schedule(num_tokens=k, steps=k if steps is None else steps)
        batch, device = labels.shape[0], labels.device
        guide = sampler.guide
        start = time.perf_counter()
        order_BK = self.draw_order(batch, k, device=device, generator=sampler.generator)
        labels_in = torch.cat([labels, torch.full_like(labels, self.config.null_class)]) if guide else labels
        dec = RandARDecoder(
            model,
            labels=labels_in,
            num_tokens=k,
            order=torch.cat([order_BK, order_BK]) if guide else order_BK,
            use_cache=use_cache,
        )
        drawn_BK = torch.empty(batch, k, dtype=torch.long, device=device)  # π order
        fed_BM: Tensor | None = None
        done = 0
        for s in steps_of(progress, range(len(counts)), unit="step"):
            m = counts[s]
            h_BMC = dec.step(fed_BM, count=m)
            choose = sampler.choose(sampler.weight(done / k))
            codes_BM = model.codes.sample(h_BMC.reshape(-1, h_BMC.shape[-1]), choose=choose).view(batch, m)
            drawn_BK[:, done : done + m] = codes_BM
            fed_BM = torch.cat([codes_BM, codes_BM]) if guide else codes_BM
            done += m
        indices_BK = torch.empty_like(drawn_BK).scatter_(1, order_BK, drawn_BK)
        stats = generation_stats(
            seconds=time.perf_counter() - start,
            batch=batch,
            tokens=k,
            forward_passes=dec.forward_passes,
            peak_cache_bytes=dec.peak_cache_bytes,
            distinct_groups=torch.full((batch,), k, dtype=torch.long, device=device),
        )
        return GenerationOutput(indices_BK, None, stats)


class RandARDecoder:
    """Feeds RandAR steps: each :meth:`step` appends the previous step's tokens and the next position queries.

    ``order [B, K]``: the ranks in decoding order (under CFG pass the doubled batch, both halves with the same order).
    With ``use_cache=False`` every step recomputes the whole sequence fed so far with a plain causal mask, the reference
    that the cached path must reproduce.
    """

    def __init__(
        self, model: Generator, *, labels: Tensor, num_tokens: int, order: Tensor, use_cache: bool = True
    ) -> None:
        scheme = model.scheme
        if not isinstance(scheme, RandAR):
            raise ValueError(f"RandARDecoder needs a 'randar' generator, got {model.config.kind!r}")
        self.model, self.num_tokens = model, scheme.check_num_tokens(num_tokens)
        self.prefix_BPC = scheme.prefix(model, labels, self.num_tokens)
        batch, device, dtype = labels.shape[0], self.prefix_BPC.device, self.prefix_BPC.dtype
        if order.shape != (batch, self.num_tokens):
            raise ValueError(f"order must be [B={batch}, K={self.num_tokens}], got {tuple(order.shape)}")
        self.positions_BK2 = scheme.positions(self.num_tokens, device=device)[order.to(device)]  # decoding order
        self.queries_BKC = scheme.position_queries(model, self.positions_BK2)
        config = model.config
        self.cache = (
            StaticKVCache(
                num_layers=config.depth,
                batch_size=batch,
                num_heads=config.num_heads,
                head_dim=config.head_dim,
                capacity=find_multiple(scheme.num_prefix + 2 * self.num_tokens - 1, 8),
                dtype=dtype,
                device=device,
            )
            if use_cache
            else None
        )
        self.queried = 0  # position queries fed so far
        self.pending = 0  # queries of the last step, whose tokens the next step feeds
        self.forward_passes = 0
        self._x: list[Tensor] = []  # the fed sequence, kept for the no-cache reference
        self._pos: list[Tensor] = []

    @property
    def peak_cache_bytes(self) -> int:
        return getattr(self.cache, "peak_bytes", 0)

    def step(self, tokens: Tensor | None, *, count: int) -> Tensor:
        """Feed the codes drawn for the last step's queries (``[B, m]``; None at the first step) and the next ``count``
        position queries; returns their states ``[B, count, C]`` (each predicts the token at its position)."""
        batch = self.prefix_BPC.shape[0]
        if self.queried == 0:
            if tokens is not None:
                raise ValueError("the first step has no tokens to feed")
            x_parts = [self.prefix_BPC]
            pos_parts = [self.positions_BK2.new_full((batch, self.prefix_BPC.shape[1], 2), -1)]
        else:
            if tokens is None or tokens.shape != (batch, self.pending):
                got = None if tokens is None else tuple(tokens.shape)
                raise ValueError(
                    f"expected the {self.pending} codes of the last step, [B={batch}, {self.pending}]; got {got}"
                )
            x_parts = [self.model.codes.embed(tokens.to(self.prefix_BPC.device).long())]
            pos_parts = [self.positions_BK2[:, self.queried - self.pending : self.queried]]
        if not 1 <= count <= self.num_tokens - self.queried:
            raise ValueError(
                f"count={count}: {self.num_tokens - self.queried} of K={self.num_tokens} positions are left"
            )
        x_parts.append(self.queries_BKC[:, self.queried : self.queried + count])
        pos_parts.append(self.positions_BK2[:, self.queried : self.queried + count])
        x_BSC, pos_BS2 = torch.cat(x_parts, dim=1), torch.cat(pos_parts, dim=1)
        self.queried += count
        self.pending = count
        self.forward_passes += 1
        trunk = self.model.trunk
        if self.cache is None:
            self._x.append(x_BSC)
            self._pos.append(pos_BS2)
            h_BSC = trunk(torch.cat(self._x, dim=1), positions_BS2=torch.cat(self._pos, dim=1))
            return h_BSC[:, -count:]
        mask = self.cache.begin(pos_BS2[..., 0])
        h_BSC = trunk(x_BSC, positions_BS2=pos_BS2, mask=mask, cache=self.cache)
        self.cache.end()
        return h_BSC[:, -count:]
