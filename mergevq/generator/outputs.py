"""What a generator returns: the training output and the generation output with its statistics.

Shapes: B batch, L = h·w raster positions, K merged tokens, V_g classes of bit group g.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

__all__ = ["GenerationOutput", "GenerationStats", "GeneratorOutput", "generation_stats"]


class GeneratorOutput(NamedTuple):
    loss: Tensor  # scalar: sum over bit groups of the mean cross-entropy over the supervised positions
    losses: dict[str, Tensor]  # ce_g0, ce_g1, ... and accuracy (all groups right; detached)
    # [B, N, V_g] per group when requested: N = L raster positions (ar, mergear, maskgit: teacher-forced at every
    # position, supervised or not) or N = K merged tokens in rank order (randar)
    logits: list[Tensor] | None = None


class GenerationStats(NamedTuple):
    seconds: float
    tokens_per_s: float  # generated tokens per second: B·L (ar, mergear, maskgit) or B·K (randar)
    images_per_s: float
    forward_passes: int  # transformer forwards (a prefill counts as one)
    peak_cache_bytes: int  # largest K/V storage allocated at any time, all layers (0 without a cache)
    distinct_groups: Tensor  # [B] distinct code values per grid (randar: K, its tokens are the groups)


class GenerationOutput(NamedTuple):
    # ar, mergear, maskgit: [B, L] codes of the raster grid; randar: [B, K] codes of the merged tokens in rank order
    # (raster order of their first position, as the tokenizer emits them)
    indices: Tensor
    # [B, L] identity for the grid kinds: decode(indices, assignment) decodes the grid. None (randar): the merge map is
    # unknown and MergeVQ.decode(indices) predicts it with its Source Recovery model
    assignment: Tensor | None
    stats: GenerationStats


def generation_stats(
    *, seconds: float, batch: int, tokens: int, forward_passes: int, peak_cache_bytes: int, distinct_groups: Tensor
) -> GenerationStats:
    """Statistics of a run that generated ``tokens`` per image for ``batch`` images in ``seconds``."""
    return GenerationStats(
        seconds=seconds,
        tokens_per_s=batch * tokens / max(seconds, 1e-9),
        images_per_s=batch / max(seconds, 1e-9),
        forward_passes=forward_passes,
        peak_cache_bytes=peak_cache_bytes,
        distinct_groups=distinct_groups,
    )
