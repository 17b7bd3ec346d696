"""Token merging with assignment tracking: partition invariants, exact averages, order, schedules, batching."""

from __future__ import annotations

import random

import pytest
import torch

from mergevq.nn.attention import Attention
from mergevq.nn.tome import (
    MergeState,
    _linear_schedule,
    group_sizes,
    init_merge_state,
    merge_schedule,
    merge_step,
    source_matrix,
    unmerge,
)

# SPEC §2.3, verified by instantiating the authors' modules.
VERIFIED_LINEAR = {
    (1024, 256): [101, 90, 84, 78, 72, 66, 61, 55, 49, 43, 37, 32],
    (1024, 400): [83, 73, 68, 63, 59, 54, 49, 44, 40, 35, 30, 26],
    (1024, 576): [54, 53, 50, 46, 43, 39, 36, 32, 29, 25, 22, 19],
    (256, 144): [12, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 5],
    (256, 196): [12, 6, 6, 5, 5, 5, 4, 4, 4, 3, 3, 3],
    (256, 100): [24, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7],
    (256, 64): [29, 22, 21, 19, 18, 16, 15, 13, 12, 10, 9, 8],
    (256, 36): [25, 26, 24, 23, 21, 19, 18, 16, 14, 13, 11, 10],
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _run(tokens, schedule, *, has_cls=True, metric_fn=None, seed=0):
    """Apply merge_step over a schedule; the metric is random keys (or metric_fn(state))."""
    gen = torch.Generator().manual_seed(seed)
    state = init_merge_state(tokens, has_cls=has_cls)
    for r in schedule:
        if metric_fn is None:
            metric = torch.randn(*state.tokens.shape[:2], 5, generator=gen, dtype=tokens.dtype)
        else:
            metric = metric_fn(state)
        state = merge_step(state, metric=metric, r=r)
    return state


def _check_invariants(state: MergeState, tokens, *, num_positions):
    """Partition, sizes, raster order and size-weighted means, all recomputed from the assignment alone."""
    batch, n = state.tokens.shape[0], state.num_groups
    off = int(state.has_cls)
    assign = state.assignment
    assert assign.dtype == torch.int64 and assign.shape == (batch, num_positions)
    assert assign.min() >= 0 and assign.max() < n
    dense = source_matrix(assign, num_groups=n)
    assert torch.equal(dense.sum(dim=1), torch.ones(batch, num_positions))  # each position in exactly one group
    sizes = group_sizes(assign, num_groups=n)
    assert (sizes > 0).all()  # no empty group
    assert torch.equal(sizes.to(state.size.dtype), state.patch_size)
    assert torch.equal(sizes.sum(dim=1), torch.full((batch,), num_positions))
    # Raster order of the first source position, which the state also carries.
    positions = torch.arange(num_positions).expand(batch, -1)
    first = torch.full((batch, n), num_positions).scatter_reduce(1, assign, positions, reduce="amin")
    assert torch.equal(first, state.first_position)
    assert (first[:, 1:] > first[:, :-1]).all()
    # Brute force: every merged token is the mean of the original tokens of its group.
    originals = tokens[:, off:]
    means = torch.bmm(dense.to(tokens.dtype), originals) / sizes.unsqueeze(-1).to(tokens.dtype)
    torch.testing.assert_close(state.patch_tokens, means, rtol=1e-9, atol=1e-9)
    if state.has_cls:
        assert torch.equal(state.tokens[:, 0], tokens[:, 0]) and torch.equal(state.size[:, 0], torch.ones(batch))


# ---------------------------------------------------------------------------------------------------------------
# merge_step against a literal per-sample reference
# ---------------------------------------------------------------------------------------------------------------


def _reference_step(tokens, size, groups, metric, r, has_cls):
    """One bipartite-matching merge for one sample, in plain Python over lists (float64)."""
    off = int(has_cls)
    xs = [tokens[off + i] for i in range(len(groups))]
    ss = [float(size[off + i]) for i in range(len(groups))]
    ms = [metric[off + i] / metric[off + i].norm() for i in range(len(groups))]
    set_a, set_b = list(range(0, len(groups), 2)), list(range(1, len(groups), 2))
    best = {}
    for a in set_a if set_b else []:
        scores = [float(ms[a] @ ms[b]) for b in set_b]
        j = max(range(len(scores)), key=lambda i: (scores[i], -i))
        best[a] = (scores[j], set_b[j])
    chosen = sorted(best, key=lambda a: (-best[a][0], a))[:r]
    members = {i: [i] for i in range(len(groups))}
    for a in chosen:
        members[best[a][1]] += members.pop(a)
    new_groups, new_x, new_s = [], [], []
    for mem in members.values():
        total = sum(ss[i] for i in mem)
        new_x.append(sum(ss[i] * xs[i] for i in mem) / total)
        new_s.append(total)
        new_groups.append(sorted(p for i in mem for p in groups[i]))
    order = sorted(range(len(new_groups)), key=lambda g: new_groups[g][0])
    return [new_x[g] for g in order], [new_s[g] for g in order], [new_groups[g] for g in order]


@pytest.mark.parametrize("has_cls", [True, False])
@pytest.mark.parametrize("num_positions", [2, 9, 16, 31])
def test_merge_step_matches_reference(has_cls, num_positions):
    torch.manual_seed(num_positions)
    schedule = merge_schedule(num_tokens=num_positions, target=max(1, num_positions // 5), num_layers=4)
    tokens = torch.randn(3, num_positions + has_cls, 6, dtype=torch.float64)
    state = init_merge_state(tokens, has_cls=has_cls)
    ref = [([tokens[b, i + has_cls] for i in range(num_positions)], [1.0] * num_positions,
            [[i] for i in range(num_positions)]) for b in range(3)]  # fmt: skip
    for r in schedule:
        metric = torch.randn(*state.tokens.shape[:2], 4, dtype=torch.float64)
        for b in range(3):
            xs, ss, groups = ref[b]
            pad = [tokens[b, 0]] if has_cls else []
            ref[b] = _reference_step(
                torch.stack(pad + xs), torch.tensor([1.0] * has_cls + ss), groups, metric[b], r, has_cls
            )
        state = merge_step(state, metric=metric, r=r)
        for b in range(3):
            xs, ss, groups = ref[b]
            torch.testing.assert_close(state.patch_tokens[b], torch.stack(xs), rtol=1e-12, atol=1e-12)
            assert state.patch_size[b].tolist() == ss
            assert [sorted(torch.nonzero(state.assignment[b] == k).flatten().tolist()) for k in range(len(groups))] == (
                groups
            )


# ---------------------------------------------------------------------------------------------------------------
# Invariants over full 12-layer runs
# ---------------------------------------------------------------------------------------------------------------


def _random_pairs(count, seed=0):
    rng = random.Random(seed)
    pairs = [(256, 144), (256, 1), (256, 256), (50, 7), (17, 1), (1, 1), (2, 1), (3, 2)]
    while len(pairs) < count:
        num_positions = rng.randint(1, 300)
        min_k = -(-num_positions // 2**12)
        pairs.append((num_positions, rng.randint(min_k, num_positions)))
    return pairs


@pytest.mark.parametrize(("kind", "seed"), [("linear", 0), ("constant", 1), ("square", 2)])
def test_twelve_layer_runs_reach_k_exactly_with_a_valid_partition(kind, seed):
    for i, (num_positions, target) in enumerate(_random_pairs(24, seed=seed)):
        has_cls = i % 2 == 0
        tokens = torch.randn(2, num_positions + has_cls, 8, dtype=torch.float64)
        schedule = merge_schedule(num_tokens=num_positions, target=target, num_layers=12, kind=kind)
        state = _run(tokens, schedule, has_cls=has_cls, seed=i)
        assert state.num_groups == target, (num_positions, target, schedule)
        _check_invariants(state, tokens, num_positions=num_positions)


def test_metric_from_tokens_themselves_keeps_invariants():
    tokens = torch.randn(3, 1 + 64, 16, dtype=torch.float64)
    schedule = merge_schedule(num_tokens=64, target=10, num_layers=6)
    state = _run(tokens, schedule, metric_fn=lambda s: s.tokens)
    assert state.num_groups == 10
    _check_invariants(state, tokens, num_positions=64)


def test_attention_metric_and_proportional_sizes_drive_a_merge_run():
    attn = Attention(16, num_heads=4).double()
    tokens = torch.randn(2, 1 + 49, 16, dtype=torch.float64)
    state = init_merge_state(tokens)
    for r in merge_schedule(num_tokens=49, target=5, num_layers=6):
        _, metric = attn(state.tokens, size=state.size, return_metric=True)
        state = merge_step(state, metric=metric, r=r)
    assert state.tokens.shape == (2, 6, 16)
    _check_invariants(state, tokens, num_positions=49)


def test_identical_tokens_merge_exactly():
    # Within a sample all tokens are equal; naive Σ s·x / Σ s is not bit-exact for such inputs.
    values = torch.tensor([0.1, -3.7, 1e-3])[:, None, None] * torch.linspace(0.3, 7.1, 12)
    tokens = values.expand(3, 1 + 100, 12).clone()
    state = _run(tokens, merge_schedule(num_tokens=100, target=3, num_layers=12))
    assert torch.equal(state.tokens, values.expand(3, 1 + 3, 12))
    assert state.patch_size.sum(dim=1).tolist() == [100.0] * 3


def test_cls_is_never_merged_even_when_most_similar():
    tokens = torch.randn(2, 1 + 20, 4)
    metric_fn = lambda s: torch.ones(*s.tokens.shape[:2], 3)  # every score ties, CLS included
    state = _run(tokens, merge_schedule(num_tokens=20, target=2, num_layers=5), metric_fn=metric_fn)
    assert torch.equal(state.tokens[:, 0], tokens[:, 0])
    assert state.size[:, 0].tolist() == [1.0, 1.0]
    assert state.patch_size.sum(dim=1).tolist() == [20.0, 20.0]


def test_output_order_is_raster_order_of_first_position():
    # Token 2 (set A) is most similar to token 1 (set B): the merged group {1, 2} must sit at index 1.
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.2], [-1.0, 0.0]]])
    state = merge_step(init_merge_state(torch.arange(5.0)[None, :, None], has_cls=False), metric=metric, r=1)
    assert state.assignment.tolist() == [[0, 1, 1, 2, 3]]
    assert state.tokens.flatten().tolist() == [0.0, 1.5, 3.0, 4.0]
    # A later B token absorbing an earlier A token moves forward to the A token's place.
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.3, 1.0], [1.0, 0.1]]])
    state = merge_step(init_merge_state(torch.arange(4.0)[None, :, None], has_cls=False), metric=metric, r=1)
    assert state.assignment.tolist() == [[0, 1, 2, 0]]
    assert state.first_position.tolist() == [[0, 1, 2]]
    assert state.tokens.flatten().tolist() == [1.5, 1.0, 2.0]


def test_batch_result_equals_per_sample_results():
    torch.manual_seed(3)
    tokens = torch.randn(5, 1 + 81, 8)
    schedule = merge_schedule(num_tokens=81, target=11, num_layers=12)
    metrics = []

    def record(state):
        metrics.append(torch.randn(*state.tokens.shape[:2], 4))
        return metrics[-1]

    batched = _run(tokens, schedule, metric_fn=record)
    for b in range(5):
        per_layer = iter(m[b : b + 1] for m in metrics)
        single = _run(tokens[b : b + 1], schedule, metric_fn=lambda s, it=per_layer: next(it))
        assert torch.equal(single.assignment, batched.assignment[b : b + 1])
        assert torch.equal(single.size, batched.size[b : b + 1])
        torch.testing.assert_close(single.tokens, batched.tokens[b : b + 1], rtol=0, atol=1e-6)


def test_reaching_a_single_token_and_odd_counts():
    tokens = torch.randn(2, 1 + 7, 3, dtype=torch.float64)
    state = init_merge_state(tokens)
    for r in (3, 2, 1):  # 7 -> 4 -> 2 -> 1, each at the cap floor(N/2)
        state = merge_step(state, metric=torch.randn(*state.tokens.shape[:2], 2, dtype=torch.float64), r=r)
    assert state.tokens.shape == (2, 2, 3) and state.assignment.eq(0).all()
    torch.testing.assert_close(state.tokens[:, 1], tokens[:, 1:].mean(dim=1), rtol=1e-12, atol=1e-12)


def test_r_zero_is_identity_and_cap_is_enforced():
    state = init_merge_state(torch.randn(2, 1 + 9, 4))
    assert merge_step(state, metric=torch.randn(2, 10, 3), r=0) is state
    with pytest.raises(ValueError, match="N // 2 = 4"):
        merge_step(state, metric=torch.randn(2, 10, 3), r=5)
    with pytest.raises(ValueError, match="cap"):
        merge_step(state, metric=torch.randn(2, 10, 3), r=-1)
    with pytest.raises(ValueError, match="metric"):
        merge_step(state, metric=torch.randn(2, 9, 3), r=1)


def test_gradients_flow_to_tokens_as_group_means():
    tokens = torch.randn(2, 1 + 30, 5, dtype=torch.float64, requires_grad=True)
    state = _run(tokens, merge_schedule(num_tokens=30, target=4, num_layers=4))
    weights = torch.randn(2, 5, 1, dtype=torch.float64)
    (state.tokens * weights).sum().backward()
    # d(Σ_k w_k · mean_k)/dx_l = w_{g(l)} / |g(l)|; CLS passes through unchanged.
    per_group = weights[:, 1:, 0] / state.patch_size
    expected = per_group.gather(1, state.assignment).unsqueeze(-1).expand(-1, -1, 5)
    torch.testing.assert_close(tokens.grad[:, 1:], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tokens.grad[:, 0], weights[:, 0].expand(-1, 5), rtol=0, atol=0)


def test_low_precision_tokens_keep_exact_float32_sizes():
    tokens = torch.randn(1, 1 + 1024, 8, dtype=torch.bfloat16)
    state = _run(tokens, merge_schedule(num_tokens=1024, target=3, num_layers=12))
    assert state.size.dtype == torch.float32 and state.tokens.dtype == torch.bfloat16
    assert torch.equal(state.patch_size, group_sizes(state.assignment, num_groups=3).float())


# ---------------------------------------------------------------------------------------------------------------
# Dense views
# ---------------------------------------------------------------------------------------------------------------


def test_dense_views_on_a_hand_example():
    assignment = torch.tensor([[0, 1, 1, 2, 0], [0, 0, 0, 0, 1]])
    assert group_sizes(assignment, num_groups=3).tolist() == [[2, 2, 1], [4, 1, 0]]
    dense = source_matrix(assignment, num_groups=3, dtype=torch.int64)
    assert dense[0].tolist() == [[1, 0, 0, 0, 1], [0, 1, 1, 0, 0], [0, 0, 0, 1, 0]]
    assert dense[1].tolist() == [[1, 1, 1, 1, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]]


def test_unmerge_equals_dense_source_transpose_product():
    tokens = torch.randn(3, 1 + 100, 7, dtype=torch.float64)
    state = _run(tokens, merge_schedule(num_tokens=100, target=13, num_layers=12))
    full = unmerge(state.patch_tokens, state.assignment)
    dense = source_matrix(state.assignment, num_groups=13, dtype=torch.float64)
    assert full.shape == (3, 100, 7)
    torch.testing.assert_close(full, dense.transpose(1, 2) @ state.patch_tokens, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "expected"), list(VERIFIED_LINEAR.items()))
def test_linear_schedule_reproduces_verified_table(size, expected):
    num_tokens, target = size
    assert merge_schedule(num_tokens=num_tokens, target=target, num_layers=12, kind="linear") == expected


@pytest.mark.parametrize("kind", ["linear", "constant", "square"])
def test_schedules_are_exact_and_respect_the_cap(kind):
    rng = random.Random(7)
    cases = [(1024, 1, 10), (1024, 1024, 12), (5, 1, 3), (1, 1, 1), (100, 99, 12), (4096, 2, 12), (257, 1, 9)]
    for _ in range(300):
        num_layers = rng.randint(1, 16)
        num_tokens = rng.randint(1, 2000)
        cases.append((num_tokens, rng.randint(-(-num_tokens // 2**num_layers), num_tokens), num_layers))
    for num_tokens, target, num_layers in cases:
        schedule = merge_schedule(num_tokens=num_tokens, target=target, num_layers=num_layers, kind=kind)
        assert len(schedule) == num_layers and sum(schedule) == num_tokens - target
        count = num_tokens
        for r in schedule:
            assert 0 <= r <= count // 2, (num_tokens, target, num_layers, schedule)
            count -= r


def test_constant_and_square_shapes():
    assert merge_schedule(num_tokens=256, target=144, num_layers=12, kind="constant") == [10] * 4 + [9] * 8
    square = merge_schedule(num_tokens=1024, target=256, num_layers=12, kind="square")
    assert square == sorted(square, reverse=True) and square[0] > 4 * square[6]
    ideal = [768 * (12 - i) ** 2 / 650 for i in range(12)]
    assert all(abs(r - v) < 1 for r, v in zip(square, ideal))


def test_linear_schedule_repairs_small_targets_deterministically():
    # The raw linear schedule for 256 -> 1 over-fills late layers; the repair keeps the cap and the total.
    schedule = merge_schedule(num_tokens=256, target=1, num_layers=12)
    # By hand: layers 0-4 take the raw 39, 29, 27, 25, 23 (256 -> 113 tokens); 6 layers after layer 5 can only halve
    # 64 -> 1, so layer 5 must take 113 - 64 = 49 instead of 21, and the rest is forced: 32, 16, 8, 4, 2, 1.
    assert _linear_schedule(total=255, num_layers=12)[:6] == [39, 29, 27, 25, 23, 21]
    assert schedule == [39, 29, 27, 25, 23, 49, 32, 16, 8, 4, 2, 1]
    assert merge_schedule(num_tokens=20, target=19, num_layers=12) == [1] + [0] * 11
    assert merge_schedule(num_tokens=7, target=7, num_layers=3) == [0, 0, 0]
    assert merge_schedule(num_tokens=10, target=5, num_layers=1) == [5]
    # Without the repair the 256 -> 1 linear schedule would break the cap at some layer.
    count, broken = 256, False
    for r in _linear_schedule(total=255, num_layers=12):
        broken |= r > count // 2
        count -= r
    assert broken and schedule != _linear_schedule(total=255, num_layers=12)


def test_schedule_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"L=1024.*K=1.*num_layers=5"):
        merge_schedule(num_tokens=1024, target=1, num_layers=5)
    with pytest.raises(ValueError, match="K=0"):
        merge_schedule(num_tokens=16, target=0, num_layers=4)
    with pytest.raises(ValueError, match="K=17"):
        merge_schedule(num_tokens=16, target=17, num_layers=4)
    with pytest.raises(ValueError, match="kind"):
        merge_schedule(num_tokens=16, target=4, num_layers=4, kind="cubic")
    with pytest.raises(ValueError, match="num_layers"):
        merge_schedule(num_tokens=16, target=4, num_layers=0)
    # Exactly at the limit is fine: 2^4 tokens to 1 in 4 halvings.
    assert merge_schedule(num_tokens=16, target=1, num_layers=4) == [8, 4, 2, 1]
