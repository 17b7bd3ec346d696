"""The stage-1 objective: generator (tokenizer) loss and discriminator loss (SPEC §2.9).

    L_G = w_rec·rec(x, x̂) + w_p·LPIPS(x, x̂)                                        = nll
        + λ_adv·G(D(x̂))          after disc_start; λ_adv fixed (code: 0.1) or w_adv·‖∇nll‖/‖∇G‖ (VQGAN, paper 0.8);
                                   G = softplus(−mean_hw D(x̂)) per image (code) or per patch, or hinge −D(x̂)
        + w_ent·(H_sample − H_codebook) + w_commit·L_commit                           LFQ terms from the model
        + w_src·L_src + w_align·L_align                                               source recovery, alignment
    L_D = hinge(D(x), D(x̂)) + w_lecam·LeCAM(D(x), D(x̂))                             after disc_start

``rec`` is L1 (the authors' code) or L2 (Table A1). Both calls return a :class:`LossOutput` whose ``terms`` holds
every unweighted term, every weighted term (``w_<name>``) and the total, detached, for logging.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from mergevq.losses.discriminator import LeCAM, adaptive_weight, hinge_d_loss, hinge_g_loss, non_saturating_g_loss

__all__ = ["LossOutput", "LossWeights", "TokenizerLoss"]

# Model loss entries that carry a weight; anything else the model reports is logged unweighted.
_MODEL_TERMS = {"entropy": "entropy", "commitment": "commitment", "source_recovery": "source_recovery"}


class LossOutput(NamedTuple):
    total: Tensor  # scalar to back-propagate
    terms: dict[str, Tensor]  # detached scalars: unweighted "<name>", weighted "w_<name>", "total"


@dataclass(frozen=True)
class LossWeights:
    reconstruction: float = 1.0
    perceptual: float = 1.0  # code 1.0, paper 0.7
    adversarial: float = 0.1  # fixed weight (code) or multiplier of the adaptive weight (paper 0.8)
    lecam: float = 0.01
    entropy: float = 0.1
    commitment: float = 0.25
    source_recovery: float = 0.5  # paper: G 0.5, G+R 0.5, R 1.0
    alignment: float = 1.0  # G 0.1, G+R 1.0, R 1.0


class TokenizerLoss(nn.Module):
    """Composite generator and discriminator objectives.

    Args:
        weights: term weights.
        reconstruction: ``"l1"`` (authors' code) or ``"l2"`` (paper Table A1).
        perceptual: an LPIPS-like module ``(x, y) -> [B]``, or None to drop the term.
        perceptual_images: apply the perceptual term to the first N images of each micro-batch only (None: all).
            Their mean is an unbiased estimate of the batch mean; on small images the LPIPS network costs more than
            the tokenizer, so this is the cheap way to keep the term (issue 9's CPU recipe).
        adversarial_loss: ``"non_saturating"`` (code) or ``"hinge"`` generator loss.
        adversarial_reduction: non-saturating only: ``"image"`` averages each image's patch logits before the
            softplus, ``softplus(−mean_hw D(x̂))`` (the authors' code, SPEC §2.9; the training recipe's default);
            ``"patch"`` applies the softplus to every patch logit, then averages (standard PatchGAN).
        adaptive: scale the adversarial term by VQGAN's gradient-norm ratio at the decoder's last layer.
        adaptive_max_weight: clamp of the adaptive ratio.
        disc_start: optimizer step from which the GAN terms are active.
        lecam_decay: EMA decay of the LeCAM anchors (its buffers are the only state here).
    """

    def __init__(
        self,
        *,
        weights: LossWeights,
        reconstruction: Literal["l1", "l2"] = "l1",
        perceptual: nn.Module | None = None,
        perceptual_images: int | None = None,
        adversarial_loss: Literal["non_saturating", "hinge"] = "non_saturating",
        adversarial_reduction: Literal["image", "patch"] = "patch",
        adaptive: bool = False,
        adaptive_max_weight: float = 1e4,
        disc_start: int = 0,
        lecam_decay: float = 0.999,
    ) -> None:
        super().__init__()
        if reconstruction not in ("l1", "l2"):
            raise ValueError(f"reconstruction must be 'l1' or 'l2', got {reconstruction!r}")
        if adversarial_loss not in ("non_saturating", "hinge"):
            raise ValueError(f"adversarial_loss must be 'non_saturating' or 'hinge', got {adversarial_loss!r}")
        self.weights = weights
        self.reconstruction = reconstruction
        self.perceptual = perceptual if weights.perceptual > 0 else None
        if perceptual_images is not None and perceptual_images < 1:
            raise ValueError(f"perceptual_images must be >= 1 or None, got {perceptual_images}")
        self.perceptual_images = perceptual_images
        if adversarial_reduction not in ("image", "patch"):
            raise ValueError(f"adversarial_reduction must be 'image' or 'patch', got {adversarial_reduction!r}")
        self.adversarial_loss = adversarial_loss
        self.adversarial_reduction = adversarial_reduction
        self.adaptive = adaptive
        self.adaptive_max_weight = adaptive_max_weight
        self.disc_start = disc_start
        self.lecam = LeCAM(decay=lecam_decay)

    def gan_active(self, step: int) -> bool:
        return step >= self.disc_start and self.weights.adversarial > 0

    def reconstruction_loss(self, images: Tensor, reconstruction: Tensor) -> Tensor:
        diff = reconstruction.float() - images.float()
        return diff.abs().mean() if self.reconstruction == "l1" else diff.square().mean()

    def generator_loss(
        self,
        *,
        images: Tensor,
        reconstruction: Tensor,
        model_losses: dict[str, Tensor],
        step: int,
        discriminator: nn.Module | None = None,
        last_layer: Tensor | None = None,
        alignment: Tensor | None = None,
    ) -> LossOutput:
        """Tokenizer objective for one micro-batch.

        Args:
            images, reconstruction: [B,3,H,W] in [-1, 1].
            model_losses: ``TokenizerOutput.losses`` (unweighted; ``entropy``, ``commitment``, optional
                ``source_recovery``; other entries are logged only).
            step: current optimizer step (GAN terms start at ``disc_start``).
            discriminator: called on ``reconstruction`` for the adversarial term; keep its parameters frozen
                during this call so that only the tokenizer receives gradients.
            last_layer: the decoder's final weight, required when ``adaptive``.
            alignment: unweighted alignment loss (scalar), or None.
        """
        w = self.weights
        terms: dict[str, Tensor] = {}
        rec = self.reconstruction_loss(images, reconstruction)
        nll = w.reconstruction * rec
        terms["reconstruction"] = rec
        terms["w_reconstruction"] = w.reconstruction * rec
        if self.perceptual is not None:
            n = self.perceptual_images or images.shape[0]
            p = self.perceptual(reconstruction[:n].float(), images[:n].float()).mean()
            nll = nll + w.perceptual * p
            terms["perceptual"] = p
            terms["w_perceptual"] = w.perceptual * p
        total = nll

        if discriminator is not None and self.gan_active(step):
            logits_fake = discriminator(reconstruction)
            if self.adversarial_loss == "non_saturating":
                g = non_saturating_g_loss(logits_fake.float(), patch_mean_first=self.adversarial_reduction == "image")
            else:
                g = hinge_g_loss(logits_fake.float())
            if self.adaptive:
                if last_layer is None:
                    raise ValueError("the adaptive adversarial weight needs last_layer (the decoder's final weight)")
                if torch.is_grad_enabled() and g.requires_grad and nll.requires_grad:
                    ratio = adaptive_weight(nll, g, last_layer=last_layer, max_weight=self.adaptive_max_weight)
                else:
                    ratio = torch.zeros((), device=g.device)  # no graph (evaluation): the ratio is undefined
                adv_weight = w.adversarial * ratio
            else:
                adv_weight = torch.tensor(w.adversarial, device=g.device)
            total = total + adv_weight * g
            terms["adversarial"] = g
            terms["adversarial_weight"] = adv_weight
            terms["w_adversarial"] = adv_weight * g

        for key, name in _MODEL_TERMS.items():
            if key not in model_losses:
                continue
            value = model_losses[key].float()
            weight = getattr(w, name)
            terms[name] = value
            if weight:
                total = total + weight * value
                terms[f"w_{name}"] = weight * value
        for key, value in model_losses.items():
            if key not in _MODEL_TERMS:
                terms[key] = value.float()

        if alignment is not None:
            terms["alignment"] = alignment.float()
            if w.alignment:
                total = total + w.alignment * alignment.float()
                terms["w_alignment"] = w.alignment * alignment.float()

        terms["total"] = total
        return LossOutput(total, {k: v.detach().float() for k, v in terms.items()})

    def discriminator_loss(
        self, *, discriminator: nn.Module, images: Tensor, reconstruction: Tensor, step: int
    ) -> LossOutput:
        """Hinge loss on real images vs detached reconstructions, plus LeCAM (which also updates its anchors)."""
        if not self.gan_active(step):
            zero = torch.zeros((), device=images.device)
            return LossOutput(zero, {"d_total": zero})
        logits_real = discriminator(images.detach()).float()
        logits_fake = discriminator(reconstruction.detach()).float()
        hinge = hinge_d_loss(logits_real, logits_fake)
        total = hinge
        terms = {
            "d_hinge": hinge,
            "d_logits_real": logits_real.mean(),
            "d_logits_fake": logits_fake.mean(),
        }
        if self.weights.lecam > 0:
            lecam = self.lecam(logits_real, logits_fake)
            total = total + self.weights.lecam * lecam
            terms["d_lecam"] = lecam
            terms["w_d_lecam"] = self.weights.lecam * lecam
        terms["d_total"] = total
        return LossOutput(total, {k: v.detach().float() for k, v in terms.items()})
