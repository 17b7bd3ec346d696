"""Stage-1 tokenizer training: one plain loop over the shared parts of :mod:`mergevq.train.runtime`.

    mergevq train-tokenizer configs/cifar10/gr.yaml max_steps=2000 optim.lr=2e-4
    torchrun --nproc_per_node=8 -m mergevq train-tokenizer configs/imagenet/gr-d64.yaml

One optimizer step (``step`` counts optimizer steps everywhere):

1. K ~ merge-count distribution, drawn from (seed, step): the same on every rank and after a restart;
2. for each of ``grad_accum`` micro-batches: tokenizer forward (+ a second encoder pass on the student view for the
   alignment loss), generator loss with the discriminator frozen, backward (gradients synchronised on the last one);
3. clip, generator optimizer step, EMA update (and the EMA teacher of ``alignment.kind: ema``);
4. once the GAN is on: the discriminator's hinge + LeCAM loss on the same micro-batches, its own optimizer step.

Randomness is keyed on (seed, step, rank) or (seed, epoch, index) through :func:`~mergevq.train.rng.derive_seed` —
the torch/NumPy/Python global generators are reseeded at every step and the data pipeline derives its own — so a
resumed run reproduces an uninterrupted one bit for bit on the same hardware with ``deterministic: true``.
Checkpoints also carry every RNG state per rank (:class:`~mergevq.train.checkpointer.Checkpointer`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mergevq.data.images import ImageDataset, make_loader
from mergevq.data.transforms import eval_transform, train_transform
from mergevq.losses.alignment import AlignBranch, build_alignment, student_view
from mergevq.losses.discriminator import PatchGANDiscriminator
from mergevq.losses.perceptual import LPIPS
from mergevq.losses.tokenizer_loss import LossWeights, TokenizerLoss
from mergevq.tokenizer.config import TokenizerConfig
from mergevq.tokenizer.model import MergeVQ
from mergevq.train import checkpoint as ckpt
from mergevq.train import distributed as du
from mergevq.train.checkpointer import Checkpointer
from mergevq.train.config_io import ConfigError, config_diff, config_to_dict, save_config
from mergevq.train.ema import EMA
from mergevq.train.logging import TrainLogger
from mergevq.train.merge_sampling import MergeCountSampler
from mergevq.train.recipe import TrainConfig
from mergevq.train.rng import derive_seed, reseed_globals
from mergevq.train.runtime import (
    BatchStream,
    MetricWindow,
    StopFlag,
    any_rank,
    autocast,
    build_optimizer,
    configure_determinism,
    make_scaler,
    maybe_no_sync,
    prepare_output_dir,
    preserve_torch_settings,
    wrap_ddp,
)
from mergevq.train.schedule import apply_lr, lr_factor

__all__ = ["TrainResult", "export_latest", "train"]


@dataclasses.dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    step: int  # completed optimizer steps
    checkpoint: Path | None
    export: Path | None
    images_per_second: float | None  # training throughput over the whole run (all ranks), None if no step ran
    rank: int = 0
    interrupted_by: int | None = None  # the signal (SIGTERM/SIGINT) that stopped the run before max_steps
    # The in-memory modules at the end of the run (this rank's copies).
    model: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)
    ema_model: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)
    discriminator: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)


# ----------------------------------------------------------------------------------------------------------------------
# Modules around the tokenizer
# ----------------------------------------------------------------------------------------------------------------------


class _TokenizerStep(nn.Module):
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
class _Parts:
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


def _build(config: TrainConfig, *, device: torch.device) -> _Parts:
    reseed_globals(derive_seed(config.seed, 0x1A17))
    model = MergeVQ.from_preset(config.model.preset, **config.model.overrides).to(device)
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
        adversarial_loss=lc.adversarial_loss,
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
    return _Parts(
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


def _check_same_model(state: dict[str, Any], path: Path, *, current: TokenizerConfig) -> None:
    """Refuse a checkpoint written for another tokenizer, naming the keys that differ."""
    saved = json.loads(state["model_config"])
    diffs = config_diff(saved, current.to_dict(), ignore=("notes",))
    if not diffs:
        return
    listed = ", ".join(f"{k} ({a!r} vs {b!r})" for k, a, b in diffs[:6])
    more = f" and {len(diffs) - 6} more" if len(diffs) > 6 else ""
    raise ConfigError(
        f"checkpoint {path} was written for model preset {saved.get('name')!r} but this run uses "
        f"{current.name!r}; differing tokenizer keys: {listed}{more}. Use a new output_dir or the checkpoint's "
        "model settings"
    )


def _validation_batch(config: TrainConfig, *, image_size: int, device: torch.device) -> Tensor | None:
    if not config.data.val:
        return None
    try:
        val_set = ImageDataset(config.data.val, transform=eval_transform(image_size), max_images=config.data.val_images)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.val: {e}") from None
    count = min(len(val_set), config.data.val_images)
    return torch.stack([val_set[i]["image"] for i in range(count)]).to(device)


# ----------------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------------


def export_latest(output_dir: str | Path, *, destination: str | Path | None = None) -> Path:
    """``save_pretrained`` of the EMA tokenizer in the newest checkpoint (default: ``output_dir/export``)."""
    output_dir = Path(output_dir)
    latest = ckpt.find_latest(output_dir / "checkpoints")
    if latest is None:
        raise FileNotFoundError(f"no checkpoint under {output_dir / 'checkpoints'} to export")
    state = ckpt.load_state(latest.path)
    model = MergeVQ(TokenizerConfig.from_dict(json.loads(state["model_config"]), source=str(latest.path)))
    ckpt.load_module(model, latest.path, "ema")
    return model.save_pretrained(Path(destination) if destination is not None else output_dir / "export")


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


def train(config: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Run (or resume) stage-1 training as described by ``config``; returns where it ended.

    Process-wide torch settings changed for the run (thread count, deterministic algorithms) are restored on return.
    """
    with preserve_torch_settings():
        return _train(config, progress=progress)


def _train(config: TrainConfig, *, progress: bool) -> TrainResult:
    info = du.init_distributed(device=config.device)
    device = info.device
    configure_determinism(device=device, deterministic=config.deterministic, threads=config.threads)
    output_dir = prepare_output_dir(config.output_dir, info=info)
    p = _build(config, device=device)
    model, mcfg = p.model, p.model.config
    keep_alignment = p.alignment is not None and config.alignment.kind in ("ema", "labels")  # has state of its own
    checkpointer = Checkpointer(
        output_dir / "checkpoints",
        info=info,
        modules={
            "model": model,
            "ema": p.ema.module,
            "discriminator": p.discriminator,
            "alignment": p.alignment if keep_alignment else None,
        },
        states={"optimizer_g": p.opt_g, "optimizer_d": p.opt_d, "scaler_g": p.scaler_g, "scaler_d": p.scaler_d},
        keep_last=config.keep_last,
    )
    resumed = checkpointer.resume(check=lambda state, path: _check_same_model(state, path, current=mcfg))
    if resumed is not None:
        p.loss_fn.lecam.load_state_dict(resumed.rank_state["lecam"])  # anchors fed by this rank's batches
    start_step = resumed.step if resumed is not None else 0
    if info.is_main:
        save_config(config, output_dir / "config.yaml")

    epoch, batch_in_epoch = (resumed.epoch, resumed.batch_in_epoch) if resumed is not None else (0, 0)
    loader = make_loader(
        p.train_set,
        batch_size=config.batch_size,
        shuffle=True,
        num_workers=config.data.num_workers,
        seed=config.seed,
        drop_last=True,
        epoch=epoch,
        start_batch=batch_in_epoch,
    )
    stream = BatchStream(loader, epoch=epoch, batch_in_epoch=batch_in_epoch)
    val_batch = _validation_batch(config, image_size=p.image_size, device=device) if info.is_main else None
    extra = p.alignment.classifier if p.alignment is not None and p.alignment.classifier is not None else None
    p.run_g = wrap_ddp(_TokenizerStep(model, extra), info=info, find_unused_parameters=config.find_unused_parameters)
    p.run_d = wrap_ddp(p.discriminator, info=info)

    logger = TrainLogger(
        output_dir=output_dir,
        enabled=info.is_main,
        max_steps=config.max_steps,
        start_step=start_step,
        progress=progress,
    )
    window = MetricWindow(device=device, samples_per_step=config.batch_size * config.grad_accum * info.world_size)
    if info.is_main and start_step == 0:
        counts = model.parameter_counts()
        logger.info(
            f"training {mcfg.name} ({config.variant}, recipe {config.recipe}) for {config.max_steps} steps, "
            f"{info.world_size} process(es) on {device.type}, effective batch {window.samples_per_step}, "
            f"{counts['total'] / 1e6:.2f}M tokenizer parameters; {p.sampler!r}"
        )

    last_postfix: dict[str, float] = {}
    step = start_step
    stop = StopFlag()
    try:
        with stop:
            while step < config.max_steps:
                window.start_step()
                num_tokens = p.sampler.sample(step=step)
                reseed_globals(derive_seed(config.seed, step, info.rank))
                factor = lr_factor(step, config=config.schedule, max_steps=config.max_steps)
                lr = apply_lr(p.opt_g, base_lr=config.optim.lr, factor=factor)
                apply_lr(p.opt_d, base_lr=p.disc_lr, factor=factor)
                _optimizer_step(p, config, step=step, num_tokens=num_tokens, stream=stream, window=window, info=info)
                step += 1
                window.add({"num_tokens": float(num_tokens)})
                log_now = step % config.log_every == 0 or step == config.max_steps
                window.end_step(sync=log_now)  # timings are read per logging window, not per step

                if log_now:
                    means = window.reduce()
                    values = {**means.values, "lr": lr, "images_per_s": means.samples_per_s}
                    logger.scalars(step=step, values=values)
                    last_postfix = {
                        "loss": values.get("total", float("nan")),
                        "img/s": means.samples_per_s,
                        "K": num_tokens,
                    }
                logger.advance(step=step, postfix=last_postfix)
                if val_batch is not None and (step % config.val_every == 0 or step == config.max_steps):
                    _validate(p.ema.module, val_batch, step=step, logger=logger, precision=config.precision)
                stop_now = any_rank(stop.requested, device=device)
                if step % config.checkpoint_every == 0 or step == config.max_steps or stop_now:
                    checkpointer.save(
                        step=step,
                        stream=stream,
                        rank_extra={"lecam": {k: v.detach().cpu() for k, v in p.loss_fn.lecam.state_dict().items()}},
                        extra={
                            "model_config": json.dumps(mcfg.to_dict(), default=list),
                            "train_config": json.dumps(config_to_dict(config)),
                        },
                        meta={"preset": mcfg.name},
                    )
                if stop_now:
                    logger.info(f"stopping at step {step} on request; run the same command again to resume")
                    break
    finally:
        logger.close()

    export_dir = None
    if config.export and step >= config.max_steps and info.is_main:
        export_dir = p.ema.module.save_pretrained(output_dir / "export")
        print(f"exported the EMA tokenizer to {export_dir}", flush=True)
    du.barrier()
    du.cleanup()
    return TrainResult(
        output_dir=output_dir,
        step=step,
        checkpoint=checkpointer.latest,
        export=export_dir,
        images_per_second=window.run_samples_per_s,
        rank=info.rank,
        interrupted_by=stop.signum if step < config.max_steps else None,
        model=model,
        ema_model=p.ema.module,
        discriminator=p.discriminator,
    )


def _optimizer_step(
    p: _Parts,
    config: TrainConfig,
    *,
    step: int,
    num_tokens: int,
    stream: BatchStream,
    window: MetricWindow,
    info: du.DistInfo,
) -> None:
    """One optimizer step of the tokenizer, then (once the GAN is on) one of the discriminator."""
    gen_step, disc_run, device = p.run_g, p.run_d, info.device
    assert gen_step is not None and disc_run is not None
    accum = config.grad_accum
    gan_on = config.loss.adversarial_weight > 0 and p.loss_fn.gan_active(step)
    p.model.train()
    p.discriminator.train()
    if p.alignment is not None:
        p.alignment.train()

    # ---- tokenizer (the GAN's generator), discriminator frozen
    p.discriminator.requires_grad_(False)
    kept: list[tuple[Tensor, Tensor]] = []
    view_gen = torch.Generator().manual_seed(derive_seed(config.seed, step, info.rank, 0x5717))
    for micro in range(accum):
        batch = stream.next()
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        align_view = None
        if p.alignment is not None:
            if config.alignment.view == "augment":
                align_view = student_view(images, generator=view_gen, scale=config.alignment.crop_scale)
            else:
                align_view = images
        # no_sync must cover the forward too: DDP decides there whether the backward all-reduces.
        with maybe_no_sync(gen_step, sync=micro == accum - 1):
            with autocast(device, config.precision):
                out, student = gen_step(images, num_tokens=num_tokens, align_view=align_view)
                align_loss = None
                if p.alignment is not None:
                    align_loss = p.alignment(student=student, images=images, labels=labels)
                g = p.loss_fn.generator_loss(
                    images=images,
                    reconstruction=out.reconstruction,
                    model_losses=out.losses,
                    step=step,
                    discriminator=p.discriminator if gan_on else None,
                    last_layer=p.model.last_layer,
                    alignment=align_loss,
                )
            p.scaler_g.scale(g.total / accum).backward()
        kept.append((images, out.reconstruction.detach()))
        window.add(g.terms, scale=1.0 / accum)
    p.scaler_g.unscale_(p.opt_g)
    max_norm = config.grad_clip if config.grad_clip is not None else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(p.gen_params, max_norm)
    p.scaler_g.step(p.opt_g)
    p.scaler_g.update()
    p.opt_g.zero_grad(set_to_none=True)
    p.ema.update(p.model)
    if p.alignment is not None and p.align_branch is not None:
        p.alignment.update_teacher(p.align_branch, momentum=config.alignment.teacher_momentum)
    window.add({"grad_norm": grad_norm.float()})

    # ---- discriminator, on the same micro-batches
    if not gan_on:
        return
    p.discriminator.requires_grad_(True)
    for micro, (images, recon) in enumerate(kept):
        with maybe_no_sync(disc_run, sync=micro == accum - 1):
            with autocast(device, config.precision):
                d = p.loss_fn.discriminator_loss(discriminator=disc_run, images=images, reconstruction=recon, step=step)
            p.scaler_d.scale(d.total / accum).backward()
        window.add(d.terms, scale=1.0 / accum)
    p.scaler_d.step(p.opt_d)
    p.scaler_d.update()
    p.opt_d.zero_grad(set_to_none=True)


@torch.no_grad()
def _validate(model: nn.Module, images: Tensor, *, step: int, logger: TrainLogger, precision: str) -> dict[str, float]:
    """PSNR of the EMA tokenizer on the fixed held-out batch, at the default K and without merging."""
    cfg = model.config
    values: dict[str, float] = {}
    rows = [images[:8]]
    for k in sorted({cfg.default_num_tokens, cfg.num_tokens_full}):
        with autocast(images.device, precision):
            recon = model(images, num_tokens=k).reconstruction.float().clamp(-1, 1)
        mse = (recon - images.float()).square().flatten(1).mean(1) / 4.0  # on [0, 1] pixels
        psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
        values[f"psnr_k{k}"] = float(psnr.mean())
        rows.append(recon[:8])
    logger.scalars(step=step, values=values, prefix="val")
    logger.images(step=step, tag="val_reconstruction", rows=rows)
    logger.info(f"step {step}: " + ", ".join(f"val {k} {v:.2f} dB" for k, v in values.items()))
    return values
