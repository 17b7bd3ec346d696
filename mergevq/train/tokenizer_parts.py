"""What stage-1 training is built from: the tokenizer, its EMA, discriminator, alignment and losses, optimizers and
data, all from the recipe (:func:`build_parts`), plus the checks a resumed checkpoint must pass."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mergevq.data.images import ImageDataset
from mergevq.data.transforms import eval_transform, train_transform
from mergevq.losses.alignment import AlignBranch, build_alignment
from mergevq.losses.discriminator import PatchGANDiscriminator
from mergevq.losses.perceptual import LPIPS
from mergevq.losses.tokenizer_loss import LossWeights, TokenizerLoss
from mergevq.tokenizer.config import TokenizerConfig
from mergevq.tokenizer.initialization import init_encoder_from_dinov2
from mergevq.tokenizer.model import MergeVQ
from mergevq.train.config_io import ConfigError, config_diff
from mergevq.train.ema import EMA
from mergevq.train.merge_sampling import MergeCountSampler
from mergevq.train.recipe import TrainConfig
from mergevq.train.rng import derive_seed, reseed_globals
from mergevq.train.runtime import build_optimizer, make_scaler

__all__ = ["Parts", "TokenizerStep", "build_parts", "check_same_model", "validation_batch"]


class TokenizerStep(nn.Module):
    """What DDP wraps: the reconstruction pass and the alignment pass in one forward, so both are synchronised.

    ``extra`` holds trainable modules whose loss is computed outside (the ``labels`` classifier), so that DDP
    averages their gradients too.
    """

    def __init__(self, model: nn.Module, extra: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.extra = extra

    def forward(self, images: Tensor, *, num_tokens: int, align_view: Tensor | None) -> tuple[Any, Tensor | None]:
        out = self.model(images, num_tokens=num_tokens)
        student = self.model.align_features(align_view, num_tokens=num_tokens) if align_view is not None else None
        return out, student


@dataclasses.dataclass
class Parts:
    """Everything one rank trains with, built identically on every rank from the seed."""

    model: MergeVQ
    ema: EMA
    discriminator: PatchGANDiscriminator
    alignment: nn.Module | None  # the alignment loss (teacher / classifier inside), None when off
    align_branch: AlignBranch | None
    loss_fn: TokenizerLoss
    sampler: MergeCountSampler
    train_set: ImageDataset
    image_size: int
    gen_params: list[nn.Parameter]
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler_g: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler
    disc_lr: float
    # What forward/backward go through: the DDP wrappers under torchrun (set once the run is resumed).
    run_g: nn.Module | None = None
    run_d: nn.Module | None = None


def build_parts(config: TrainConfig, *, device: torch.device) -> Parts:
    reseed_globals(derive_seed(config.seed, 0x1A17))
    model = MergeVQ.from_preset(config.model.preset, **config.model.overrides)
    if config.model.init_from == "dinov2":  # before the EMA copy, identically on every rank
        try:
            init_encoder_from_dinov2(encoder=model.encoder, source=config.model.init_from_source)
        except (ImportError, OSError, ValueError) as e:
            raise ConfigError(f"model.init_from: dinov2: {e}") from None
    model = model.to(device)
    mcfg = model.config
    sampler = MergeCountSampler(
        config=config.merge,
        num_tokens_full=mcfg.num_tokens_full,
        default_num_tokens=mcfg.default_num_tokens,
        seed=config.seed,
    )
    image_size = config.data.image_size or mcfg.image_size
    try:
        train_set = ImageDataset(
            config.data.train,
            transform=train_transform(image_size, resize=config.data.resize, hflip=config.data.hflip),
            max_images=config.data.max_images,
            seed=config.seed,
        )
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.train: {e}") from None

    use_alignment = config.alignment.kind != "none" and config.loss.alignment_weight > 0
    if use_alignment and model.align_head is None:
        raise ConfigError(
            f"alignment.kind {config.alignment.kind!r} needs an alignment head, but preset {mcfg.name!r} has "
            "align_head='none'; set alignment.kind=none or loss.alignment_weight=0"
        )
    if not use_alignment and model.align_head is not None:
        model.align_head.requires_grad_(False)  # unused: keep it out of the optimizer and of DDP's reducer
    align_branch = None
    alignment = None
    if use_alignment:
        align_branch = AlignBranch(model.encoder, model.align_head, num_tokens=mcfg.default_num_tokens)
        kw: dict[str, Any] = dict(config.alignment.options)
        if config.alignment.kind == "ema":
            kw["encoder"] = align_branch
        if config.alignment.kind == "labels":
            if not train_set.classes:
                raise ConfigError("alignment.kind 'labels' needs class sub-folders in data.train")
            kw["num_classes"] = len(train_set.classes)
        alignment = build_alignment(
            config.alignment.kind,
            student_dim=mcfg.align_dim,
            source=config.alignment.source,
            temperature=config.alignment.temperature,
            **kw,
        ).to(device)

    lc = config.loss
    perceptual = None
    if lc.perceptual != "none" and lc.perceptual_weight > 0:
        perceptual = LPIPS(variant=lc.perceptual, weights=lc.perceptual_heads, backbone_weights=lc.perceptual_backbone)
    loss_fn = TokenizerLoss(
        weights=LossWeights(
            reconstruction=lc.reconstruction_weight,
            perceptual=lc.perceptual_weight,
            adversarial=lc.adversarial_weight,
            lecam=lc.lecam_weight,
            entropy=lc.entropy_weight,
            commitment=lc.commitment_weight,
            source_recovery=lc.source_recovery_weight,
            alignment=lc.alignment_weight,
        ),
        reconstruction=lc.reconstruction,
        perceptual=perceptual,
        perceptual_images=lc.perceptual_images,
        adversarial_loss=lc.adversarial_loss,
        adversarial_reduction=lc.adversarial_reduction,
        adaptive=lc.adversarial_mode == "adaptive",
        adaptive_max_weight=lc.adaptive_max_weight,
        disc_start=lc.disc_start,
        lecam_decay=lc.lecam_decay,
    ).to(device)
    discriminator = PatchGANDiscriminator(base_channels=lc.disc_channels, num_layers=lc.disc_layers).to(device)

    gen_params = [p for p in model.parameters() if p.requires_grad]
    if alignment is not None and alignment.classifier is not None:
        gen_params += [p for p in alignment.classifier.parameters() if p.requires_grad]
    o = config.optim
    disc_lr = o.disc_lr if o.disc_lr is not None else o.lr
    opt = dict(kind=o.optimizer, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    return Parts(
        model=model,
        ema=EMA(model, decay=config.ema_decay),
        discriminator=discriminator,
        alignment=alignment,
        align_branch=align_branch,
        loss_fn=loss_fn,
        sampler=sampler,
        train_set=train_set,
        image_size=image_size,
        gen_params=gen_params,
        opt_g=build_optimizer(gen_params, lr=o.lr, **opt),
        opt_d=build_optimizer(discriminator.parameters(), lr=disc_lr, **opt),
        scaler_g=make_scaler(device, config.precision),
        scaler_d=make_scaler(device, config.precision),
        disc_lr=disc_lr,
    )


def check_same_model(state: dict[str, Any], path: Path, *, current: TokenizerConfig) -> None:
    """Refuse a checkpoint written for another tokenizer, naming the keys that differ."""
    saved = json.loads(state["model_config"])
    # Keys added since the checkpoint was written take their defaults (the behaviour it was trained with); a config
    # that no longer loads is compared as written, and its differences are reported below.
    with contextlib.suppress(ValueError):
        saved = TokenizerConfig.from_dict(saved).to_dict()
    # weight_init only affects a fresh model; resumed weights replace it.
    diffs = config_diff(saved, current.to_dict(), ignore=("notes", "weight_init"))
    if not diffs:
        return
    listed = ", ".join(f"{k} ({a!r} vs {b!r})" for k, a, b in diffs[:6])
    more = f" and {len(diffs) - 6} more" if len(diffs) > 6 else ""
    raise ConfigError(
        f"checkpoint {path} was written for model preset {saved.get('name')!r} but this run uses "
        f"{current.name!r}; differing tokenizer keys: {listed}{more}. Use a new output_dir or the checkpoint's "
        "model settings"
    )


def validation_batch(config: TrainConfig, *, image_size: int, device: torch.device) -> Tensor | None:
    if not config.data.val:
        return None
    try:
        val_set = ImageDataset(config.data.val, transform=eval_transform(image_size), max_images=config.data.val_images)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.val: {e}") from None
    count = min(len(val_set), config.data.val_images)
    return torch.stack([val_set[i]["image"] for i in range(count)]).to(device)
