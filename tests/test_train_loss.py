"""The composite tokenizer objective: every weight applied once, GAN gating, adaptive weight, discriminator loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergevq.losses.discriminator import PatchGANDiscriminator
from mergevq.losses.tokenizer_loss import LossWeights, TokenizerLoss


class L2Perceptual(nn.Module):
    """A stand-in perceptual distance [B] with a known value."""

    def forward(self, x, y):
        return (x - y).square().flatten(1).sum(1)


def setup(seed: int = 0):
    torch.manual_seed(seed)
    last = nn.Conv2d(4, 3, 3, padding=1)
    features = torch.randn(2, 4, 8, 8)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    recon = torch.tanh(last(features))
    model_losses = {
        "entropy": torch.tensor(-2.0, requires_grad=True),
        "commitment": torch.tensor(0.3, requires_grad=True),
        "source_recovery": torch.tensor(1.5, requires_grad=True),
        "per_sample_entropy": torch.tensor(0.1),
        "source_recovery_accuracy": torch.tensor(0.25),
    }
    return last, images, recon, model_losses


WEIGHTS = LossWeights(
    reconstruction=1.5,
    perceptual=0.7,
    adversarial=0.8,
    lecam=0.01,
    entropy=0.1,
    commitment=0.25,
    source_recovery=0.5,
    alignment=2.0,
)


@pytest.mark.parametrize("recon_kind", ["l1", "l2"])
def test_generator_total_is_the_weighted_sum(recon_kind):
    last, images, recon, model_losses = setup()
    disc = PatchGANDiscriminator(base_channels=8, num_layers=1)
    loss = TokenizerLoss(weights=WEIGHTS, reconstruction=recon_kind, perceptual=L2Perceptual())
    out = loss.generator_loss(
        images=images,
        reconstruction=recon,
        model_losses=model_losses,
        step=0,
        discriminator=disc,
        last_layer=last.weight,
        alignment=torch.tensor(0.4),
    )
    diff = recon - images
    rec = diff.abs().mean() if recon_kind == "l1" else diff.square().mean()
    perc = diff.square().flatten(1).sum(1).mean()
    adv = F.softplus(-disc(recon)).mean()  # non-saturating, per patch
    expected = 1.5 * rec + 0.7 * perc + 0.8 * adv + 0.1 * -2.0 + 0.25 * 0.3 + 0.5 * 1.5 + 2.0 * 0.4
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-5)
    t = out.terms
    assert t["reconstruction"].item() == pytest.approx(rec.item(), rel=1e-6)
    assert t["w_reconstruction"].item() == pytest.approx(1.5 * rec.item(), rel=1e-6)
    assert t["w_perceptual"].item() == pytest.approx(0.7 * perc.item(), rel=1e-5)
    assert t["adversarial_weight"].item() == pytest.approx(0.8)
    assert t["w_entropy"].item() == pytest.approx(-0.2)
    assert t["w_source_recovery"].item() == pytest.approx(0.75)
    assert t["w_alignment"].item() == pytest.approx(0.8)
    # unweighted diagnostics from the model are logged too, and nothing in terms carries a graph
    assert t["source_recovery_accuracy"].item() == pytest.approx(0.25)
    assert t["total"].item() == pytest.approx(out.total.item())
    assert all(not v.requires_grad for v in t.values())


def test_gan_terms_wait_for_disc_start_and_zero_weight_terms_drop():
    last, images, recon, model_losses = setup()
    disc = PatchGANDiscriminator(base_channels=8, num_layers=1)
    w = LossWeights(perceptual=0.0, source_recovery=0.0)
    loss = TokenizerLoss(weights=w, perceptual=L2Perceptual(), disc_start=5)
    before = loss.generator_loss(
        images=images, reconstruction=recon, model_losses=model_losses, step=4, discriminator=disc
    )
    assert "adversarial" not in before.terms and "perceptual" not in before.terms
    assert "w_source_recovery" not in before.terms and "source_recovery" in before.terms
    after = loss.generator_loss(
        images=images, reconstruction=recon, model_losses=model_losses, step=5, discriminator=disc
    )
    assert "adversarial" in after.terms
    d_before = loss.discriminator_loss(discriminator=disc, images=images, reconstruction=recon, step=4)
    assert d_before.total.item() == 0.0


def test_adaptive_weight_is_the_gradient_norm_ratio():
    last, images, recon, model_losses = setup()
    disc = PatchGANDiscriminator(base_channels=8, num_layers=1)
    loss = TokenizerLoss(weights=LossWeights(perceptual=0.0, adversarial=0.8), adaptive=True)
    out = loss.generator_loss(
        images=images, reconstruction=recon, model_losses={}, step=0, discriminator=disc, last_layer=last.weight
    )
    nll = (recon - images).abs().mean()
    g = F.softplus(-disc(recon)).mean()
    g_nll = torch.autograd.grad(nll, last.weight, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g, last.weight, retain_graph=True)[0]
    ratio = g_nll.norm() / (g_adv.norm() + 1e-4)
    assert out.terms["adversarial_weight"].item() == pytest.approx(0.8 * ratio.item(), rel=1e-4)
    with pytest.raises(ValueError, match="last_layer"):
        loss.generator_loss(images=images, reconstruction=recon, model_losses={}, step=0, discriminator=disc)


def test_discriminator_loss_hinge_plus_lecam_and_its_state():
    _, images, recon, _ = setup()
    disc = PatchGANDiscriminator(base_channels=8, num_layers=1)
    loss = TokenizerLoss(weights=LossWeights(lecam=0.5), lecam_decay=0.9)
    out = loss.discriminator_loss(discriminator=disc, images=images, reconstruction=recon, step=0)
    # The discriminator is in training mode (BatchNorm batch statistics): call it the same way to compare.
    real, fake = disc(images), disc(recon.detach())
    hinge = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    ema_real, ema_fake = 0.1 * real.mean(), 0.1 * fake.mean()  # anchors start at 0, decay 0.9
    lecam = F.relu(real - ema_fake).square().mean() + F.relu(ema_real - fake).square().mean()
    assert out.terms["d_hinge"].item() == pytest.approx(hinge.item(), rel=1e-5)
    assert out.terms["d_lecam"].item() == pytest.approx(lecam.item(), rel=1e-4)
    assert out.total.item() == pytest.approx((hinge + 0.5 * lecam).item(), rel=1e-5)
    assert loss.lecam.ema_real.item() == pytest.approx(ema_real.item(), rel=1e-5)
    # gradients reach the discriminator only, never the reconstruction's producer
    out.total.backward()
    assert disc.main[0].weight.grad is not None


def test_frozen_discriminator_passes_gradient_to_generator_only():
    last, images, recon, _ = setup()
    disc = PatchGANDiscriminator(base_channels=8, num_layers=1).requires_grad_(False)
    loss = TokenizerLoss(weights=LossWeights(perceptual=0.0))
    out = loss.generator_loss(images=images, reconstruction=recon, model_losses={}, step=0, discriminator=disc)
    out.total.backward()
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())


def test_invalid_choices():
    with pytest.raises(ValueError, match="reconstruction"):
        TokenizerLoss(weights=LossWeights(), reconstruction="l3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="adversarial_loss"):
        TokenizerLoss(weights=LossWeights(), adversarial_loss="wgan")  # type: ignore[arg-type]


def test_perceptual_on_a_sub_batch_sees_only_the_first_images():
    _, images, recon, model_losses = setup()
    recon = recon.detach().requires_grad_(True)
    loss = TokenizerLoss(weights=WEIGHTS, perceptual=L2Perceptual(), perceptual_images=1)
    out = loss.generator_loss(images=images, reconstruction=recon, model_losses=model_losses, step=0)
    expected = (recon[:1] - images[:1]).square().sum()
    assert torch.allclose(out.terms["perceptual"], expected.detach())
    out.total.backward()
    # the second image gets gradient from the pixel loss only: its perceptual gradient is absent
    pixel_only = torch.sign(recon[1] - images[1]) * WEIGHTS.reconstruction / recon.numel()
    assert torch.allclose(recon.grad[1], pixel_only.detach(), atol=1e-6)
    with pytest.raises(ValueError, match="perceptual_images"):
        TokenizerLoss(weights=WEIGHTS, perceptual=L2Perceptual(), perceptual_images=0)
