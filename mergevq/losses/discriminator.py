"""PatchGAN discriminator and the GAN terms of the tokenizer objective (SPEC §2.9).

    L_D = hinge(D(x), D(x̂)) + λ_lecam · LeCAM(D(x), D(x̂))        λ_lecam = 0.01
    L_G = ... + λ_adv · non_saturating(D(x̂))                       λ_adv = 0.1 (fixed in the released code)

Logits are PatchGAN maps [B,1,h,w]; every reduction below is a mean over all of their elements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LeCAM",
    "PatchGANDiscriminator",
    "adaptive_weight",
    "hinge_d_loss",
    "hinge_g_loss",
    "non_saturating_g_loss",
]


class PatchGANDiscriminator(nn.Module):
    """Pix2pix/VQGAN "NLayer" PatchGAN: one logit per overlapping receptive-field patch.

    Layout (4×4 kernels, padding 1, LeakyReLU 0.2): conv(in→C, s2, bias, no norm); ``num_layers − 1`` convs doubling
    the width (capped at 8C) at stride 2 with BatchNorm; one more doubling conv at stride 1 with BatchNorm; a final
    conv to 1 channel at stride 1. Normalised convs carry no bias (BatchNorm's shift replaces it). The default
    (C=64, 3 layers) has 2,765,633 parameters (SPEC: 2.77M) and maps [B,3,256,256] → [B,1,30,30],
    [B,3,32,32] → [B,1,2,2].

    Args:
        in_channels: image channels.
        base_channels: width C of the first conv.
        num_layers: number of stride-2 convs (the receptive field grows with it: 70×70 px for 3).
    """

    def __init__(self, *, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        width = base_channels
        for n in range(1, num_layers + 1):
            out = base_channels * min(2**n, 8)
            stride = 2 if n < num_layers else 1  # the first `num_layers` convs (incl. the stem) halve the size
            layers += [
                nn.Conv2d(width, out, kernel_size=4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        layers.append(nn.Conv2d(width, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DCGAN init: conv weights N(0, 0.02), BatchNorm scales N(1, 0.02), all biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Images [B,C,H,W] → patch logits [B,1,h,w]."""
        return self.main(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """½[E relu(1 − D(x)) + E relu(1 + D(x̂))] — a scalar; each expectation is a mean over all patch logits."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_g_loss(logits_fake: Tensor, *, patch_mean_first: bool = False) -> Tensor:
    """Non-saturating generator loss E softplus(−D(x̂)) = −E log σ(D(x̂)); a scalar.

    By default every patch logit is its own real/fake decision (softplus per patch, then the mean), the standard
    PatchGAN reading. The released MergeVQ code averages the logits over the image first,
    softplus(−mean_hw D(x̂)) per sample (SPEC §2.9); pass ``patch_mean_first=True`` to reproduce it. The two agree
    when a map's logits are all equal; otherwise the default is the larger (softplus is convex).
    """
    if patch_mean_first:
        return F.softplus(-logits_fake.flatten(1).mean(dim=1)).mean()
    return F.softplus(-logits_fake).mean()


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Hinge-GAN generator loss −E D(x̂); a scalar."""
    return -logits_fake.mean()


class LeCAM(nn.Module):
    """LeCAM regulariser (Tseng et al., CVPR 2021) for the discriminator under limited data.

        R = E relu(D(x) − ema_fake)² + E relu(ema_real − D(x̂))²

    ``ema_real``/``ema_fake`` are exponential moving averages (decay 0.999, starting at 0) of the mean real and
    fake logits. They are buffers, so they live in ``state_dict`` and resume with a checkpoint. In training mode a
    call first folds the batch means into the EMAs, then evaluates R with the updated values; in eval mode the
    EMAs are left untouched. Gradients flow to the logits only.
    """

    ema_real: Tensor
    ema_fake: Tensor

    def __init__(self, *, decay: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, logits_real: Tensor, logits_fake: Tensor) -> None:
        """ema ← decay·ema + (1 − decay)·mean(logits), for real and fake."""
        self.ema_real.mul_(self.decay).add_(logits_real.detach().float().mean(), alpha=1.0 - self.decay)
        self.ema_fake.mul_(self.decay).add_(logits_fake.detach().float().mean(), alpha=1.0 - self.decay)

    def forward(self, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
        """Patch logits (any shape) → scalar regulariser."""
        if self.training:
            self.update(logits_real, logits_fake)
        ema_real = self.ema_real.to(logits_real.dtype)
        ema_fake = self.ema_fake.to(logits_fake.dtype)
        return F.relu(logits_real - ema_fake).square().mean() + F.relu(ema_real - logits_fake).square().mean()


def adaptive_weight(nll_loss: Tensor, g_loss: Tensor, *, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """VQGAN's balance between reconstruction and adversarial gradients at the decoder's last layer.

        λ = ‖∇_last nll_loss‖ / (‖∇_last g_loss‖ + 1e-4), clamped to [0, max_weight], detached.

    Both losses must depend on ``last_layer`` (the final weight of the decoder); the graphs are retained so the
    caller can still back-propagate the total loss. The released MergeVQ configs bypass this with a fixed
    adversarial weight of 0.1 (SPEC §2.9); it is here for the paper's "discriminator loss 0.8" setting.
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
