"""Merge policies (ToMe splits, fixed grid) and merge diagnostics: exact references and partition invariants."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from mergevq.nn.tome import MergeState, carry_destination, init_merge_state, merge_schedule, merge_step
from mergevq.tokenizer.config import TokenizerConfig, get_preset
from mergevq.tokenizer.merge_policy import MergePlan, grid_block_side
from mergevq.tokenizer.merge_stats import (
    group_pixel_variance,
    merge_stats,
    pearson,
    row_confined,
    size_histogram,
)
from mergevq.tokenizer.model import MergeVQ


def _check_partition(state: MergeState, *, num_positions: int) -> None:
    """Every position in exactly one group, sizes = member counts, groups in raster order of first position."""
    n = state.num_groups
    assign = state.assignment
    counts = torch.zeros(assign.shape[0], n, dtype=torch.int64).scatter_add_(1, assign, torch.ones_like(assign))
    assert bool((counts > 0).all())  # no empty group
    assert torch.equal(counts.sum(1), torch.full((assign.shape[0],), num_positions))  # each position once
    assert torch.equal(counts.float(), state.patch_size)
    positions = torch.arange(num_positions).expand_as(assign)
    first = torch.full((assign.shape[0], n), num_positions).scatter_reduce(1, assign, positions, "amin")
    assert torch.equal(first, state.first_position)
    assert bool((first[:, 1:] > first[:, :-1]).all())


def _run_plan(tokens, schedule, plan: MergePlan | None):
    """Merge with metric = the tokens themselves, under ``plan`` (None: merge_step's alternate fast path)."""
    state = init_merge_state(tokens, has_cls=True)
    for r in schedule:
        metric = state.tokens
        state = merge_step(state, metric=metric, r=r) if plan is None else plan.merge(state, metric=metric, r=r)
    return state


def _plan(split="alternate", *, policy="tome", grid=(8, 8), k=16, training=False, window=2):
    return MergePlan(policy=policy, split=split, window=window, grid=grid, num_tokens=k, training=training)


# ---------------------------------------------------------------------------------------------------------------------
# (a) alternate: today's behaviour, exactly
# ---------------------------------------------------------------------------------------------------------------------


def test_general_path_with_odd_destinations_equals_the_fast_path():
    torch.manual_seed(0)
    tokens = torch.randn(3, 1 + 64, 12)
    fast = init_merge_state(tokens, has_cls=True)
    general = fast
    for r in merge_schedule(num_tokens=64, target=9, num_layers=6):
        odd = (torch.arange(general.num_groups) % 2 == 1).expand(3, -1)
        fast = merge_step(fast, metric=fast.tokens, r=r)
        general = merge_step(general, metric=general.tokens, r=r, destinations=odd)
        for name in ("tokens", "size", "assignment", "first_position"):
            assert torch.equal(getattr(fast, name), getattr(general, name)), name


def test_alternate_plan_reproduces_the_encoder_without_a_plan():
    torch.manual_seed(1)
    model = MergeVQ.from_preset("tiny-32").eval()
    assert model.config.merge_split == "alternate" and model.config.merge_policy == "tome"
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    enc = model.encoder
    with torch.no_grad():
        out = enc(x, num_tokens=20)
        # Reference: the blocks with merge_step's alternate split called directly (no plan object at all).
        from mergevq.nn.blocks import map_to_tokens

        state = init_merge_state(torch.cat([enc.cls_token.expand(2, -1, -1), map_to_tokens(enc.stem(x))], 1))
        for block, r in zip(enc.blocks, enc.schedule(num_tokens=64, target=20)):
            state = block(state, r=r, plan=None)
    assert torch.equal(out.assignment, state.assignment)
    assert torch.equal(out.cls, state.tokens[:, 0])


# ---------------------------------------------------------------------------------------------------------------------
# fixed grid
# ---------------------------------------------------------------------------------------------------------------------


def _blocks(h: int, w: int, b: int) -> torch.Tensor:
    rows, cols = torch.arange(h * w) // w, torch.arange(h * w) % w
    return (rows // b) * (w // b) + cols // b


@pytest.mark.parametrize(("k", "b"), [(16, 2), (4, 4), (1, 8), (64, 1)])
def test_grid_policy_gives_exactly_the_square_blocks(k, b):
    torch.manual_seed(2)
    model = MergeVQ.from_preset("tiny-32", merge_policy="grid", default_num_tokens=16).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        enc = model.encode(x, num_tokens=k)
    expected = _blocks(8, 8, b).expand(3, -1)
    assert torch.equal(enc.assignment, expected)  # groups = blocks, numbered in raster order of first position
    assert torch.equal(enc.sizes, torch.full((3, k), float(b * b)))
    assert torch.equal(enc.source_matrix().sum(1), torch.ones(3, 64))  # every position in exactly one group


def test_grid_policy_is_the_same_code_path_in_training_and_decodes():
    torch.manual_seed(3)
    model = MergeVQ.from_preset("tiny-32", merge_policy="grid", default_num_tokens=16).train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(x, num_tokens=16)
    assert torch.equal(out.encoded.assignment, _blocks(8, 8, 2).expand(2, -1))
    assert out.reconstruction.shape == x.shape and "source_recovery" in out.losses
    out.reconstruction.mean().backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad is not None


def test_grid_policy_refuses_k_that_does_not_tile():
    model = MergeVQ.from_preset("tiny-32", merge_policy="grid", default_num_tokens=16).eval()
    with pytest.raises(ValueError, match=r"K=36 does not tile it"):
        model.encode(torch.zeros(1, 3, 32, 32), num_tokens=36)
    with pytest.raises(ValueError, match=r"TokenizerConfig\.default_num_tokens: .*K=36 does not tile"):
        get_preset("tiny-32", merge_policy="grid")  # tiny-32 keeps 36 of 64 by default
    assert grid_block_side(grid=(16, 16), num_tokens=16) == 4
    assert grid_block_side(grid=(8, 12), num_tokens=6) == 4
    with pytest.raises(ValueError, match="K=8 does not tile"):
        grid_block_side(grid=(8, 8), num_tokens=8)


def test_grid_plan_at_tome_level_with_any_schedule():
    torch.manual_seed(4)
    tokens = torch.randn(2, 1 + 256, 6)
    for kind in ("linear", "square", "constant"):
        schedule = merge_schedule(num_tokens=256, target=16, num_layers=12, kind=kind)
        state = _run_plan(tokens, schedule, _plan(policy="grid", grid=(16, 16), k=16))
        _check_partition(state, num_positions=256)
        assert torch.equal(state.assignment, _blocks(16, 16, 4).expand(2, -1))
        # size-weighted means of a fixed partition: the plain mean of each block's tokens
        expected = torch.stack(
            [tokens[:, 1:][:, _blocks(16, 16, 4) == g].mean(1) for g in range(16)], dim=1
        )  # [B, 16, C]
        torch.testing.assert_close(state.patch_tokens, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# (b) resplit: the authors' [unmerged A, B] order, against a literal re-implementation
# ---------------------------------------------------------------------------------------------------------------------


def _authors_reference(tokens: torch.Tensor, schedule: list[int]) -> list[frozenset]:
    """ToMe as the authors run it, on one sample: sequence [CLS, ...], A = even index, B = odd, CLS row −inf,
    top-r A rows merged (size-weighted) into their best B, new sequence [CLS, unmerged A (A order), B (B order)]."""
    seq = [(tokens[0], 1.0, frozenset())] + [(tokens[i + 1], 1.0, frozenset([i])) for i in range(len(tokens) - 1)]
    for r in schedule:
        a, b = seq[0::2], seq[1::2]
        xa = F.normalize(torch.stack([t for t, _, _ in a]), dim=-1)
        xb = F.normalize(torch.stack([t for t, _, _ in b]), dim=-1)
        scores = xa @ xb.T
        scores[0] = -math.inf  # CLS is never merged
        best, partner = scores.max(dim=-1)
        order = sorted(range(len(a)), key=lambda i: -float(best[i]))
        merged, kept = set(order[:r]), sorted(order[r:])
        new_b = [list(item) for item in b]
        for i in order[:r]:
            j = int(partner[i])
            t, s, g = new_b[j]
            ta, sa, ga = a[i]
            new_b[j] = [(t * s + ta * sa) / (s + sa), s + sa, g | ga]
        assert not (merged & set(kept))
        seq = [a[i] for i in kept] + [tuple(item) for item in new_b]
    return sorted((g for _, _, g in seq[1:]), key=min)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resplit_matches_the_authors_order_exactly(seed):
    torch.manual_seed(seed)
    tokens = torch.randn(2, 1 + 64, 8, dtype=torch.float64)
    schedule = merge_schedule(num_tokens=64, target=12, num_layers=6)
    state = _run_plan(tokens, schedule, _plan("resplit", k=12))
    _check_partition(state, num_positions=64)
    for b in range(2):
        groups = [frozenset(torch.nonzero(state.assignment[b] == k).flatten().tolist()) for k in range(12)]
        assert groups == _authors_reference(tokens[b], schedule)


def test_resplit_differs_from_alternate_after_the_first_layer():
    torch.manual_seed(5)
    tokens = torch.randn(2, 1 + 64, 8)
    schedule = merge_schedule(num_tokens=64, target=12, num_layers=6)
    alternate = _run_plan(tokens, schedule, None)
    resplit = _run_plan(tokens, schedule, _plan("resplit", k=12))
    assert not torch.equal(alternate.assignment, resplit.assignment)


# ---------------------------------------------------------------------------------------------------------------------
# (c) 2-D window split (ToMe for Stable Diffusion)
# ---------------------------------------------------------------------------------------------------------------------


def test_window_split_first_layer_top_left_in_eval_and_one_per_window_in_training():
    state = init_merge_state(torch.randn(2, 1 + 64, 4), has_cls=True)
    rows, cols = torch.arange(64) // 8, torch.arange(64) % 8
    window = (rows // 2) * 4 + cols // 2
    destinations, regions = _plan("window").split(state, r=10)
    assert regions is None
    assert torch.equal(destinations, ((rows % 2 == 0) & (cols % 2 == 0)).expand(2, -1))
    torch.manual_seed(6)
    seen = set()
    for _ in range(5):
        destinations, _ = _plan("window", training=True).split(state, r=10)
        for b in range(2):
            assert torch.equal(torch.bincount(window[destinations[b]], minlength=16), torch.ones(16, dtype=torch.int64))
            seen.add(tuple(destinations[b].nonzero().flatten().tolist()))
    assert len(seen) > 1  # random within the windows


@pytest.mark.parametrize("training", [False, True])
def test_window_split_runs_to_small_k_with_a_valid_partition(training):
    torch.manual_seed(7)
    tokens = torch.randn(3, 1 + 64, 8)
    for k in (32, 16, 9, 1):  # below 16 windows the window side has to double
        schedule = merge_schedule(num_tokens=64, target=k, num_layers=6)
        state = _run_plan(tokens, schedule, _plan("window", k=k, training=training))
        assert state.num_groups == k
        _check_partition(state, num_positions=64)


def test_window_split_one_step_equals_merge_step_with_top_left_destinations():
    torch.manual_seed(8)
    tokens = torch.randn(2, 1 + 64, 8)
    state = init_merge_state(tokens, has_cls=True)
    rows, cols = torch.arange(64) // 8, torch.arange(64) % 8
    top_left = ((rows % 2 == 0) & (cols % 2 == 0)).expand(2, -1)
    expected = merge_step(state, metric=tokens, r=20, destinations=top_left)
    got = _plan("window").merge(state, metric=tokens, r=20)
    assert torch.equal(got.assignment, expected.assignment) and torch.equal(got.tokens, expected.tokens)
    # destinations never merge with each other: a group holds at most one top-left cell, a merged group exactly one
    for b in range(2):
        held = torch.bincount(got.assignment[b][top_left[b]], minlength=got.num_groups)
        assert bool((held <= 1).all())
        assert bool((held[got.patch_size[b] > 1] == 1).all())


def test_carry_destination_with_an_explicit_split():
    state = init_merge_state(torch.arange(7.0).view(1, 7, 1), has_cls=True)
    destinations = torch.tensor([[True, False, False, True, False, True]])
    after = merge_step(state, metric=torch.ones(1, 7, 2), r=2, destinations=destinations)
    # equal metrics: ties go to the earliest source (1, 2) and the first destination (0)
    assert after.assignment.tolist() == [[0, 0, 0, 1, 2, 3]]
    values = torch.tensor([[10, 11, 12, 13, 14, 15]])
    assert carry_destination(values, before=state, after=after, destinations=destinations).tolist() == [
        [10, 13, 14, 15]
    ]


@pytest.mark.parametrize("split", ["resplit", "window"])
def test_encoder_splits_keep_the_model_invariants(split):
    torch.manual_seed(9)
    model = MergeVQ.from_preset("tiny-32", merge_split=split)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for mode in (model.eval(), model.train()):
        with torch.no_grad():
            enc = mode.encode(x, num_tokens=10)
        counts = torch.stack([torch.bincount(a, minlength=10) for a in enc.assignment])
        assert torch.equal(counts.float(), enc.sizes)
        positions = torch.arange(64).expand(2, 64)
        first = torch.full((2, 10), 64).scatter_reduce(1, enc.assignment, positions, "amin")
        assert bool((first[:, 1:] > first[:, :-1]).all())


def test_config_validation_names_the_merge_keys():
    with pytest.raises(ValueError, match=r"TokenizerConfig\.merge_policy: 'tiles'"):
        TokenizerConfig(merge_policy="tiles")
    with pytest.raises(ValueError, match=r"TokenizerConfig\.merge_split"):
        TokenizerConfig(merge_split="random")
    with pytest.raises(ValueError, match=r"TokenizerConfig\.merge_window: 1 must be >= 2"):
        TokenizerConfig(merge_window=1)
    cfg = replace(get_preset("tiny-32"), default_num_tokens=16, merge_policy="grid")
    assert TokenizerConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------------------------------------------------
# diagnostics on hand-made assignments
# ---------------------------------------------------------------------------------------------------------------------


def test_merge_stats_on_hand_made_assignments():
    # 4×4 grid. Sample 0: rows 0 and 1 are one group each (row-confined, size 4), the 2×2 blocks of rows 2-3 are
    # two groups (size 4, two rows). Sample 1: one group of the first 12 positions (3 rows), four singletons.
    a0 = torch.tensor([0] * 4 + [1] * 4 + [2, 2, 3, 3] * 2)
    a1 = torch.tensor([0] * 12 + [1, 2, 3, 4])
    assignment = torch.stack([a0, a1])
    assert row_confined(assignment=assignment, grid=(4, 4)).tolist() == [
        [True, True, False, False, False],  # group 4 of sample 0 is empty: not confined, ignored below
        [False, True, True, True, True],
    ]
    assert size_histogram(assignment=assignment).tolist() == [0, 4, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 1]
    stats = merge_stats(assignment=assignment, grid=(4, 4))
    assert stats.max_size == 12
    assert stats.mean_size == pytest.approx(32 / 9)
    assert stats.row_share == pytest.approx(6 / 9)  # 2 of 4 groups in sample 0, the 4 singletons of sample 1
    assert stats.row_share_multi == pytest.approx(2 / 5)
    assert math.isnan(stats.size_variance_corr) and math.isnan(stats.image_corr)


def test_group_pixel_variance_and_correlations_exact():
    # 2×2 grid of 2×2-pixel cells, one channel. Sample 0: cells 0,1 constant 0 (merged, uniform), cells 2, 3 hold
    # a checkerboard of ±1 each (single groups, variance 1). Sample 1: one group of everything.
    img = torch.zeros(2, 1, 4, 4)
    img[0, 0, 2:, :] = torch.tensor([[1.0, -1, 1, -1], [-1, 1, -1, 1]])
    img[1, 0] = torch.arange(16.0).view(4, 4)
    assignment = torch.tensor([[0, 0, 1, 2], [0, 0, 0, 0]])
    var = group_pixel_variance(assignment=assignment, images=img, grid=(2, 2))
    expected_all = torch.arange(16.0, dtype=torch.float64).var(unbiased=False)
    assert var[0].tolist() == [0.0, 1.0, 1.0]
    assert var[1, 0].item() == pytest.approx(float(expected_all))
    stats = merge_stats(assignment=assignment, grid=(2, 2), images=img)
    sizes = torch.tensor([2.0, 1, 1, 4])
    variances = torch.tensor([0.0, 1, 1, float(expected_all)], dtype=torch.float64)
    assert stats.size_variance_corr == pytest.approx(pearson(sizes, variances))
    # per image: (variance 0.5, largest group 2) and (variance 21.25, largest group 4): two points, r = 1
    assert stats.image_corr == pytest.approx(1.0)
    dx, dy = sizes - sizes.mean(), variances - variances.mean()
    assert pearson(sizes, variances) == pytest.approx(float((dx * dy).sum() / (dx.norm() * dy.norm())))


def test_merge_stats_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"L=5 positions but the grid is 2×2"):
        merge_stats(assignment=torch.zeros(1, 5, dtype=torch.int64), grid=(2, 2))
    with pytest.raises(ValueError, match=r"square cells of a 2×2 grid"):
        group_pixel_variance(
            assignment=torch.zeros(1, 4, dtype=torch.int64), images=torch.zeros(1, 3, 5, 4), grid=(2, 2)
        )
