"""How many tokens K the encoder keeps at each training step (SPEC §2.4).

The paper samples an integer ``T`` and maps it to a square token count:

- G and R: exponential, ``P(T=t) ∝ e^{-λt}`` (the truncated form of ``(1 - e^{-λ}) e^{-λt}``), ``K = (√K0 ∓ T)²``;
- G+R: discrete Gaussian, ``P(T=t) ∝ exp(-(t - μ)² / 2σ²)``, ``K = (12 + T)²``.

Here ``K(T) = (root + direction·T)²`` for ``T`` in ``[t_min, t_max]``; λ, μ, σ (not given by the paper) are
configurable. An explicit ``candidates`` list replaces the square formula (``T`` then indexes the list). The authors'
construction ``[(√K0 + i)² for i in range(-bias, n - bias)]`` with their fixed weights is available as
``authors_gaussian`` / ``authors_exponential``.

Unlike the authors' code, which walks a CDF with ``(batch_idx % 100) / 100`` (a fixed cycle), K is drawn from a
generator seeded by ``(seed, step)``: every DDP rank draws the same K at a step without communication, and a resumed
run reproduces the sequence exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["DISTRIBUTIONS", "MergeCountSampler", "MergeSamplingConfig"]

DISTRIBUTIONS = ("exponential", "gaussian", "uniform", "fixed", "authors_gaussian", "authors_exponential")
_STREAM = 0x4B  # separates this random stream from others keyed on (seed, step)


@dataclass
class MergeSamplingConfig:
    """Distribution of the kept-token count K per training step."""

    distribution: Literal["exponential", "gaussian", "uniform", "fixed", "authors_gaussian", "authors_exponential"] = (
        "gaussian"
    )
    root: int | None = None  # √K0 of the square formula; None: √(model default K), rounded
    direction: int = 1  # +1: K grows with T (R, G+R); -1: K shrinks with T (G, K = (16 - T)²)
    t_min: int = 0
    t_max: int = 4
    lam: float = 1.0  # exponential rate λ
    mu: float = 0.0  # discrete-Gaussian mean (in T units)
    sigma: float = 1.0  # discrete-Gaussian standard deviation (in T units)
    candidates: list[int] | None = None  # explicit K values; T indexes them (t_min/t_max/root ignored)
    num_candidates: int = 6  # authors_* only: length n of the candidate list
    fixed: int | None = None  # "fixed" only: K every step; None: the model's default K
    # Progressive merging (an extension of ours, not in the paper): K = L (no merging) for the first full_steps
    # optimizer steps, then over ramp_steps the chance of drawing K from the distribution grows linearly from 0 to 1.
    # Small models learn to reconstruct much faster at K = L; merging is learned on top of that.
    full_steps: int = 0
    ramp_steps: int = 0

    def __post_init__(self) -> None:
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"merge.distribution {self.distribution!r} is not one of {DISTRIBUTIONS}")
        if self.direction not in (-1, 1):
            raise ValueError(f"merge.direction must be +1 or -1, got {self.direction}")
        for key in ("full_steps", "ramp_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"merge.{key} must be >= 0, got {getattr(self, key)}")


class MergeCountSampler:
    """Draws K for a training step from a fixed discrete distribution over candidate counts.

    ``candidates[i]`` has probability ``probabilities[i]``; ``sample(step=s)`` is a pure function of (seed, s).
    """

    def __init__(
        self, *, config: MergeSamplingConfig, num_tokens_full: int, default_num_tokens: int, seed: int
    ) -> None:
        if num_tokens_full < 1:
            raise ValueError(f"num_tokens_full must be >= 1, got {num_tokens_full}")
        self.config = config
        self.num_tokens_full = num_tokens_full
        self.seed = int(seed)
        candidates, weights, describe = _build(config, default_num_tokens=default_num_tokens)
        for k in candidates:
            if not 1 <= k <= num_tokens_full:
                raise ValueError(
                    f"merge sampling candidate K={k} is outside [1, L={num_tokens_full}] ({describe}); "
                    "choose root/direction/t_min/t_max or candidates that stay inside"
                )
        weights_arr = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(weights_arr)) or weights_arr.sum() <= 0 or np.any(weights_arr < 0):
            raise ValueError(f"merge sampling weights are not a valid distribution ({describe}): {weights}")
        probs = weights_arr / weights_arr.sum()
        self.candidates: tuple[int, ...] = tuple(int(k) for k in candidates)
        self.probabilities: tuple[float, ...] = tuple(float(p) for p in probs)
        self._cdf = np.cumsum(probs)
        self._cdf[-1] = 1.0  # guard against rounding leaving the last bucket unreachable
        self.description = describe

    def sample(self, *, step: int) -> int:
        """K for optimizer step ``step`` (0-based); identical on every rank and across restarts."""
        rng = np.random.default_rng([self.seed, int(step), _STREAM])
        u = rng.random()
        if rng.random() >= self.merge_probability(step=step):
            return self.num_tokens_full
        if len(self.candidates) == 1:
            return self.candidates[0]
        return self.candidates[int(np.searchsorted(self._cdf, u, side="right"))]

    def merge_probability(self, *, step: int) -> float:
        """Chance that step ``step`` draws K from the distribution rather than keeping all L tokens (progressive)."""
        full, ramp = self.config.full_steps, self.config.ramp_steps
        if step < full:
            return 0.0
        if step >= full + ramp:
            return 1.0
        return (step - full + 1) / (ramp + 1)

    def expected_tokens(self) -> float:
        return float(sum(k * p for k, p in zip(self.candidates, self.probabilities)))

    def __repr__(self) -> str:
        pairs = ", ".join(f"{k}:{p:.3f}" for k, p in zip(self.candidates, self.probabilities))
        progressive = ""
        if self.config.full_steps or self.config.ramp_steps:
            full, ramp = self.config.full_steps, self.config.ramp_steps
            progressive = f"; K=L={self.num_tokens_full} for {full} steps, ramp {ramp}"
        return f"MergeCountSampler({self.description}; {pairs}{progressive})"


def _build(config: MergeSamplingConfig, *, default_num_tokens: int) -> tuple[list[int], list[float], str]:
    dist = config.distribution
    if dist == "fixed":
        k = config.fixed if config.fixed is not None else default_num_tokens
        return [int(k)], [1.0], f"fixed K={k}"

    if dist.startswith("authors_"):
        # Authors' list: [(√K0 + i)² for i in range(-bias, n - bias)], bias 1 for the Gaussian; fixed weights.
        n = config.num_candidates
        if n < 1:
            raise ValueError(f"merge.num_candidates must be >= 1, got {n}")
        root0 = math.sqrt(default_num_tokens)
        bias = 1 if dist == "authors_gaussian" else 0
        candidates = [int((root0 + i) ** 2) for i in range(-bias, n - bias)]
        if dist == "authors_gaussian":
            weights = [math.exp(-((i - 1) ** 2) / (2 * 0.5**2)) + 0.05 for i in range(n)]
        else:
            weights = [2 * math.exp(-2 * i) + 0.1 for i in range(n)]
        return candidates, weights, f"{dist}, K0={default_num_tokens}, n={n}"

    if config.candidates is not None:
        if not config.candidates:
            raise ValueError("merge.candidates is an empty list")
        candidates = [int(k) for k in config.candidates]
        ts = list(range(len(candidates)))
        describe = f"{dist} over candidates {candidates}"
    else:
        if config.t_max < config.t_min:
            raise ValueError(f"merge.t_max ({config.t_max}) is below merge.t_min ({config.t_min})")
        root = config.root if config.root is not None else round(math.sqrt(default_num_tokens))
        ts = list(range(config.t_min, config.t_max + 1))
        candidates = [(root + config.direction * t) ** 2 for t in ts]
        sign = "+" if config.direction > 0 else "-"
        describe = f"{dist}, K=({root} {sign} T)², T in [{config.t_min}, {config.t_max}]"

    if dist == "exponential":
        if config.lam <= 0:
            raise ValueError(f"merge.lam must be > 0, got {config.lam}")
        t0 = ts[0]
        weights = [math.exp(-config.lam * (t - t0)) for t in ts]
    elif dist == "gaussian":
        if config.sigma <= 0:
            raise ValueError(f"merge.sigma must be > 0, got {config.sigma}")
        weights = [math.exp(-((t - config.mu) ** 2) / (2 * config.sigma**2)) for t in ts]
    else:  # uniform
        weights = [1.0] * len(ts)
    return candidates, weights, describe
