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

import torch
from torch import Tensor, nn

from mergevq.data.images import make_loader
from mergevq.losses.alignment import student_view
from mergevq.tokenizer.config import TokenizerConfig
from mergevq.tokenizer.model import MergeVQ
from mergevq.train import checkpoint as ckpt
from mergevq.train import distributed as du
from mergevq.train.logging import TrainLogger
from mergevq.train.loop import (
    begin_step,
    checkpoint_if_due,
    end_step,
    export_at_end,
    export_newest,
    make_checkpointer,
    open_logging,
    resume_position,
    start_run,
)
from mergevq.train.recipe import TrainConfig
from mergevq.train.rng import derive_seed
from mergevq.train.runtime import (
    BatchStream,
    MetricWindow,
    NonFiniteGuard,
    StopFlag,
    autocast,
    maybe_no_sync,
    preserve_torch_settings,
    wrap_ddp,
)
from mergevq.train.tokenizer_parts import Parts, TokenizerStep, build_parts, check_same_model, validation_batch

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
# Export
# ----------------------------------------------------------------------------------------------------------------------


def export_latest(output_dir: str | Path, *, destination: str | Path | None = None) -> Path:
    """``save_pretrained`` of the EMA tokenizer in the newest intact checkpoint (default: ``output_dir/export``).

    A damaged newer checkpoint is reported in one line and the next older one exported, as a resume would.
    """

    def build(loaded: ckpt.LoadedCheckpoint) -> MergeVQ:
        return MergeVQ(TokenizerConfig.from_dict(json.loads(loaded.state["model_config"]), source=str(loaded.path)))

    return export_newest(output_dir=Path(output_dir), destination=destination, build=build)


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
    info, output_dir = start_run(config=config)
    device = info.device
    p = build_parts(config, device=device)
    model, mcfg = p.model, p.model.config
    keep_alignment = p.alignment is not None and config.alignment.kind in ("ema", "labels")  # has state of its own
    guard = NonFiniteGuard(max_skips=config.nonfinite.max_skips)
    checkpointer = make_checkpointer(
        config=config,
        output_dir=output_dir,
        info=info,
        modules={
            "model": model,
            "ema": p.ema.module,
            "discriminator": p.discriminator,
            "alignment": p.alignment if keep_alignment else None,
        },
        states={"optimizer_g": p.opt_g, "optimizer_d": p.opt_d, "scaler_g": p.scaler_g, "scaler_d": p.scaler_d},
        guard=guard,
    )
    resumed = checkpointer.resume(check=lambda state, path: check_same_model(state, path, current=mcfg))
    if resumed is not None:
        p.loss_fn.lecam.load_state_dict(resumed.rank_state["lecam"])  # anchors fed by this rank's batches
    start_step, epoch, batch_in_epoch = resume_position(
        config=config, resumed=resumed, output_dir=output_dir, info=info
    )
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
    val_batch = validation_batch(config, image_size=p.image_size, device=device) if info.is_main else None
    extra = p.alignment.classifier if p.alignment is not None and p.alignment.classifier is not None else None
    p.run_g = wrap_ddp(TokenizerStep(model, extra), info=info, find_unused_parameters=config.find_unused_parameters)
    p.run_d = wrap_ddp(p.discriminator, info=info)

    logger, window = open_logging(
        config=config, output_dir=output_dir, info=info, start_step=start_step, progress=progress, guard=guard
    )
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
                lr = begin_step(
                    config=config,
                    step=step,
                    rank=info.rank,
                    optimizers=[(p.opt_g, config.optim.lr), (p.opt_d, p.disc_lr)],
                )
                _optimizer_step(
                    p, config, step=step, num_tokens=num_tokens, stream=stream, window=window, info=info, guard=guard
                )
                step += 1
                last_postfix = end_step(
                    config=config,
                    step=step,
                    num_tokens=num_tokens,
                    lr=lr,
                    window=window,
                    logger=logger,
                    postfix=last_postfix,
                    loss_key="total",
                )
                if val_batch is not None and (step % config.val_every == 0 or step == config.max_steps):
                    _validate(
                        p.ema.module,
                        val_batch,
                        step=step,
                        logger=logger,
                        precision=config.precision,
                        num_tokens=config.data.val_num_tokens,
                    )
                if checkpoint_if_due(
                    config=config,
                    step=step,
                    stop=stop,
                    device=device,
                    checkpointer=checkpointer,
                    stream=stream,
                    logger=logger,
                    model_config=mcfg.to_dict(),
                    meta={"preset": mcfg.name},
                    rank_extra=lambda: {
                        "lecam": {k: v.detach().cpu() for k, v in p.loss_fn.lecam.state_dict().items()}
                    },
                ):
                    break
    finally:
        logger.close()

    export_dir = export_at_end(
        config=config, step=step, info=info, output_dir=output_dir, model=p.ema.module, what="EMA tokenizer"
    )
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
    p: Parts,
    config: TrainConfig,
    *,
    step: int,
    num_tokens: int,
    stream: BatchStream,
    window: MetricWindow,
    info: du.DistInfo,
    guard: NonFiniteGuard,
) -> None:
    """One optimizer step of the tokenizer, then (once the GAN is on) one of the discriminator.

    A step whose loss or gradients are not finite updates nothing (``guard``); a skipped tokenizer step skips the
    discriminator's too.
    """
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
    loss_sum = torch.zeros((), device=device)
    restore = guard.snapshot(p.discriminator, p.loss_fn, p.alignment)  # BatchNorm, LeCAM, centering
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
        loss_sum = loss_sum + g.total.detach().float()
    p.scaler_g.unscale_(p.opt_g)
    max_norm = config.grad_clip if config.grad_clip is not None else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(p.gen_params, max_norm)
    if guard.check(step=step, loss=loss_sum, grad_norm=grad_norm, scaler=p.scaler_g):
        restore()
        guard.discard(p.opt_g, p.scaler_g)
        return
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
    restore = guard.snapshot(p.discriminator, p.loss_fn)
    d_sum = torch.zeros((), device=device)
    for micro, (images, recon) in enumerate(kept):
        with maybe_no_sync(disc_run, sync=micro == accum - 1):
            with autocast(device, config.precision):
                d = p.loss_fn.discriminator_loss(discriminator=disc_run, images=images, reconstruction=recon, step=step)
            p.scaler_d.scale(d.total / accum).backward()
        window.add(d.terms, scale=1.0 / accum)
        d_sum = d_sum + d.total.detach().float()
    p.scaler_d.unscale_(p.opt_d)
    d_norm = torch.nn.utils.clip_grad_norm_(p.discriminator.parameters(), float("inf"))  # the norm only
    if guard.check(step=step, loss=d_sum, grad_norm=d_norm, scaler=p.scaler_d, what="discriminator loss"):
        restore()
        guard.discard(p.opt_d, p.scaler_d)
        return
    p.scaler_d.step(p.opt_d)
    p.scaler_d.update()
    p.opt_d.zero_grad(set_to_none=True)


@torch.no_grad()
def _validate(
    model: nn.Module,
    images: Tensor,
    *,
    step: int,
    logger: TrainLogger,
    precision: str,
    num_tokens: list[int] | None = None,
) -> dict[str, float]:
    """PSNR of the EMA tokenizer on the fixed held-out batch at ``num_tokens`` (default: default K and L)."""
    cfg = model.config
    values: dict[str, float] = {}
    rows = [images[:8]]
    for k in sorted(set(num_tokens or (cfg.default_num_tokens, cfg.num_tokens_full))):
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
