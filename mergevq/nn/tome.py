"""Token merging (bipartite soft matching) with assignment tracking, and per-layer merge schedules.

A ViT block merges ``r`` pairs of similar tokens after its attention; after the last block ``K`` of the original
``L`` tokens remain. We record which original positions each remaining token absorbed so that the full grid can be
recovered (``Z_L = Sᵀ Z_K``).

Representation: the source matrix ``S ∈ {0,1}^{K×L}`` is a partition of the ``L`` positions, so it is stored as
``assignment[b, l] = k`` (int64, O(L) per sample) instead of a dense one-hot matrix; :func:`source_matrix` builds the
dense ``S`` on demand.

Token order: the non-CLS tokens are always kept in raster order of their first (smallest) source position. The
alternate even/odd split of the next layer then stays spatially meaningful, and the K merged tokens come out in a
deterministic, position-consistent order. The CLS token (when present) is first and is never merged. Other A/B splits
(the authors' re-split order, a 2-D window split, a fixed grid) pass their destination set to :func:`merge_step`
(see :mod:`mergevq.tokenizer.merge_policy`); the output order stays the same.

Einstein legend:
    B  batch
    T  current tokens, CLS included (T = N + has_cls)
    N  current non-CLS tokens (= current number of groups)
    L  original positions (tokens before any merge)
    K  groups after the last merge
    C  token channels
    c  metric channels (e.g. head dimension of the keys)
    r  merges in one layer
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MergeState",
    "init_merge_state",
    "merge_step",
    "merge_schedule",
    "group_sizes",
    "source_matrix",
    "unmerge",
    "merge_by_assignment",
    "carry_destination",
]

SCHEDULE_KINDS = ("linear", "constant", "square")


@dataclass
class MergeState:
    """Tokens after some merge steps, and what each of them absorbed.

    Attributes:
        tokens: ``[B, T, C]`` current tokens; the CLS token is first when ``has_cls``.
        size: ``[B, T]`` float32, number of original positions held by each token (CLS: 1). Kept in float32 even
            for low-precision tokens so that sizes above 256 stay exact.
        assignment: ``[B, L]`` int64, index ``0..N-1`` (among the non-CLS tokens) of the group of each position.
        has_cls: whether ``tokens[:, 0]`` is a protected CLS token.
        first_position: ``[B, N]`` int64, smallest original position of each non-CLS token. Strictly increasing
            along N (tokens are in raster order of it), so a group's smallest current index also marks its first
            position: :func:`merge_step` orders the merged groups by that index, without a sort.
    """

    tokens: Tensor
    size: Tensor
    assignment: Tensor
    has_cls: bool
    first_position: Tensor

    @property
    def num_groups(self) -> int:
        """N, the number of non-CLS tokens."""
        return self.tokens.shape[1] - int(self.has_cls)

    @property
    def patch_tokens(self) -> Tensor:
        """``[B, N, C]`` the non-CLS tokens."""
        return self.tokens[:, int(self.has_cls) :]

    @property
    def patch_size(self) -> Tensor:
        """``[B, N]`` sizes of the non-CLS tokens."""
        return self.size[:, int(self.has_cls) :]


def init_merge_state(tokens: Tensor, *, has_cls: bool = True) -> MergeState:
    """Start tracking from unmerged tokens ``[B, has_cls + L, C]``: every position is its own group."""
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be [B, T, C], got shape {tuple(tokens.shape)}")
    batch, num_tokens, _ = tokens.shape
    num_positions = num_tokens - int(has_cls)
    if num_positions < 1:
        raise ValueError(f"need at least one non-CLS token, got T={num_tokens} with has_cls={has_cls}")
    positions_L = torch.arange(num_positions, device=tokens.device).expand(batch, num_positions)
    return MergeState(
        tokens=tokens,
        size=torch.ones(batch, num_tokens, device=tokens.device, dtype=torch.float32),
        assignment=positions_L.clone(),
        has_cls=has_cls,
        first_position=positions_L.clone(),
    )


def merge_step(
    state: MergeState,
    *,
    metric: Tensor,
    r: int,
    destinations: Tensor | None = None,
    regions: Tensor | None = None,
) -> MergeState:
    """Merge ``r`` tokens by bipartite soft matching on ``metric`` ``[B, T, c]`` (CLS row included when present).

    The non-CLS tokens are split into sources (set A) and destinations (set B); each A token picks its most
    cosine-similar B token, and the ``r`` A tokens with the highest such scores are merged into their partners
    (size-weighted average; several A tokens may join the same B token). Merged tokens leave in raster order of their
    first source position. ``r = 0`` returns ``state`` itself. The selection is discrete; the merged values are
    differentiable w.r.t. ``state.tokens``.

    Args:
        destinations: ``[B, N]`` bool, True for the B tokens. None: the alternate split (even indices → A, odd → B),
            which requires ``0 <= r <= N // 2``.
        regions: ``[B, N]`` int64; when given, an A token may only join a B token of the same region (e.g. the
            fixed-grid merge of :mod:`mergevq.tokenizer.merge_policy`).

    With ``destinations`` or ``regions``, every sample needs at least ``r`` A tokens that have an allowed B token.
    """
    tokens_BTC = state.tokens
    batch, num_tokens, channels = tokens_BTC.shape
    off = int(state.has_cls)
    n = num_tokens - off
    if metric.shape[:2] != (batch, num_tokens):
        raise ValueError(f"metric must be [B, T, c] = [{batch}, {num_tokens}, c], got {tuple(metric.shape)}")
    general = destinations is not None or regions is not None
    for name, mask in (("destinations", destinations), ("regions", regions)):
        if mask is not None and mask.shape != (batch, n):
            raise ValueError(f"{name} must be [B, N] = [{batch}, {n}], got {tuple(mask.shape)}")
    if not general and not 0 <= r <= n // 2:
        raise ValueError(f"r={r} merges out of N={n} tokens breaks the per-layer cap 0 <= r <= N // 2 = {n // 2}")
    if general and not 0 <= r < n:
        raise ValueError(f"r={r} merges out of N={n} tokens: need 0 <= r < N")
    if r == 0:
        return state
    device = tokens_BTC.device

    # Matching is discrete: no graph needed for the scores or any index.
    with torch.no_grad():
        # Rows of the flattened tokens: row b·T + t is token t of sample b (see _apply_merge).
        first_row = torch.arange(off, batch * num_tokens, num_tokens, device=device).unsqueeze(1)  # [B, 1] token 0
        if general:
            src_n, dst_n = _general_matching(state, metric=metric, r=r, destinations=destinations, regions=regions)
            src = (src_n + first_row).flatten()
            dst = (dst_n + first_row).flatten()
        else:
            metric_BNc = F.normalize(metric[:, off:], dim=-1)
            # bmm directly: same kernel and bits as `@`, without matmul's dispatch overhead.
            scores = torch.bmm(metric_BNc[:, 0::2], metric_BNc[:, 1::2].transpose(1, 2))  # [B, ceil(N/2), floor(N/2)]
            num_a, num_b = scores.shape[1:]
            # max-with-indices over every A row costs ~10x amax on CPU; only the r chosen rows need their argmax.
            best_score = scores.amax(dim=-1)  # [B, ceil(N/2)]
            # Stable sort: ties resolve to the earliest A token, identically for a batch and for its single samples.
            src_a = best_score.argsort(dim=-1, descending=True, stable=True)[:, :r]  # [B, r] index in A
            a_rows = src_a + torch.arange(0, batch * num_a, num_a, device=device).unsqueeze(1)
            chosen = scores.view(batch * num_a, num_b).index_select(0, a_rows.flatten()).view(batch, r, num_b)
            dst_b = chosen.max(dim=-1).indices  # [B, r] index in B (first maximum)
            src = (2 * src_a + first_row).flatten()  # [B·r]
            dst = (2 * dst_b + first_row).add_(1).flatten()
    return _apply_merge(state, src=src, dst=dst, r=r)


def _general_matching(
    state: MergeState, *, metric: Tensor, r: int, destinations: Tensor | None, regions: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(src, dst)`` ``[B, r]`` non-CLS indices for an arbitrary split, by masking the full ``[N, N]`` scores.

    Same choices as the alternate fast path when ``destinations`` marks the odd tokens: stable sort of the best
    scores (ties: earliest A token) and the first maximum among the allowed B tokens.
    """
    off = int(state.has_cls)
    n = state.num_groups
    device = metric.device
    if destinations is None:
        destinations = (torch.arange(n, device=device) % 2 == 1).expand(metric.shape[0], n)
    is_b = destinations.to(device=device, dtype=torch.bool)
    metric_BNc = F.normalize(metric[:, off:], dim=-1)
    scores = torch.bmm(metric_BNc, metric_BNc.transpose(1, 2))  # [B, N, N]
    allowed = ~is_b[:, :, None] & is_b[:, None, :]
    if regions is not None:
        allowed &= regions[:, :, None] == regions[:, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    best_score, best_dst = scores.max(dim=-1)  # [B, N]; first maximum
    eligible = allowed.any(dim=-1).sum(dim=-1)  # [B] A tokens with at least one allowed partner
    fewest = int(eligible.min())
    if fewest < r:
        raise ValueError(f"r={r} merges requested but a sample has only {fewest} source tokens with a destination")
    src = best_score.argsort(dim=-1, descending=True, stable=True)[:, :r]  # [B, r]
    return src, best_dst.gather(1, src)


def _apply_merge(state: MergeState, *, src: Tensor, dst: Tensor, r: int) -> MergeState:
    """Merge flattened rows ``src`` into ``dst`` (``[B·r]`` each, rows of ``tokens.view(B·T, C)``)."""
    tokens_BTC = state.tokens
    batch, num_tokens, channels = tokens_BTC.shape
    off = int(state.has_cls)
    n = num_tokens - off
    device = tokens_BTC.device
    num_out = num_tokens - r  # rows per sample after the merge, CLS included

    with torch.no_grad():
        # New order without a sort. Key each group by its smallest row: first positions increase along the rows, so
        # ordering groups by first position is ordering them by key. A partner's key is the smallest of its own row
        # and those it absorbs; merged-away rows take their partner's key; CLS and unmerged rows are their own key.
        # A row is its group's key iff key[row] == row, so a cumsum over that mask numbers the groups in output
        # order; every sample keeps exactly T-r groups, so sample b's land on output rows b·(T-r) to b·(T-r)+T-r-1.
        rows = torch.arange(batch * num_tokens, device=device)  # [B·T]
        key = rows.scatter_reduce(0, dst, src, reduce="amin")
        key.scatter_(0, src, key.index_select(0, dst))
        new_row = key.eq(rows).cumsum(0).sub_(1).index_select(0, key)  # [B·T] output row of each row's group
        # Output rows as indices into the current rows; a merged group's value sits in its partner's row. All rows
        # of a group write the same value, so the scatter is exact despite repeated indices.
        rows_out = torch.empty(batch * num_out, dtype=torch.int64, device=device)
        rows_out.scatter_(0, new_row, rows.scatter(0, src, dst))  # [B·(T-r)]
        # Per-sample group index (CLS excluded) of every current group, for the assignment and first positions.
        first_out = torch.arange(off, batch * num_out, num_out, device=device).unsqueeze(1)
        new_of_old = new_row.view(batch, num_tokens)[:, off:] - first_out  # [B, N]
        first_new = torch.empty(batch, n - r, dtype=torch.int64, device=device)
        first_new.scatter_reduce_(1, new_of_old, state.first_position, reduce="amin", include_self=False)

        # Sizes stay float32 (exact integers); the weights are computed in at least float32.
        size = state.size.reshape(batch * num_tokens)
        size_src = size.index_select(0, src)
        size_total = size.index_add(0, dst, size_src)  # [B·T]; stale at src (dropped)
        wdtype = torch.promote_types(tokens_BTC.dtype, size.dtype)
        weight = size_src.to(wdtype) / size_total.index_select(0, dst).to(wdtype)  # [B·r]

    # x_dst + Σ_src (s_src / s_total)(x_src − x_dst) is the size-weighted mean, exact when the merged tokens are
    # identical, and leaves unmerged tokens bit-for-bit untouched. Row copies go through index_select/index_add_ on
    # the flattened [B·T, C] view: much faster than gather/scatter with an index expanded over C. The output itself
    # is the only full-size copy; the other passes touch B·r rows.
    flat = tokens_BTC.reshape(batch * num_tokens, channels)
    delta = flat.index_select(0, src).sub_(flat.index_select(0, dst))
    delta.mul_(weight.to(tokens_BTC.dtype).unsqueeze(-1))  # [B·r, C]
    out = flat.index_select(0, rows_out).index_add_(0, new_row.index_select(0, dst), delta)

    return MergeState(
        tokens=out.view(batch, num_out, channels),
        size=size_total.index_select(0, rows_out).view(batch, num_out),
        assignment=new_of_old.gather(1, state.assignment),
        has_cls=state.has_cls,
        first_position=first_new,
    )


# ----------------------------------------------------------------------------------------------------------------
# Dense views of the assignment
# ----------------------------------------------------------------------------------------------------------------


def group_sizes(assignment: Tensor, *, num_groups: int) -> Tensor:
    """``[B, K]`` int64 number of positions in each group of ``assignment`` ``[B, L]``."""
    counts = torch.zeros(assignment.shape[0], num_groups, dtype=torch.int64, device=assignment.device)
    return counts.scatter_add_(1, assignment, torch.ones_like(assignment))


def source_matrix(assignment: Tensor, *, num_groups: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Dense one-hot source matrix ``S`` ``[B, K, L]`` with ``S[b, k, l] = 1`` iff ``assignment[b, l] == k``."""
    batch, num_positions = assignment.shape
    dense = torch.zeros(batch, num_groups, num_positions, dtype=dtype, device=assignment.device)
    return dense.scatter_(1, assignment.unsqueeze(1), 1)


def unmerge(tokens: Tensor, assignment: Tensor) -> Tensor:
    """Copy each group's token back to all its positions: ``[B, K, C] -> [B, L, C]`` (``= Sᵀ Z_K``, as a gather)."""
    return tokens.gather(1, assignment.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def merge_by_assignment(tokens: Tensor, assignment: Tensor, *, num_groups: int, has_cls: bool = False) -> Tensor:
    """Average unmerged tokens over the groups of ``assignment``: ``[B, has_cls + L, C] -> [B, has_cls + K, C]``.

    Applies a merge that :func:`merge_step` already chose to other tokens of the same positions (e.g. a normalised
    copy): ``S Z_L / sizes``, the counterpart of :func:`unmerge`. The CLS token, when present, passes through.
    """
    off = int(has_cls)
    patches_BLC = tokens[:, off:]
    index_BLC = assignment.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    sums_BKC = patches_BLC.new_zeros(tokens.shape[0], num_groups, tokens.shape[-1]).scatter_add_(
        1, index_BLC, patches_BLC
    )
    means_BKC = sums_BKC / group_sizes(assignment, num_groups=num_groups).unsqueeze(-1).to(tokens.dtype)
    return torch.cat([tokens[:, :off], means_BKC], dim=1)


def carry_destination(
    values: Tensor, *, before: MergeState, after: MergeState, destinations: Tensor | None = None
) -> Tensor:
    """Per-group values ``[B, N_before, ...]`` -> ``[B, N_after, ...]`` across one :func:`merge_step`.

    Each group of ``after`` takes the value of its *destination*: the set-B token that the others merged into, or the
    token itself when it merged with nothing. Useful for attributes that cannot be averaged, such as a merged token's
    grid position. ``destinations`` is the ``[B, N_before]`` bool set B that the step used (None: the alternate
    split's odd indices).
    """
    n_before = before.num_groups
    new_of_old = after.assignment.gather(1, before.first_position)  # [B, N_before] group after the step
    members = group_sizes(new_of_old, num_groups=after.num_groups)  # [B, N_after]
    old = torch.arange(n_before, device=values.device).expand_as(new_of_old)
    is_b = (old % 2 == 1) if destinations is None else destinations.to(device=values.device, dtype=torch.bool)
    is_destination = is_b | (members.gather(1, new_of_old) == 1)  # exactly one per group
    source = torch.zeros_like(members).scatter_reduce(
        1, new_of_old, torch.where(is_destination, old, -1), reduce="amax", include_self=False
    )
    index = source.view(*source.shape, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
    return values.gather(1, index)


# ----------------------------------------------------------------------------------------------------------------
# Merge schedules
# ----------------------------------------------------------------------------------------------------------------


def merge_schedule(*, num_tokens: int, target: int, num_layers: int, kind: str = "linear") -> list[int]:
    """Per-layer merge counts taking ``num_tokens`` (L) non-CLS tokens down to exactly ``target`` (K).

    Kinds:
        ``"linear"``: the authors' released schedule. For an integer base ``r`` the layers get
            ``int(min_val + step·i)`` with ``min_val = int(1.5r)``, ``max_val = 2r − min_val``,
            ``step = (max_val − min_val)/(num_layers − 1)`` (a linear decrease from 1.5r to 0.5r). The base ``r``
            whose sum is closest to ``L − K`` is used (ties: the smaller ``r``) and the remainder, of either sign,
            goes to layer 0.
        ``"constant"``: ``L − K`` spread evenly; the first ``(L − K) mod num_layers`` layers take one more.
        ``"square"``: our reading of the paper's "square decreasing" schedule (App. A.1): ``r_i ∝ (num_layers − i)²``,
            rounded by largest remainders (ties: earlier layer).

    Every schedule then goes through one deterministic repair pass that keeps each layer within
    ``0 <= r_i <= N_i // 2`` (``N_i`` the running count) and never overshoots ``K``; it changes nothing for schedules
    that already satisfy this (e.g. all the paper's). Excess that a layer cannot take moves to later layers, and a
    layer takes more than asked when the remaining layers could not otherwise reach ``K`` under the cap. The sum is
    always exactly ``L − K``.

    Raises:
        ValueError: for an unknown kind, ``K`` outside ``[1, L]``, ``num_layers < 1``, or when ``L > K·2^num_layers``
            (the 50% cap cannot reach ``K`` in that many layers).
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {SCHEDULE_KINDS}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if not 1 <= target <= num_tokens:
        raise ValueError(f"target K={target} must lie in [1, L={num_tokens}]")
    if num_tokens > target * 2**num_layers:
        raise ValueError(
            f"cannot merge L={num_tokens} tokens down to K={target} in num_layers={num_layers} layers: at most half "
            f"of the tokens merge per layer, so K >= ceil(L / 2^num_layers) is required"
        )
    total = num_tokens - target
    if kind == "linear":
        desired = _linear_schedule(total=total, num_layers=num_layers)
    elif kind == "constant":
        base, extra = divmod(total, num_layers)
        desired = [base + 1] * extra + [base] * (num_layers - extra)
    else:
        desired = _square_schedule(total=total, num_layers=num_layers)
    return _repair_schedule(desired, num_tokens=num_tokens, target=target)


def _linear_values(r: int, num_layers: int) -> list[int]:
    """The linear 1.5r → 0.5r decrease, truncated to integers exactly as the release computes it."""
    min_val = int(r * 1.5)
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1)
    return [int(min_val + step * i) for i in range(num_layers)]


def _linear_schedule(*, total: int, num_layers: int) -> list[int]:
    if num_layers == 1:
        return [total]
    # The average layer value is about r - 1, so bases beyond 2·total/layers + 2 only get further from the total.
    best = min(range(2 * total // num_layers + 3), key=lambda r: (abs(sum(_linear_values(r, num_layers)) - total), r))
    values = _linear_values(best, num_layers)
    values[0] += total - sum(values)
    return values


def _square_schedule(*, total: int, num_layers: int) -> list[int]:
    weights = [(num_layers - i) ** 2 for i in range(num_layers)]
    ideal = [total * w / sum(weights) for w in weights]
    values = [int(v) for v in ideal]
    by_remainder = sorted(range(num_layers), key=lambda i: (-(ideal[i] - values[i]), i))
    for i in by_remainder[: total - sum(values)]:
        values[i] += 1
    return values


def _repair_schedule(desired: list[int], *, num_tokens: int, target: int) -> list[int]:
    """Clamp each layer into its feasible range, carrying the difference (either sign) to the next layer.

    Layer i with running count N may take r in [lo, hi]: hi = min(N // 2, N − K); lo = max(0, N − K·2^m) with m the
    layers left after it, because m further halvings reach K only from at most K·2^m tokens. The last layer has
    lo = hi = N − K, so the total is exact.
    """
    schedule = []
    count, carry = num_tokens, 0
    for i, want in enumerate(desired):
        layers_left = len(desired) - 1 - i
        lo = max(0, count - target * 2**layers_left)
        hi = min(count // 2, count - target)
        take = min(max(want + carry, lo), hi)
        carry += want - take
        schedule.append(take)
        count -= take
    return schedule
