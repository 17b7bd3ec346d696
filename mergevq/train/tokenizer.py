"""Stage-1 tokenizer training: one plain loop, DDP under ``torchrun``, resumable after any interruption.

    mergevq train-tokenizer configs/cifar10/gr.yaml max_steps=2000 optim.lr=2e-4
    torchrun --nproc_per_node=8 -m mergevq.train.tokenizer configs/imagenet/gr-d64.yaml

One optimizer step (``step`` counts optimizer steps everywhere):

1. K ~ merge-count distribution, drawn from (seed, step): the same on every rank and after a restart;
2. for each of ``grad_accum`` micro-batches: tokenizer forward (+ a second encoder pass on the student view for the
   alignment loss), generator loss with the discriminator frozen, backward (gradients synchronised on the last one);
3. clip, generator optimizer step, EMA update (and the EMA teacher of ``alignment.kind: ema``);
4. once the GAN is on: the discriminator's hinge + LeCAM loss on the same micro-batches, its own optimizer step.

Randomness is keyed on (seed, step, rank) or (seed, epoch, index) — the torch/NumPy/Python global generators are
reseeded at every step and the data pipeline derives its own — so a resumed run reproduces an uninterrupted one bit
for bit on the same hardware with ``deterministic: true``. Checkpoints also carry every RNG state per rank.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from mergevq.train import checkpoint as ckpt
from mergevq.train import distributed as du
from mergevq.train.config import ConfigError, TrainConfig, config_to_dict, load_config, save_config
from mergevq.train.ema import EMA
from mergevq.train.logging import TrainLogger
from mergevq.train.merge_sampling import MergeCountSampler
from mergevq.train.schedule import apply_lr, lr_factor

__all__ = ["TrainResult", "derive_seed", "export_latest", "main", "register", "student_view", "train"]


@dataclasses.dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    step: int  # completed optimizer steps
    checkpoint: Path | None
    export: Path | None
    images_per_second: float | None  # training throughput over the whole run (all ranks), None if no step ran
    rank: int = 0
    # The in-memory modules at the end of the run (this rank's copies).
    model: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)
    ema_model: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)
    discriminator: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)


# ----------------------------------------------------------------------------------------------------------------------
# Randomness
# ----------------------------------------------------------------------------------------------------------------------


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixing integer parts (SeedSequence: tuples that differ anywhere give unrelated streams)."""
    state = np.random.SeedSequence([int(p) % (1 << 63) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & ((1 << 63) - 1)


def _reseed_globals(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))


def _rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain containers (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def student_view(images: Tensor, *, generator: torch.Generator, scale: tuple[float, float]) -> Tensor:
    """Random resized crop (area fraction in ``scale``, aspect 3/4–4/3) + horizontal flip, back at input size.

    The alignment branch's student view (SPEC §2.6), done on the batch with one ``grid_sample`` so it needs no
    second decode of the images; every random number comes from ``generator``.
    """
    b = images.shape[0]
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    aspect = log_ratio.exp()
    width = (area * aspect).sqrt().clamp(max=1.0)  # fractions of the side
    height = (area / aspect).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - width)
    cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - height)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = height
    theta[:, 1, 2] = cy
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# ----------------------------------------------------------------------------------------------------------------------
# Modules around the tokenizer
# ----------------------------------------------------------------------------------------------------------------------


class _AlignBranch(nn.Module):
    """Encoder + alignment head: images → [B, align_dim] (what an EMA teacher copies)."""

    def __init__(self, encoder: nn.Module, head: nn.Module, *, num_tokens: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.num_tokens = num_tokens

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.encoder(images, num_tokens=self.num_tokens).cls)


class _GeneratorStep(nn.Module):
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


class _BatchStream:
    """Endless micro-batches that remember their position as (epoch, batch within epoch)."""

    def __init__(self, loader: Any, *, epoch: int, batch_in_epoch: int) -> None:
        from mergevq.data.images import set_loader_epoch

        self._set_epoch = set_loader_epoch
        self.loader = loader
        set_loader_epoch(loader, epoch=0, start_batch=0)
        self.batches_per_epoch = len(loader)
        if self.batches_per_epoch == 0:
            raise ValueError("the training set yields no full batch; lower batch_size or add images")
        self.epoch = epoch
        self.batch_in_epoch = batch_in_epoch
        if batch_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = epoch + 1, 0
        self._it: Iterator[Any] | None = None

    def next(self) -> Any:
        while True:
            if self._it is None:
                self._set_epoch(self.loader, epoch=self.epoch, start_batch=self.batch_in_epoch)
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                continue
            self.batch_in_epoch += 1
            if self.batch_in_epoch >= self.batches_per_epoch:
                # Position now points at the start of the next epoch; the iterator ends on the next call.
                self._it = None
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            return batch


# ----------------------------------------------------------------------------------------------------------------------
# Set-up helpers
# ----------------------------------------------------------------------------------------------------------------------


def _json_plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))


def _check_model_config(saved: dict[str, Any], current: dict[str, Any], *, path: Path) -> None:
    saved, current = _json_plain(saved), _json_plain(current)
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k) and k != "notes")
    if not keys:
        return
    diffs = ", ".join(f"{k} ({saved.get(k)!r} vs {current.get(k)!r})" for k in keys[:6])
    more = f" and {len(keys) - 6} more" if len(keys) > 6 else ""
    raise ConfigError(
        f"checkpoint {path} was written for model preset {saved.get('name')!r} but this run uses "
        f"{current.get('name')!r}; differing tokenizer keys: {diffs}{more}. Use a new output_dir or the checkpoint's "
        "model settings"
    )


def _build_optimizer(params: list[nn.Parameter], *, config: TrainConfig, lr: float) -> torch.optim.Optimizer:
    o = config.optim
    cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _configure_determinism(config: TrainConfig, device: torch.device) -> None:
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if config.deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


class _StopFlag:
    """Set by SIGTERM/SIGINT: the loop saves a checkpoint after the current step and exits."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                continue

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # second signal: give up at once
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _any_rank(flag: bool, device: torch.device) -> bool:
    if not du.is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


# ----------------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------------


def export_latest(output_dir: str | Path, *, destination: str | Path | None = None) -> Path:
    """``save_pretrained`` of the EMA tokenizer in the newest checkpoint (default: ``output_dir/export``)."""
    from mergevq.config import TokenizerConfig
    from mergevq.tokenizer.model import MergeVQ

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
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        return _train(config, progress=progress)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _train(config: TrainConfig, *, progress: bool) -> TrainResult:
    from mergevq.data.images import ImageDataset, make_loader
    from mergevq.data.transforms import eval_transform, train_transform
    from mergevq.losses.alignment import build_alignment
    from mergevq.losses.discriminator import PatchGANDiscriminator
    from mergevq.losses.tokenizer_loss import LossWeights, TokenizerLoss
    from mergevq.tokenizer.model import MergeVQ

    info = du.init_distributed(device=config.device)
    device = info.device
    _configure_determinism(config, device)
    output_dir = Path(config.output_dir)
    ckpt_root = output_dir / "checkpoints"
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale(ckpt_root)
    du.barrier()

    # ---- model, EMA, discriminator, loss, alignment (built identically on every rank from the seed)
    _reseed_globals(derive_seed(config.seed, 0x1A17))
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
    align_branch = (
        _AlignBranch(model.encoder, model.align_head, num_tokens=mcfg.default_num_tokens) if use_alignment else None
    )
    alignment = None
    if use_alignment:
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

    perceptual = None
    if config.loss.perceptual != "none" and config.loss.perceptual_weight > 0:
        from mergevq.losses.perceptual import LPIPS

        perceptual = LPIPS(
            variant=config.loss.perceptual,
            weights=config.loss.perceptual_heads,
            backbone_weights=config.loss.perceptual_backbone,
        )
    loss_fn = TokenizerLoss(
        weights=LossWeights(
            reconstruction=config.loss.reconstruction_weight,
            perceptual=config.loss.perceptual_weight,
            adversarial=config.loss.adversarial_weight,
            lecam=config.loss.lecam_weight,
            entropy=config.loss.entropy_weight,
            commitment=config.loss.commitment_weight,
            source_recovery=config.loss.source_recovery_weight,
            alignment=config.loss.alignment_weight,
        ),
        reconstruction=config.loss.reconstruction,
        perceptual=perceptual,
        adversarial_loss=config.loss.adversarial_loss,
        adaptive=config.loss.adversarial_mode == "adaptive",
        adaptive_max_weight=config.loss.adaptive_max_weight,
        disc_start=config.loss.disc_start,
        lecam_decay=config.loss.lecam_decay,
    ).to(device)
    discriminator = PatchGANDiscriminator(
        base_channels=config.loss.disc_channels, num_layers=config.loss.disc_layers
    ).to(device)
    use_gan = config.loss.adversarial_weight > 0

    extra = alignment.classifier if alignment is not None and alignment.classifier is not None else None
    gen_params = [p for p in model.parameters() if p.requires_grad]
    if extra is not None:
        gen_params += [p for p in extra.parameters() if p.requires_grad]
    opt_g = _build_optimizer(gen_params, config=config, lr=config.optim.lr)
    disc_lr = config.optim.disc_lr if config.optim.disc_lr is not None else config.optim.lr
    opt_d = _build_optimizer(list(discriminator.parameters()), config=config, lr=disc_lr)
    scaler_g = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    scaler_d = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    ema = EMA(model, decay=config.ema_decay)

    # ---- resume
    start_step, epoch, batch_in_epoch = 0, 0, 0
    latest = ckpt.find_latest(ckpt_root)
    if latest is not None:
        state = ckpt.load_state(latest.path)
        _check_model_config(json.loads(state["model_config"]), mcfg.to_dict(), path=latest.path)
        ckpt.load_module(model, latest.path, "model")
        ckpt.load_module(ema.module, latest.path, "ema")
        ckpt.load_module(discriminator, latest.path, "discriminator")
        if alignment is not None and config.alignment.kind in ("ema", "labels"):
            ckpt.load_module(alignment, latest.path, "alignment")
        opt_g.load_state_dict(state["optimizer_g"])
        opt_d.load_state_dict(state["optimizer_d"])
        scaler_g.load_state_dict(state["scaler_g"])
        scaler_d.load_state_dict(state["scaler_d"])
        ranks = state["ranks"]
        mine = ranks[info.rank] if info.rank < len(ranks) else ranks[0]
        loss_fn.lecam.load_state_dict(mine["lecam"])
        _set_rng_state(mine["rng"])
        start_step, epoch, batch_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
        if info.is_main:
            print(f"Resuming from step {start_step} ({latest.path})", flush=True)
            if int(state["world_size"]) != info.world_size:
                print(
                    f"warning: the checkpoint was written by {state['world_size']} process(es), this run has "
                    f"{info.world_size}: data order and per-rank random streams will differ from the original run",
                    flush=True,
                )

    if info.is_main:
        save_config(config, output_dir / "config.yaml")

    # ---- data
    loader = make_loader(
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        num_workers=config.data.num_workers,
        seed=config.seed,
        drop_last=True,
        epoch=epoch,
        start_batch=batch_in_epoch,
    )
    stream = _BatchStream(loader, epoch=epoch, batch_in_epoch=batch_in_epoch)
    val_batch = None
    if config.data.val and info.is_main:
        try:
            val_set = ImageDataset(
                config.data.val, transform=eval_transform(image_size), max_images=config.data.val_images
            )
        except (OSError, ValueError) as e:
            raise ConfigError(f"data.val: {e}") from None
        val_batch = torch.stack([val_set[i]["image"] for i in range(min(len(val_set), config.data.val_images))])
        val_batch = val_batch.to(device)

    # ---- DDP
    gen_step: nn.Module = _GeneratorStep(model, extra)
    disc_run: nn.Module = discriminator
    if info.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        gen_step = DDP(gen_step, device_ids=ids, find_unused_parameters=config.find_unused_parameters)
        disc_run = DDP(discriminator, device_ids=ids)

    logger = TrainLogger(
        output_dir=output_dir,
        enabled=info.is_main,
        max_steps=config.max_steps,
        start_step=start_step,
        progress=progress,
    )
    if info.is_main and start_step == 0:
        counts = model.parameter_counts()
        logger.info(
            f"training {mcfg.name} ({config.variant}, recipe {config.recipe}) for {config.max_steps} steps, "
            f"{info.world_size} process(es) on {device.type}, effective batch "
            f"{config.batch_size * config.grad_accum * info.world_size}, "
            f"{counts['total'] / 1e6:.2f}M tokenizer parameters; {sampler!r}"
        )

    stop = _StopFlag()
    stop.install()
    accum = config.grad_accum
    window: dict[str, Tensor] = {}
    window_steps = 0
    window_time = 0.0
    total_time = 0.0
    total_images = 0
    last_postfix: dict[str, float] = {}
    last_saved: Path | None = latest.path if latest is not None else None
    step = start_step
    try:
        while step < config.max_steps:
            t0 = time.perf_counter()
            num_tokens = sampler.sample(step=step)
            _reseed_globals(derive_seed(config.seed, step, info.rank))
            factor = lr_factor(step, config=config.schedule, max_steps=config.max_steps)
            lr = apply_lr(opt_g, base_lr=config.optim.lr, factor=factor)
            apply_lr(opt_d, base_lr=disc_lr, factor=factor)
            gan_on = use_gan and loss_fn.gan_active(step)
            model.train()
            discriminator.train()
            if alignment is not None:
                alignment.train()

            # ---- generator
            discriminator.requires_grad_(False)
            kept: list[tuple[Tensor, Tensor]] = []
            view_gen = torch.Generator().manual_seed(derive_seed(config.seed, step, info.rank, 0x5717))
            for micro in range(accum):
                batch = stream.next()
                images = batch["image"].to(device, non_blocking=True)
                labels = batch["label"].to(device, non_blocking=True)
                align_view = None
                if alignment is not None:
                    if config.alignment.view == "augment":
                        align_view = student_view(images, generator=view_gen, scale=config.alignment.crop_scale)
                    else:
                        align_view = images
                sync = micro == accum - 1 or not isinstance(gen_step, DDP)
                with contextlib.nullcontext() if sync else gen_step.no_sync():
                    with _autocast(device, config.precision):
                        out, student = gen_step(images, num_tokens=num_tokens, align_view=align_view)
                        align_loss = None
                        if alignment is not None:
                            align_loss = alignment(student=student, images=images, labels=labels)
                        g = loss_fn.generator_loss(
                            images=images,
                            reconstruction=out.reconstruction,
                            model_losses=out.losses,
                            step=step,
                            discriminator=discriminator if gan_on else None,
                            last_layer=model.last_layer,
                            alignment=align_loss,
                        )
                    scaler_g.scale(g.total / accum).backward()
                kept.append((images, out.reconstruction.detach()))
                for key, value in g.terms.items():
                    window[key] = window.get(key, 0.0) + value / accum
            scaler_g.unscale_(opt_g)
            max_norm = config.grad_clip if config.grad_clip is not None else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(gen_params, max_norm)
            scaler_g.step(opt_g)
            scaler_g.update()
            opt_g.zero_grad(set_to_none=True)
            ema.update(model)
            if alignment is not None and align_branch is not None:
                alignment.update_teacher(align_branch, momentum=config.alignment.teacher_momentum)
            window["grad_norm"] = window.get("grad_norm", 0.0) + grad_norm.detach().float()

            # ---- discriminator
            if gan_on:
                discriminator.requires_grad_(True)
                for micro, (images, recon) in enumerate(kept):
                    sync = micro == accum - 1 or not isinstance(disc_run, DDP)
                    with contextlib.nullcontext() if sync else disc_run.no_sync():
                        with _autocast(device, config.precision):
                            d = loss_fn.discriminator_loss(
                                discriminator=disc_run, images=images, reconstruction=recon, step=step
                            )
                        scaler_d.scale(d.total / accum).backward()
                    for key, value in d.terms.items():
                        window[key] = window.get(key, 0.0) + value / accum
                scaler_d.step(opt_d)
                scaler_d.update()
                opt_d.zero_grad(set_to_none=True)
            del kept

            step += 1
            window_steps += 1
            window["num_tokens"] = window.get("num_tokens", 0.0) + float(num_tokens)
            log_now = step % config.log_every == 0 or step == config.max_steps
            if log_now and device.type == "cuda":
                torch.cuda.synchronize(device)  # timings are read per logging window, not per step
            dt = time.perf_counter() - t0
            window_time += dt
            total_time += dt
            total_images += config.batch_size * accum * info.world_size

            # ---- logging, validation, checkpoints
            if log_now:
                means = du.all_reduce_mean({k: v / window_steps for k, v in window.items()}, device=device)
                ips = config.batch_size * accum * info.world_size * window_steps / max(window_time, 1e-9)
                means.update(lr=lr, images_per_s=ips)
                logger.scalars(step=step, values=means)
                last_postfix = {"loss": means.get("total", float("nan")), "img/s": ips, "K": num_tokens}
                window, window_steps, window_time = {}, 0, 0.0
            logger.advance(step=step, postfix=last_postfix)
            if val_batch is not None and (step % config.val_every == 0 or step == config.max_steps):
                _validate(ema.module, val_batch, step=step, logger=logger, precision=config.precision)
            stop_now = _any_rank(stop.requested, device)
            if step % config.checkpoint_every == 0 or step == config.max_steps or stop_now:
                last_saved = _save(
                    ckpt_root,
                    config=config,
                    info=info,
                    step=step,
                    stream=stream,
                    model=model,
                    ema=ema,
                    discriminator=discriminator,
                    alignment=alignment,
                    loss_fn=loss_fn,
                    optimizers=(opt_g, opt_d),
                    scalers=(scaler_g, scaler_d),
                )
                if stop_now:
                    logger.info(f"stopping at step {step} on request; run the same command again to resume")
                    break
    finally:
        stop.restore()
        logger.close()

    export_dir = None
    if config.export and step >= config.max_steps and info.is_main:
        export_dir = ema.module.save_pretrained(output_dir / "export")
        print(f"exported the EMA tokenizer to {export_dir}", flush=True)
    du.barrier()
    ips = total_images / total_time if total_time > 0 else None
    du.cleanup()
    return TrainResult(
        output_dir=output_dir,
        step=step,
        checkpoint=last_saved,
        export=export_dir,
        images_per_second=ips,
        rank=info.rank,
        model=model,
        ema_model=ema.module,
        discriminator=discriminator,
    )


@torch.no_grad()
def _validate(model: nn.Module, images: Tensor, *, step: int, logger: TrainLogger, precision: str) -> dict[str, float]:
    """PSNR of the EMA tokenizer on the fixed held-out batch, at the default K and without merging."""
    cfg = model.config
    values: dict[str, float] = {}
    rows = [images[:8]]
    for k in sorted({cfg.default_num_tokens, cfg.num_tokens_full}):
        with _autocast(images.device, precision):
            recon = model(images, num_tokens=k).reconstruction.float().clamp(-1, 1)
        mse = (recon - images.float()).square().flatten(1).mean(1) / 4.0  # on [0, 1] pixels
        psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
        values[f"psnr_k{k}"] = float(psnr.mean())
        rows.append(recon[:8])
    logger.scalars(step=step, values=values, prefix="val")
    logger.images(step=step, tag="val_reconstruction", rows=rows)
    logger.info(f"step {step}: " + ", ".join(f"val {k} {v:.2f} dB" for k, v in values.items()))
    return values


def _save(
    root: Path,
    *,
    config: TrainConfig,
    info: du.DistInfo,
    step: int,
    stream: _BatchStream,
    model: nn.Module,
    ema: EMA,
    discriminator: nn.Module,
    alignment: nn.Module | None,
    loss_fn: nn.Module,
    optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
    scalers: tuple[torch.amp.GradScaler, torch.amp.GradScaler],
) -> Path | None:
    # Per-rank state (RNG, LeCAM anchors fed by local batches) travels to rank 0, which writes everything.
    local = {"rng": _rng_state(), "lecam": {k: v.detach().cpu() for k, v in loss_fn.lecam.state_dict().items()}}
    ranks = du.all_gather_objects(local)
    path = None
    if info.is_main:
        weights = {"model": model.state_dict(), "ema": ema.state_dict(), "discriminator": discriminator.state_dict()}
        if alignment is not None and config.alignment.kind in ("ema", "labels"):
            weights["alignment"] = alignment.state_dict()
        state = {
            "epoch": stream.epoch,
            "batch_in_epoch": stream.batch_in_epoch,
            "batches_per_epoch": stream.batches_per_epoch,
            "world_size": info.world_size,
            "optimizer_g": optimizers[0].state_dict(),
            "optimizer_d": optimizers[1].state_dict(),
            "scaler_g": scalers[0].state_dict(),
            "scaler_d": scalers[1].state_dict(),
            "ranks": ranks,
            "model_config": json.dumps(_json_plain(model.config.to_dict())),
            "train_config": json.dumps(config_to_dict(config)),
        }
        meta = {"preset": model.config.name, "epoch": stream.epoch, "batch_in_epoch": stream.batch_in_epoch}
        path = ckpt.save_checkpoint(
            root, step=step, weights=weights, state=state, meta=meta, keep_last=config.keep_last
        )
    du.barrier()
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------

_EPILOG = """\
overrides:
  Any config key as section.key=value, parsed as YAML, e.g.
    max_steps=2000 batch_size=16 optim.lr=2e-4 optim.betas=[0.5,0.9] data.val=null
    model.preset=tiny-64 model.overrides.codebook_bits=12 loss.reconstruction=l2 recipe=paper
  An unknown key or a wrongly typed value stops with a one-line error (exit code 2).

output (output_dir):
  config.yaml       the fully resolved config of the latest launch
  checkpoints/      step_NNNNNNNN/ (model, EMA, discriminator safetensors + state.pt); the newest is resumed
  logs/             train.log, train.jsonl, tb/ (TensorBoard), images/ (validation grids)
  export/           the EMA tokenizer, loadable with MergeVQ.from_pretrained

Running the same command again resumes from the newest checkpoint ("Resuming from step N (...)").
Multi-GPU / multi-node: torchrun --nproc_per_node=N -m mergevq.train.tokenizer CONFIG [key=value ...]
SIGTERM/SIGINT save a checkpoint after the current step, then exit.
"""


_USAGE = "%(prog)s [--export-only | --print-config] [--no-progress] CONFIG [key=value ...]"


def _keys_help() -> str:
    """Every config key, grouped by section, generated from the dataclasses."""
    import textwrap

    lines = ["config keys (defaults and comments: mergevq/train/config.py; examples: configs/):"]
    top = []
    for f in dataclasses.fields(TrainConfig):
        default = getattr(TrainConfig(), f.name)
        if dataclasses.is_dataclass(default):
            names = ", ".join(g.name for g in dataclasses.fields(default))
            if f.name == "model":
                names += " (overrides.<any TokenizerConfig field>)"
            body = textwrap.fill(names, width=100, subsequent_indent=" " * 14)
            lines.append(f"  {f.name + '.':<11} {body}")
        else:
            top.append(f.name)
    lines.append("  " + textwrap.fill(", ".join(top), width=110, subsequent_indent="  "))
    return "\n".join(lines) + "\n\n"


_FLAGS = {"--export-only": "export_only", "--print-config": "print_config", "--no-progress": "no_progress"}


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML training config (see configs/cifar10/*.yaml, configs/imagenet/*.yaml)")
    # REMAINDER so that options may follow the overrides (plain nargs="*" stops at the first option).
    parser.add_argument(
        "overrides", nargs=argparse.REMAINDER, metavar="key=value", help="config overrides, e.g. optim.lr=2e-4"
    )
    parser.add_argument(
        "--export-only",
        action="store_true",
        help="do not train: save the EMA tokenizer of the newest checkpoint to output_dir/export and exit",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs are still written)")
    parser.set_defaults(func=_run, _parser=parser)


def _split_flags(args: argparse.Namespace) -> list[str] | int:
    """Move options written after the overrides onto ``args``; returns the overrides, or an exit code."""
    overrides = []
    for token in args.overrides:
        if token in _FLAGS:
            setattr(args, _FLAGS[token], True)
        elif token in ("-h", "--help"):
            args._parser.print_help()
            return 0
        elif token.startswith("-"):
            print(f"error: unknown option {token!r} (options: {', '.join(_FLAGS)})", file=sys.stderr)
            return 2
        else:
            overrides.append(token)
    return overrides


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``train-tokenizer`` to the ``mergevq`` command."""
    parser = subparsers.add_parser(
        "train-tokenizer",
        help="train (or resume) a MergeVQ tokenizer",
        description="Train a MergeVQ tokenizer (stage 1): reconstruction, perceptual, adversarial, LFQ, source "
        "recovery and alignment losses; EMA weights; resumable checkpoints; DDP under torchrun.",
        usage=_USAGE,
        epilog=_keys_help() + _EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser)
    return parser


def _run(args: argparse.Namespace) -> int:
    overrides = _split_flags(args)
    if isinstance(overrides, int):
        return overrides
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(config), sort_keys=False, width=120), end="")
        return 0
    if args.export_only:
        try:
            path = export_latest(config.output_dir)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"exported the EMA tokenizer to {path}")
        return 0
    try:
        result = train(config, progress=not args.no_progress)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.images_per_second is not None and result.rank == 0:
        print(f"done: {result.step} steps, {result.images_per_second:.1f} images/s (training only)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m mergevq.train.tokenizer`` (what torchrun launches)."""
    parser = argparse.ArgumentParser(
        prog="mergevq train-tokenizer",
        description="Train (or resume) a MergeVQ tokenizer.",
        usage=_USAGE,
        epilog=_keys_help() + _EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
