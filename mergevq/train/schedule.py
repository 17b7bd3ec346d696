"""Learning-rate schedule: linear warm-up, then constant, cosine or step decay.

The schedule is a pure function of the optimizer step, so it has no state to checkpoint: a resumed run recomputes
the same learning rate from the step it restarts at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

__all__ = ["ScheduleConfig", "apply_lr", "lr_factor"]


@dataclass
class ScheduleConfig:
    kind: Literal["constant", "cosine", "step"] = "constant"
    warmup_steps: int = 0  # linear ramp over the first steps (the authors' code has none)
    milestones: list[int] = field(default_factory=list)  # "step": multiply by gamma at each of these steps
    gamma: float = 0.1  # "step": decay factor (authors: ×0.1 per listed epoch)
    min_lr_ratio: float = 0.0  # "cosine": floor as a fraction of the base LR

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "cosine", "step"):
            raise ValueError(f"schedule.kind must be 'constant', 'cosine' or 'step', got {self.kind!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"schedule.milestones must be increasing, got {self.milestones}")


def lr_factor(step: int, *, config: ScheduleConfig, max_steps: int) -> float:
    """Multiplier of the base LR for the optimizer step with 0-based index ``step``."""
    warm = 1.0
    if step < config.warmup_steps:
        warm = (step + 1) / config.warmup_steps
    if config.kind == "constant":
        return warm
    if config.kind == "step":
        drops = sum(1 for m in config.milestones if step >= m)
        return warm * config.gamma**drops
    # cosine from the end of warm-up to max_steps, held at the floor afterwards
    if step < config.warmup_steps:
        return warm
    span = max(1, max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr_ratio
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr(optimizer: torch.optim.Optimizer, *, base_lr: float, factor: float) -> float:
    """Set every parameter group's LR to ``base_lr * factor``; returns the LR."""
    lr = base_lr * factor
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
