"""The steps both training loops (``train/tokenizer.py``, ``train/generator.py``) take in the same way: start-up,
resume position, logging, the per-step bookkeeping, checkpointing when due and the export at the end.

What differs between the loops (the modules, the optimizer step, validation) stays with them; these functions only
read the recipe keys both recipes share (:class:`LoopRecipe`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from mergevq.train import checkpoint as ckpt
from mergevq.train import distributed as du
from mergevq.train.checkpointer import Checkpointer, Resumed, Stateful
from mergevq.train.config_io import save_config
from mergevq.train.logging import TrainLogger
from mergevq.train.rng import derive_seed, reseed_globals
from mergevq.train.runtime import (
    BatchStream,
    MetricWindow,
    NonFiniteGuard,
    StopFlag,
    any_rank,
    configure_determinism,
    prepare_output_dir,
)
from mergevq.train.schedule import apply_lr, lr_factor

__all__ = [
    "LoopRecipe",
    "begin_step",
    "checkpoint_if_due",
    "end_step",
    "export_at_end",
    "export_newest",
    "make_checkpointer",
    "open_logging",
    "resume_position",
    "start_run",
]


class LoopRecipe(Protocol):
    """The recipe keys both training configs share (``TrainConfig``, ``GeneratorTrainConfig``)."""

    device: Any
    deterministic: bool
    threads: int | None
    output_dir: str
    seed: int
    schedule: Any
    max_steps: int
    log_every: int
    checkpoint_every: int
    keep_last: int
    batch_size: int
    grad_accum: int
    export: bool
    resume: Any


def start_run(*, config: LoopRecipe) -> tuple[du.DistInfo, Path]:
    """Join the process group, set the kernels' determinism and lock the output directory."""
    info = du.init_distributed(device=config.device)
    configure_determinism(device=info.device, deterministic=config.deterministic, threads=config.threads)
    return info, prepare_output_dir(config.output_dir, info=info)


def make_checkpointer(
    *,
    config: LoopRecipe,
    output_dir: Path,
    info: du.DistInfo,
    modules: Mapping[str, nn.Module | None],
    states: Mapping[str, Stateful],
    guard: NonFiniteGuard,
    substitutes: Mapping[str, str] | None = None,
) -> Checkpointer:
    """The run's :class:`Checkpointer` under ``output_dir/checkpoints``, refusing recipe changes unless allowed."""
    return Checkpointer(
        output_dir / "checkpoints",
        info=info,
        modules=modules,
        states=states,
        substitutes=substitutes,
        keep_last=config.keep_last,
        guard=guard,
        recipe=config,
        allow_recipe_changes=config.resume.allow_changes,
    )


def resume_position(
    *, config: LoopRecipe, resumed: Resumed | None, output_dir: Path, info: du.DistInfo
) -> tuple[int, int, int]:
    """(start step, epoch, batch in epoch) of the run; rank 0 also writes this launch's ``config.yaml``."""
    start_step = resumed.step if resumed is not None else 0
    if info.is_main:
        save_config(config, output_dir / "config.yaml")
    epoch, batch_in_epoch = (resumed.epoch, resumed.batch_in_epoch) if resumed is not None else (0, 0)
    return start_step, epoch, batch_in_epoch


def open_logging(
    *,
    config: LoopRecipe,
    output_dir: Path,
    info: du.DistInfo,
    start_step: int,
    progress: bool,
    guard: NonFiniteGuard,
) -> tuple[TrainLogger, MetricWindow]:
    """The run's logger (rank 0 writes) and metric window; skipped steps are reported to ``train.log`` too."""
    logger = TrainLogger(
        output_dir=output_dir,
        enabled=info.is_main,
        max_steps=config.max_steps,
        start_step=start_step,
        progress=progress,
    )
    window = MetricWindow(device=info.device, samples_per_step=config.batch_size * config.grad_accum * info.world_size)
    guard.report = logger.info  # skipped steps also go to train.log
    return logger, window


def begin_step(
    *, config: LoopRecipe, step: int, rank: int, optimizers: Sequence[tuple[torch.optim.Optimizer, float]]
) -> float:
    """Reseed the global generators from (seed, step, rank) and set each optimizer's scheduled learning rate
    (``optimizers``: (optimizer, base lr) pairs); returns the first one's."""
    reseed_globals(derive_seed(config.seed, step, rank))
    factor = lr_factor(step, config=config.schedule, max_steps=config.max_steps)
    return [apply_lr(opt, base_lr=base_lr, factor=factor) for opt, base_lr in optimizers][0]


def end_step(
    *,
    config: LoopRecipe,
    step: int,
    num_tokens: int,
    lr: float,
    window: MetricWindow,
    logger: TrainLogger,
    postfix: dict[str, float],
    loss_key: str,
) -> dict[str, float]:
    """Close step ``step`` (completed steps): log the window's means when due, advance the progress bar; returns
    the progress bar's postfix (``loss_key``: the metric it shows as the loss)."""
    window.add({"num_tokens": float(num_tokens)})
    log_now = step % config.log_every == 0 or step == config.max_steps
    window.end_step(sync=log_now)  # timings are read per logging window, not per step
    if log_now:
        means = window.reduce()
        values = {**means.values, "lr": lr, "images_per_s": means.samples_per_s}
        logger.scalars(step=step, values=values)
        postfix = {"loss": values.get(loss_key, float("nan")), "img/s": means.samples_per_s, "K": num_tokens}
    logger.advance(step=step, postfix=postfix)
    return postfix


def checkpoint_if_due(
    *,
    config: LoopRecipe,
    step: int,
    stop: StopFlag,
    device: torch.device,
    checkpointer: Checkpointer,
    stream: BatchStream,
    logger: TrainLogger,
    model_config: dict[str, Any],
    meta: dict[str, Any],
    rank_extra: Callable[[], dict[str, Any]] | None = None,
) -> bool:
    """Save a checkpoint when one is due or any rank was asked to stop (collective); True when the loop must stop.

    ``rank_extra`` is called only when saving: it may copy device state to the CPU.
    """
    stop_now = any_rank(stop.requested, device=device)
    if step % config.checkpoint_every == 0 or step == config.max_steps or stop_now:
        checkpointer.save(
            step=step,
            stream=stream,
            rank_extra=rank_extra() if rank_extra is not None else None,
            extra={"model_config": json.dumps(model_config, default=list)},
            meta=meta,
        )
    if stop_now:
        logger.info(f"stopping at step {step} on request; run the same command again to resume")
    return stop_now


def export_at_end(
    *, config: LoopRecipe, step: int, info: du.DistInfo, output_dir: Path, model: nn.Module, what: str
) -> Path | None:
    """``save_pretrained`` of ``model`` into ``output_dir/export`` when the run finished (rank 0), then leave the
    process group; returns the export directory (None when nothing was exported)."""
    export_dir = None
    if config.export and step >= config.max_steps and info.is_main:
        export_dir = model.save_pretrained(output_dir / "export")
        print(f"exported the {what} to {export_dir}", flush=True)
    du.barrier()
    du.cleanup()
    return export_dir


def export_newest(
    *,
    output_dir: Path,
    destination: str | Path | None,
    build: Callable[[ckpt.LoadedCheckpoint], nn.Module],
    substitutes: Mapping[str, str] | None = None,
) -> Path:
    """``save_pretrained`` of the EMA weights of the newest intact checkpoint (default: ``output_dir/export``).

    ``build(loaded)`` makes the empty model from the checkpoint's saved config; a checkpoint whose config or weights
    do not fit is reported in one line and the next older one exported, as a resume would.
    """

    def fits(loaded: ckpt.LoadedCheckpoint) -> None:
        try:
            ckpt.check_fits(build(loaded), loaded.weights["ema"], loaded.file("ema"))
        except (KeyError, TypeError, ValueError) as e:
            raise ckpt.CheckpointDamaged(f"checkpoint {loaded.path}: {e}") from None

    found = ckpt.read_newest(output_dir / "checkpoints", parts=("ema",), substitutes=substitutes, fits=fits)
    if found is None:
        raise FileNotFoundError(f"no checkpoint under {output_dir / 'checkpoints'} to export")
    model = build(found)
    model.load_state_dict(found.weights["ema"])
    return model.save_pretrained(Path(destination) if destination is not None else output_dir / "export")
