"""Learning-rate schedule values and EMA arithmetic."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mergevq.train.ema import EMA
from mergevq.train.schedule import ScheduleConfig, apply_lr, lr_factor


def test_constant_with_warmup():
    cfg = ScheduleConfig(kind="constant", warmup_steps=4)
    assert [lr_factor(s, config=cfg, max_steps=10) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_values():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=2, min_lr_ratio=0.1)
    f = [lr_factor(s, config=cfg, max_steps=12) for s in range(14)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)
    assert f[2] == pytest.approx(1.0)  # start of the cosine
    assert f[7] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half way
    assert f[12] == pytest.approx(0.1) and f[13] == pytest.approx(0.1)  # held at the floor
    assert all(a >= b for a, b in zip(f[2:], f[3:]))


def test_step_decay():
    cfg = ScheduleConfig(kind="step", milestones=[3, 6], gamma=0.1)
    f = [lr_factor(s, config=cfg, max_steps=10) for s in range(8)]
    assert f == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01])


def test_schedule_validation_and_apply_lr():
    with pytest.raises(ValueError, match="milestones"):
        ScheduleConfig(kind="step", milestones=[5, 2])
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(2))], lr=1.0)
    assert apply_lr(opt, base_lr=2e-4, factor=0.5) == pytest.approx(1e-4)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_ema_arithmetic_and_buffers():
    model = nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.9)
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert not ema.module.training
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.running_mean.fill_(5.0)
        model.num_batches_tracked.fill_(7)
    ema.update(model)
    assert torch.allclose(ema.module.weight, torch.full((3,), 0.9 * 1.0 + 0.1 * 3.0))
    ema.update(model)
    assert torch.allclose(ema.module.weight, torch.full((3,), 0.9 * 1.2 + 0.1 * 3.0))
    # buffers (statistics, counters) are copied, not averaged
    assert torch.equal(ema.module.running_mean, torch.full((3,), 5.0))
    assert int(ema.module.num_batches_tracked) == 7
    # the EMA does not alias the live weights
    with torch.no_grad():
        model.weight.fill_(-1.0)
    assert torch.allclose(ema.module.weight, torch.full((3,), 1.38))


def test_ema_decay_zero_copies_and_state_round_trip():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.0)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.equal(ema.module.weight, model.weight)
    other = EMA(nn.Linear(2, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.module.weight, model.weight)
    with pytest.raises(ValueError):
        EMA(model, decay=1.0)
