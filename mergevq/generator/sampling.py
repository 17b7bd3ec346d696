"""Sampling from logits: temperature, top-k, top-p (nucleus), classifier-free guidance and its schedules.

Order per bit group: guidance ``u + (c − u)·w`` on raw logits, then ``/ temperature``, top-k, top-p, softmax and one
multinomial draw from the caller's ``torch.Generator``. :class:`Sampler` bundles these settings for the decoding loops
of every generator kind.

Einstein legend:
    N   rows (samples)
    V   classes of one bit group
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CFG_SCHEDULES", "Sampler", "cfg_weight", "filter_logits", "guided", "per_group", "sample_logits"]

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


def cfg_weight(scale: float, *, schedule: str, step: int, total: int, start: float = 1.0) -> float:
    """Guidance weight for token ``step`` of ``total`` (0-based) of a raster decoder.

    ``constant``: ``scale`` throughout. ``linear``: ramps from ``start`` (default 1, no guidance) at the first token to
    ``scale`` at the last, ``start + (scale − start)·step/(total − 1)``.
    """
    return _weight(scale, start=start, schedule=schedule, fraction=step / (total - 1) if total > 1 else 1.0)


def _weight(scale: float, *, start: float, schedule: str, fraction: float) -> float:
    if schedule == "constant":
        return scale
    if schedule == "linear":
        return start + (scale - start) * fraction
    raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {schedule!r}")


@dataclass(frozen=True)
class Sampler:
    """Per-group sampling settings and classifier-free guidance, shared by every decoding loop.

    ``cfg_scale`` w1 and ``cfg_start`` w0: under ``linear`` the weight is ``w0 + (w1 − w0)·f`` with ``f`` the
    fraction of the image already decoded (a raster decoder uses ``t/(L − 1)``, RandAR and MaskGIT ``k/N``, k tokens
    known before the step); ``constant`` uses w1 throughout. Guidance runs (on a doubled batch) unless the weight is
    1 at every step.
    """

    temperature: tuple[float, ...]
    top_k: tuple[int, ...]
    top_p: tuple[float, ...]
    cfg_scale: float = 1.0
    cfg_start: float = 1.0
    cfg_schedule: str = "constant"
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {self.cfg_schedule!r}")
        if any(t <= 0 for t in self.temperature):
            raise ValueError(f"temperature must be positive, got {self.temperature}")

    @classmethod
    def build(
        cls,
        *,
        groups: int,
        temperature: float | Sequence[float] = 1.0,
        top_k: int | Sequence[int] = 0,
        top_p: float | Sequence[float] = 1.0,
        **guidance: object,
    ) -> Sampler:
        """Scalars or one value per bit group; ``guidance``: ``cfg_scale``, ``cfg_start``, ``cfg_schedule``,
        ``generator``."""
        return cls(
            per_group(temperature, groups=groups, name="temperature"),
            per_group(top_k, groups=groups, name="top_k"),
            per_group(top_p, groups=groups, name="top_p"),
            **guidance,  # type: ignore[arg-type]
        )

    @property
    def guide(self) -> bool:
        """Whether the batch must be doubled with null-class rows."""
        if self.cfg_schedule == "linear":
            return self.cfg_scale != 1.0 or self.cfg_start != 1.0
        return self.cfg_scale != 1.0

    def weight(self, fraction: float) -> float:
        """The guidance weight when ``fraction`` of the image is decoded."""
        return _weight(self.cfg_scale, start=self.cfg_start, schedule=self.cfg_schedule, fraction=fraction)

    def choose(self, weight: float, *, log_probs: list[Tensor] | None = None) -> Callable[[int, Tensor], Tensor]:
        """A ``choose(g, logits)`` for :meth:`mergevq.generator.heads.FactorizedCodes.sample`.

        Guidance (when :attr:`guide`, conditional rows first) with ``weight``, then temperature, top-k, top-p and one
        draw. With ``log_probs`` the log-probability of each draw under the guided distribution (before temperature
        and filtering) is appended per group, ``[N]`` float32.
        """

        def choose(g: int, logits_NV: Tensor) -> Tensor:
            if self.guide:
                logits_NV = guided(logits_NV, weight=weight)
            part_N = sample_logits(
                logits_NV,
                temperature=self.temperature[g],
                top_k=self.top_k[g],
                top_p=self.top_p[g],
                generator=self.generator,
            )
            if log_probs is not None:
                log_probs.append(logits_NV.float().log_softmax(-1).gather(1, part_N[:, None]).squeeze(1))
            return part_N

        return choose
