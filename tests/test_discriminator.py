"""PatchGAN discriminator, GAN losses, LeCAM and the adaptive weight."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mergevq.losses.discriminator import (
    LeCAM,
    PatchGANDiscriminator,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_g_loss,
)


def test_default_param_count_matches_spec() -> None:
    disc = PatchGANDiscriminator()
    n = sum(p.numel() for p in disc.parameters())
    # 3·64·16+64 + 64·128·16+2·128 + 128·256·16+2·256 + 256·512·16+2·512 + 512·16+1
    assert n == 2_765_633
    assert round(n / 1e6, 2) == 2.77


def test_layout_norms_biases_and_strides() -> None:
    disc = PatchGANDiscriminator(num_layers=3)
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert [c.kernel_size for c in convs] == [(4, 4)] * 5
    assert convs[0].bias is not None and convs[-1].bias is not None and convs[-1].out_channels == 1
    assert all(c.bias is None for c in convs[1:-1])
    assert sum(isinstance(m, nn.BatchNorm2d) for m in disc.modules()) == 3
    assert all(m.negative_slope == 0.2 for m in disc.modules() if isinstance(m, nn.LeakyReLU))


def test_init_statistics() -> None:
    torch.manual_seed(0)
    disc = PatchGANDiscriminator()
    big = [m for m in disc.modules() if isinstance(m, nn.Conv2d)][3]  # 256→512, 2M weights
    assert abs(big.weight.mean().item()) < 1e-3
    assert abs(big.weight.std().item() - 0.02) < 5e-4
    bn = [m for m in disc.modules() if isinstance(m, nn.BatchNorm2d)][-1]
    assert abs(bn.weight.mean().item() - 1.0) < 0.01 and abs(bn.weight.std().item() - 0.02) < 0.005
    assert torch.all(bn.bias == 0)


@pytest.mark.parametrize(("size", "out"), [(32, 2), (256, 30)])
def test_output_shape(size: int, out: int) -> None:
    disc = PatchGANDiscriminator()
    logits = disc(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 1, out, out)


def test_fewer_layers_and_channels() -> None:
    disc = PatchGANDiscriminator(in_channels=1, base_channels=8, num_layers=2)
    assert disc(torch.randn(1, 1, 32, 32)).shape == (1, 1, 6, 6)
    with pytest.raises(ValueError):
        PatchGANDiscriminator(num_layers=0)


def test_hinge_d_loss_hand_values() -> None:
    real = torch.tensor([[2.0, 0.5], [-1.0, 1.0]])  # relu(1 − r) = 0, 0.5, 2, 0  → mean 0.625
    fake = torch.tensor([[-2.0, 0.0], [0.5, -0.5]])  # relu(1 + f) = 0, 1, 1.5, 0.5 → mean 0.75
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.625 + 0.75))
    # A perfectly confident discriminator pays nothing.
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0


def test_generator_losses_hand_values() -> None:
    fake = torch.tensor([[[[0.0, 2.0], [-2.0, 4.0]]]])  # [1,1,2,2], mean 1
    sp = [math.log1p(math.exp(-v)) for v in (0.0, 2.0, -2.0, 4.0)]
    assert non_saturating_g_loss(fake).item() == pytest.approx(sum(sp) / 4, rel=1e-6)
    assert non_saturating_g_loss(fake, patch_mean_first=True).item() == pytest.approx(math.log1p(math.exp(-1.0)))
    assert hinge_g_loss(fake).item() == pytest.approx(-1.0)
    # Softplus is convex: per-patch is never below patch-mean-first.
    assert non_saturating_g_loss(fake) > non_saturating_g_loss(fake, patch_mean_first=True)


def test_lecam_value_and_ema_update_in_train_only() -> None:
    lecam = LeCAM(decay=0.9)
    real = torch.tensor([1.0, 3.0])  # mean 2
    fake = torch.tensor([-1.0, -5.0])  # mean −3
    lecam.train()
    reg = lecam(real, fake)
    # EMAs fold in first: 0.9·0 + 0.1·2 = 0.2 and 0.1·(−3) = −0.3.
    assert lecam.ema_real.item() == pytest.approx(0.2)
    assert lecam.ema_fake.item() == pytest.approx(-0.3)
    expected = ((1.3**2 + 3.3**2) / 2) + ((1.2**2 + 5.2**2) / 2)
    assert reg.item() == pytest.approx(expected, rel=1e-6)
    lecam(real, fake)
    assert lecam.ema_real.item() == pytest.approx(0.9 * 0.2 + 0.2)
    lecam.eval()
    before = (lecam.ema_real.clone(), lecam.ema_fake.clone())
    lecam(real * 10, fake * 10)
    assert torch.equal(lecam.ema_real, before[0]) and torch.equal(lecam.ema_fake, before[1])


def test_lecam_state_dict_and_gradients() -> None:
    lecam = LeCAM()
    assert set(lecam.state_dict()) == {"ema_real", "ema_fake"}
    assert lecam.decay == 0.999
    real = torch.tensor([0.5, 2.0], requires_grad=True)
    fake = torch.tensor([-0.5, 1.0], requires_grad=True)
    lecam(real, fake).backward()
    assert real.grad is not None and fake.grad is not None and real.grad.abs().sum() > 0
    fresh = LeCAM()
    fresh.load_state_dict(lecam.state_dict())
    assert torch.equal(fresh.ema_real, lecam.ema_real)


def test_adaptive_weight_against_hand_computation() -> None:
    w = torch.tensor([1.0, 2.0], requires_grad=True)  # plays the decoder's last layer
    nll = (3.0 * w).sum()  # ∇ = (3, 3), norm 3√2
    g = (w**2).sum()  # ∇ = 2w = (2, 4), norm √20
    lam = adaptive_weight(nll, g, last_layer=w)
    assert lam.item() == pytest.approx(3 * math.sqrt(2) / (math.sqrt(20) + 1e-4), rel=1e-6)
    assert not lam.requires_grad
    # Graphs are kept for the caller's backward, and the clamp applies.
    (nll + lam * g).backward()
    assert w.grad is not None
    w2 = torch.tensor([1.0], requires_grad=True)
    assert adaptive_weight(1e9 * w2.sum(), 1e-9 * w2.sum(), last_layer=w2, max_weight=10.0).item() == 10.0
