"""Exponential moving average of the generator's weights, updated once per optimizer step.

The authors' ``LitEma`` updates per micro-batch (effective decay ≈ 0.998 with two accumulation steps) and also
averages the discriminator (SPEC §2.10). Here the EMA follows optimizer steps, so ``decay`` means the same thing at
any accumulation, and it covers the tokenizer only: the discriminator is never used for validation or export.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """``ema ← decay·ema + (1 − decay)·param`` for floating-point parameters; buffers are copied.

    ``module`` is a frozen deep copy in eval mode: use it for validation and export.
    """

    def __init__(self, model: nn.Module, *, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.decay
        ema_params = dict(self.module.named_parameters())
        for name, param in model.named_parameters():
            target = ema_params[name]
            if target.dtype.is_floating_point:
                target.lerp_(param.detach().to(target.dtype), weight)
            else:
                target.copy_(param)
        ema_buffers = dict(self.module.named_buffers())
        for name, buffer in model.named_buffers():
            if name in ema_buffers:
                ema_buffers[name].copy_(buffer)

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Reset the average to the current weights."""
        self.module.load_state_dict(model.state_dict())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
