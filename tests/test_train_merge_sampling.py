"""Merge-count sampling: distribution shapes, the authors' candidate lists, determinism across ranks and restarts."""

from __future__ import annotations

import numpy as np
import pytest

from mergevq.train.merge_sampling import MergeCountSampler, MergeSamplingConfig


def make(config: MergeSamplingConfig, *, length: int = 256, k0: int = 144, seed: int = 0) -> MergeCountSampler:
    return MergeCountSampler(config=config, num_tokens_full=length, default_num_tokens=k0, seed=seed)


def empirical(sampler: MergeCountSampler, n: int) -> np.ndarray:
    draws = [sampler.sample(step=s) for s in range(n)]
    return np.array([draws.count(k) for k in sampler.candidates]) / n


def test_exponential_matches_paper_formula_and_frequencies():
    # Paper (A.3): P(T=t) = (1 − e^{−λ}) e^{−λt}; R: K = (6 + T)².
    cfg = MergeSamplingConfig(distribution="exponential", root=6, direction=1, t_min=0, t_max=4, lam=0.7)
    sampler = make(cfg)
    assert sampler.candidates == (36, 49, 64, 81, 100)
    # Truncated to T in [0, 4] the normaliser (1 − e^{−λ}) cancels: e^{−0.7t} / Σ e^{−0.7t}, evaluated by hand.
    expected = np.array([0.51909, 0.25777, 0.12801, 0.06357, 0.03157])
    assert np.allclose(sampler.probabilities, expected, atol=1e-5)
    freq = empirical(sampler, 20000)
    # 4σ of a binomial proportion at n = 20000 is below 0.015 for every bucket
    assert np.abs(freq - expected).max() < 0.015, (freq, expected)
    assert list(np.argsort(-freq)) == [0, 1, 2, 3, 4]  # monotone decay, as an exponential should


def test_g_variant_shrinks_with_t():
    cfg = MergeSamplingConfig(distribution="exponential", root=16, direction=-1, t_min=0, t_max=4)
    assert make(cfg, length=1024, k0=256).candidates == (256, 225, 196, 169, 144)


def test_discrete_gaussian_shape_and_frequencies():
    cfg = MergeSamplingConfig(distribution="gaussian", root=12, t_min=-1, t_max=3, mu=0.5, sigma=0.8)
    sampler = make(cfg)
    assert sampler.candidates == (121, 144, 169, 196, 225)
    # exp(−(t − 0.5)² / 1.28) for t = −1..3 is 0.17242, 0.82258, 0.82258, 0.17242, 0.00758; normalised by hand:
    expected = np.array([0.08632, 0.41179, 0.41179, 0.08632, 0.00379])
    assert np.allclose(sampler.probabilities, expected, atol=1e-5)
    freq = empirical(sampler, 20000)
    assert np.abs(freq - expected).max() < 0.015, (freq, expected)
    # symmetric around μ = 0.5: T=0 and T=1 equally likely
    assert sampler.probabilities[1] == pytest.approx(sampler.probabilities[2])


@pytest.mark.parametrize(
    ("distribution", "n", "k0", "candidates", "probs"),
    [
        # SPEC §2.4 verified tables
        ("authors_gaussian", 6, 144, (121, 144, 169, 196, 225, 256), (0.118, 0.668, 0.118, 0.032, 0.032, 0.032)),
        ("authors_gaussian", 6, 64, (49, 64, 81, 100, 121, 144), (0.118, 0.668, 0.118, 0.032, 0.032, 0.032)),
        (
            "authors_gaussian",
            9,
            256,
            (225, 256, 289, 324, 361, 400, 441, 484, 529),
            (0.108, 0.610, 0.108) + (0.029,) * 6,
        ),
    ],
)
def test_authors_candidate_lists(distribution, n, k0, candidates, probs):
    sampler = make(MergeSamplingConfig(distribution=distribution, num_candidates=n), length=1024, k0=k0)
    assert sampler.candidates == candidates
    assert np.allclose(sampler.probabilities, probs, atol=0.0015)


def test_authors_exponential_weights():
    sampler = make(MergeSamplingConfig(distribution="authors_exponential", num_candidates=4), length=1024, k0=144)
    assert sampler.candidates == (144, 169, 196, 225)
    # The authors' weights 2e^{-2i} + 0.1 are 2.1, 0.3707, 0.1366, 0.1050 (sum 2.7123); normalised, by hand:
    expected = np.array([0.7743, 0.1367, 0.0504, 0.0387])
    assert np.allclose(sampler.probabilities, expected, atol=1e-4)
    freq = empirical(sampler, 20000)
    assert np.abs(freq - expected).max() < 0.015, (freq, expected)


def test_same_k_on_every_rank_and_reproducible_after_resume():
    cfg = MergeSamplingConfig(distribution="gaussian", root=6, t_min=-2, t_max=2)
    # Two "ranks" build their own sampler from the same config and seed.
    rank0 = make(cfg, length=64, k0=36, seed=7)
    rank1 = make(cfg, length=64, k0=36, seed=7)
    seq0 = [rank0.sample(step=s) for s in range(300)]
    assert seq0 == [rank1.sample(step=s) for s in range(300)]
    # A resumed run starts at step 150 in a fresh process: the tail is the same.
    resumed = make(cfg, length=64, k0=36, seed=7)
    assert [resumed.sample(step=s) for s in range(150, 300)] == seq0[150:]
    # Not the authors' fixed cycle of 100, and different seeds give different sequences.
    assert seq0[:100] != seq0[100:200]
    other = make(cfg, length=64, k0=36, seed=8)
    assert [other.sample(step=s) for s in range(300)] != seq0
    assert len(set(seq0)) == 5


def test_any_k_in_range_allowed_including_non_squares():
    assert make(MergeSamplingConfig(distribution="fixed", fixed=1), length=64).sample(step=3) == 1
    assert make(MergeSamplingConfig(distribution="fixed", fixed=64), length=64).sample(step=3) == 64
    cfg = MergeSamplingConfig(distribution="uniform", candidates=[7, 13, 50])
    sampler = make(cfg, length=64)
    assert set(sampler.sample(step=s) for s in range(200)) == {7, 13, 50}
    # "fixed" without a value: the model's default K
    assert make(MergeSamplingConfig(distribution="fixed"), length=64, k0=36).sample(step=0) == 36


@pytest.mark.parametrize(
    "cfg",
    [
        MergeSamplingConfig(distribution="gaussian", root=6, t_min=-1, t_max=3),  # 81 > 64
        MergeSamplingConfig(distribution="exponential", root=2, direction=-1, t_min=0, t_max=3),  # reaches 0
        MergeSamplingConfig(distribution="uniform", candidates=[16, 65]),
        MergeSamplingConfig(distribution="fixed", fixed=0),
    ],
)
def test_candidates_outside_range_are_rejected(cfg):
    with pytest.raises(ValueError, match=r"outside \[1, L=64\]"):
        make(cfg, length=64, k0=36)


def test_invalid_parameters():
    with pytest.raises(ValueError, match="direction"):
        MergeSamplingConfig(direction=0)
    with pytest.raises(ValueError, match="distribution"):
        MergeSamplingConfig(distribution="poisson")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sigma"):
        make(MergeSamplingConfig(distribution="gaussian", sigma=0.0), length=256)
    with pytest.raises(ValueError, match="t_max"):
        make(MergeSamplingConfig(distribution="uniform", t_min=2, t_max=1), length=256)


def test_progressive_merging_keeps_all_tokens_then_ramps_in_the_distribution():
    base = MergeSamplingConfig(distribution="gaussian", root=12, t_min=-1, t_max=3)
    cfg = MergeSamplingConfig(distribution="gaussian", root=12, t_min=-1, t_max=3, full_steps=100, ramp_steps=1000)
    plain, progressive = make(base), make(cfg)
    assert all(progressive.sample(step=s) == 256 for s in range(100))  # K = L during the warm-up
    assert progressive.merge_probability(step=99) == 0.0
    assert progressive.merge_probability(step=600) == pytest.approx(501 / 1001)
    assert progressive.merge_probability(step=1100) == 1.0
    # in the middle of the ramp about half the steps merge, and a merging step draws what the plain sampler draws
    mid = range(550, 650)
    merged = [s for s in mid if progressive.sample(step=s) != 256]
    assert 30 < len(merged) < 70, len(merged)
    assert all(progressive.sample(step=s) == plain.sample(step=s) for s in merged)
    # after the ramp it is the plain distribution, step for step (the existing random stream is unchanged)
    assert [progressive.sample(step=s) for s in range(1100, 1400)] == [plain.sample(step=s) for s in range(1100, 1400)]
    with pytest.raises(ValueError, match="merge.full_steps"):
        MergeSamplingConfig(full_steps=-1)
