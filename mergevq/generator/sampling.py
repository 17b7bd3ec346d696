"""Sampling from logits: temperature, top-k, top-p (nucleus), classifier-free guidance and its schedules.

Order per bit group: guidance ``u + (c − u)·w`` on raw logits, then ``/ temperature``, top-k, top-p, softmax and one
multinomial draw from the caller's ``torch.Generator``.

Einstein legend:
    N   rows (samples)
    V   classes of one bit group
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["CFG_SCHEDULES", "cfg_weight", "filter_logits", "guided", "per_group", "sample_logits"]

CFG_SCHEDULES = ("constant", "linear")


def per_group(value: float | Sequence[float], *, groups: int, name: str) -> tuple[float, ...]:
    """A scalar setting for every bit group, or one value per group."""
    if isinstance(value, (int, float)):
        return (value,) * groups
    values = tuple(value)
    if len(values) != groups:
        raise ValueError(f"{name} has {len(values)} values for {groups} bit groups: {list(values)}")
    return values


def filter_logits(logits_NV: Tensor, *, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k and outside the nucleus of mass ``top_p`` to −inf (0 / 1.0: off).

    The nucleus is the smallest set of most likely classes whose probability reaches ``top_p``; the most likely class
    is always kept.
    """
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    if 0 < top_k < logits_NV.shape[-1]:
        kth_N1 = logits_NV.topk(top_k, dim=-1).values[:, -1:]
        logits_NV = logits_NV.masked_fill(logits_NV < kth_N1, -float("inf"))
    if top_p < 1.0:
        sorted_NV, order_NV = logits_NV.sort(dim=-1, descending=True)
        probs_NV = sorted_NV.softmax(-1)
        # Mass of the classes strictly before each one: drop a class once that already reaches top_p.
        before_NV = probs_NV.cumsum(-1) - probs_NV
        drop_NV = before_NV >= top_p
        drop_NV[:, 0] = False
        logits_NV = logits_NV.masked_fill(drop_NV.scatter(1, order_NV, drop_NV), -float("inf"))
    return logits_NV


def sample_logits(
    logits_NV: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One class per row, ``[N]`` int64."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    logits_NV = filter_logits(logits_NV.float() / temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(logits_NV.softmax(-1), 1, generator=generator).squeeze(1)


def guided(logits_2NV: Tensor, *, weight: float) -> Tensor:
    """Classifier-free guidance on a doubled batch (conditional rows first): ``u + (c − u)·weight``, ``[N, V]``."""
    cond_NV, uncond_NV = logits_2NV.chunk(2, dim=0)
    return uncond_NV + (cond_NV - uncond_NV) * weight


def cfg_weight(scale: float, *, schedule: str, step: int, total: int) -> float:
    """Guidance weight for token ``step`` of ``total`` (0-based).

    ``constant``: ``scale`` throughout. ``linear``: ramps from 1 (no guidance) at the first token to ``scale`` at the
    last, ``1 + (scale − 1)·step/(total − 1)``, as in RandAR's linear schedule.
    """
    if schedule == "constant":
        return scale
    if schedule == "linear":
        return 1.0 + (scale - 1.0) * (step / (total - 1) if total > 1 else 1.0)
    raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {schedule!r}")
