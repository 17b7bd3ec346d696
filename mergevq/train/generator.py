"""Stage-2 generator training: the twin of :mod:`mergevq.train.tokenizer`, one plain loop over the shared parts.

    mergevq train-generator configs/cifar10/mergear.yaml max_steps=2000 optim.lr=1e-3
    torchrun --nproc_per_node=8 -m mergevq train-generator configs/imagenet/mergear-l.yaml

The token file (``data.train``) decides the task: codebook bits, grid, classes, tokenizer identity and the merge
levels of MergeAR and RandAR (:mod:`mergevq.train.generator_data`, which also documents the label rules).

One optimizer step (``step`` counts optimizer steps everywhere):

1. K ~ the merge-level distribution, drawn from (seed, step): the same on every rank and after a restart (MergeAR,
   RandAR; vanilla AR and MaskGIT: K = L);
2. for each of ``grad_accum`` micro-batches at that K: the kind's loss (sum over bit groups of the cross-entropy: every
   raster position for ar/mergear, the K merged tokens in a random order for randar, the masked positions for
   maskgit), backward (gradients synchronised on the last one);
3. clip, optimizer step, EMA update (when ``ema_decay`` is set); a step with a NaN/inf loss or gradient updates
   nothing (:class:`~mergevq.train.runtime.NonFiniteGuard`).

Data: epoch e shuffles the rows with ``derive_seed(seed, e)`` and rank r takes every world-size-th row from r; the
position (epoch, batch in epoch) is checkpointed, so a resumed run continues with exactly the next batch. Dropouts,
class dropout, RandAR's orders and MaskGIT's masks draw from the global generators, reseeded from (seed, step, rank)
at every step: with ``deterministic: true`` a resumed run reproduces an uninterrupted one bit for bit on the same
hardware. Validation draws its orders and masks from a forked generator seeded from (seed, K), the same at every
validation, so val curves differ only by the weights and the training stream never sees it.

Checkpoints hold ``ema.safetensors`` only when ``ema_decay`` is set; export then reads it, otherwise the trained
weights.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mergevq.data.tokens import check_same_tokenizer
from mergevq.generator import Generator, GeneratorConfig
from mergevq.train import checkpoint as ckpt
from mergevq.train.config_io import ConfigError, config_diff
from mergevq.train.ema import EMA
from mergevq.train.generator_data import RowLoader, TokenSource, merge_level_sampler, read_token_source
from mergevq.train.generator_recipe import GeneratorTrainConfig
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
from mergevq.train.merge_sampling import MergeCountSampler
from mergevq.train.rng import derive_seed, forked_torch_rng, reseed_globals
from mergevq.train.runtime import (
    BatchStream,
    MetricWindow,
    NonFiniteGuard,
    StopFlag,
    autocast,
    build_optimizer,
    make_scaler,
    maybe_no_sync,
    preserve_torch_settings,
    wrap_ddp,
)

__all__ = ["TrainResult", "export_latest", "train"]


@dataclasses.dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    step: int  # completed optimizer steps
    checkpoint: Path | None
    export: Path | None
    images_per_second: float | None  # token grids per second over the whole run (all ranks), None if no step ran
    rank: int = 0
    interrupted_by: int | None = None  # the signal (SIGTERM/SIGINT) that stopped the run before max_steps
    # The in-memory modules at the end of the run (this rank's copies); ema_model is None without an EMA.
    model: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)
    ema_model: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)


# ----------------------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Parts:
    """Everything one rank trains with, built identically on every rank from the seed."""

    model: Generator
    ema: EMA | None
    tokens: TokenSource
    sampler: MergeCountSampler | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    run: nn.Module | None = None  # what forward/backward go through: the DDP wrapper under torchrun

    @property
    def eval_model(self) -> Generator:
        """What validation and export use: the EMA weights when there is an EMA."""
        return self.ema.module if self.ema is not None else self.model

    def num_tokens(self, step: int) -> int:
        return self.sampler.sample(step=step) if self.sampler is not None else self.tokens.levels[0]

    def labels(self, labels: Tensor) -> Tensor:
        return torch.zeros_like(labels) if self.tokens.unlabelled else labels


def _build(config: GeneratorTrainConfig, *, device: torch.device) -> _Parts:
    tokens = read_token_source(config)
    sampler = merge_level_sampler(config, tokens)
    reseed_globals(derive_seed(config.seed, 0x6E47))
    model = Generator(tokens.model_config).to(device)
    o = config.optim
    return _Parts(
        model=model,
        ema=EMA(model, decay=config.ema_decay) if config.ema_decay is not None else None,
        tokens=tokens,
        sampler=sampler,
        optimizer=build_optimizer(
            model.parameters(),
            kind=o.optimizer,
            lr=o.lr,
            betas=o.betas,
            eps=o.eps,
            weight_decay=o.weight_decay,
            decay_matrices_only=True,
        ),
        scaler=make_scaler(device, config.precision),
    )


def _check_resume(state: dict[str, Any], path: Path, *, current: GeneratorConfig, train_file: str) -> None:
    """Refuse a checkpoint of another tokenizer's tokens, or of another generator, in one line."""
    saved = json.loads(state["model_config"])
    try:
        check_same_tokenizer(
            saved.get("tokenizer") or {},
            current.tokenizer,
            what_a=f"checkpoint {path}",
            what_b=f"token file {train_file}",
        )
    except ValueError as e:
        raise ConfigError(f"{e}; use a new output_dir for another tokenizer's tokens") from None
    diffs = config_diff(saved, current.to_dict(), ignore=("tokenizer",))
    if not diffs:
        return
    listed = ", ".join(f"{k} ({a!r} vs {b!r})" for k, a, b in diffs[:6])
    more = f" and {len(diffs) - 6} more" if len(diffs) > 6 else ""
    raise ConfigError(
        f"checkpoint {path} was written for generator {saved.get('name')!r} ({saved.get('kind')}) but this run builds "
        f"{current.name!r} ({current.kind}); differing keys: {listed}{more}. Use a new output_dir or the checkpoint's "
        "settings"
    )


# ----------------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------------

# A checkpoint without an EMA (ema_decay: null) holds the weights once; its model stands in where the EMA is read.
_NO_EMA = {"ema": "model"}


def export_latest(output_dir: str | Path, *, destination: str | Path | None = None) -> Path:
    """``save_pretrained`` of the generator in the newest intact checkpoint (default: ``output_dir/export``).

    The checkpoint's EMA weights when the run kept an EMA, else its trained weights. A damaged newer checkpoint is
    reported in one line and the next older one exported, as a resume would.
    """

    def build(loaded: ckpt.LoadedCheckpoint) -> Generator:
        return Generator(GeneratorConfig.from_dict(json.loads(loaded.state["model_config"]), source=str(loaded.path)))

    return export_newest(output_dir=Path(output_dir), destination=destination, build=build, substitutes=_NO_EMA)


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


def train(config: GeneratorTrainConfig, *, progress: bool = True) -> TrainResult:
    """Run (or resume) stage-2 training as described by ``config``; returns where it ended.

    Process-wide torch settings changed for the run (thread count, deterministic algorithms) are restored on return.
    """
    with preserve_torch_settings():
        return _train(config, progress=progress)


def _train(config: GeneratorTrainConfig, *, progress: bool) -> TrainResult:
    info, output_dir = start_run(config=config)
    device = info.device
    p = _build(config, device=device)
    model, mcfg = p.model, p.model.config
    guard = NonFiniteGuard(max_skips=config.nonfinite.max_skips)
    checkpointer = make_checkpointer(
        config=config,
        output_dir=output_dir,
        info=info,
        modules={"model": model, "ema": p.ema.module if p.ema is not None else None},  # no EMA: weights once
        states={"optimizer": p.optimizer, "scaler": p.scaler},
        guard=guard,
        substitutes=_NO_EMA,  # a run that turns its EMA on (resume.allow_changes) starts it from the model
    )
    resumed = checkpointer.resume(
        check=lambda state, path: _check_resume(state, path, current=mcfg, train_file=config.data.train)
    )
    start_step, epoch, batch_in_epoch = resume_position(
        config=config, resumed=resumed, output_dir=output_dir, info=info
    )
    train_set = p.tokens.train
    loader = RowLoader(
        len(train_set), batch_size=config.batch_size, seed=config.seed, rank=info.rank, world_size=info.world_size
    )
    try:
        stream = BatchStream(loader, epoch=epoch, batch_in_epoch=batch_in_epoch)
    except ValueError:
        raise ConfigError(
            f"data.train: {len(train_set)} token grids over {info.world_size} process(es) give no full batch of "
            f"{config.batch_size}; lower batch_size"
        ) from None
    p.run = wrap_ddp(model, info=info, find_unused_parameters=config.find_unused_parameters)

    logger, window = open_logging(
        config=config, output_dir=output_dir, info=info, start_step=start_step, progress=progress, guard=guard
    )
    if info.is_main and start_step == 0:
        counts = model.parameter_counts()
        classes = "unlabelled: one class" if p.tokens.unlabelled else f"{mcfg.num_classes} classes"
        k_text = f"K={p.tokens.levels[0]}" if p.sampler is None else repr(p.sampler)
        logger.info(
            f"training {mcfg.kind} generator {mcfg.name} for {config.max_steps} steps, {info.world_size} process(es) "
            f"on {device.type}, effective batch {window.samples_per_step}, {counts['total'] / 1e6:.2f}M parameters; "
            f"{len(train_set)} token grids of L={mcfg.num_positions} from {config.data.train} ({classes}, "
            f"{train_set.nbytes / 2**20:.1f} MiB in memory); {k_text}"
        )

    last_postfix: dict[str, float] = {}
    step = start_step
    stop = StopFlag()
    try:
        with stop:
            while step < config.max_steps:
                window.start_step()
                num_tokens = p.num_tokens(step)
                lr = begin_step(config=config, step=step, rank=info.rank, optimizers=[(p.optimizer, config.optim.lr)])
                _optimizer_step(
                    p,
                    config,
                    step=step,
                    num_tokens=num_tokens,
                    stream=stream,
                    window=window,
                    device=device,
                    guard=guard,
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
                    loss_key="loss",
                )
                if (
                    p.tokens.val is not None
                    and info.is_main
                    and (step % config.val_every == 0 or step == config.max_steps)
                ):
                    _validate(p, config, step=step, logger=logger, device=device)
                if checkpoint_if_due(
                    config=config,
                    step=step,
                    stop=stop,
                    device=device,
                    checkpointer=checkpointer,
                    stream=stream,
                    logger=logger,
                    model_config=mcfg.to_dict(),
                    meta={"preset": mcfg.name, "kind": mcfg.kind},
                ):
                    break
    finally:
        logger.close()

    what = "EMA generator" if p.ema is not None else "generator"
    export_dir = export_at_end(
        config=config, step=step, info=info, output_dir=output_dir, model=p.eval_model, what=what
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
        ema_model=p.ema.module if p.ema is not None else None,
    )


def _optimizer_step(
    p: _Parts,
    config: GeneratorTrainConfig,
    *,
    step: int,
    num_tokens: int,
    stream: BatchStream,
    window: MetricWindow,
    device: torch.device,
    guard: NonFiniteGuard,
) -> None:
    """One optimizer step over ``grad_accum`` micro-batches, all at ``num_tokens`` = K.

    A step whose loss or gradients are not finite updates nothing, the EMA included (``guard``).
    """
    run = p.run
    assert run is not None
    accum = config.grad_accum
    loss_sum = torch.zeros((), device=device)
    p.model.train()
    for micro in range(accum):
        batch = p.tokens.train.batch(stream.next(), num_tokens=num_tokens).to(device, non_blocking=True)
        # no_sync must cover the forward too: DDP decides there whether the backward all-reduces.
        with maybe_no_sync(run, sync=micro == accum - 1):
            with autocast(device, config.precision):
                out = run(
                    indices=batch.indices,
                    assignment=batch.assignment,
                    labels=p.labels(batch.labels),
                    num_tokens=num_tokens,
                )
            p.scaler.scale(out.loss / accum).backward()
        window.add({"loss": out.loss.detach(), **out.losses}, scale=1.0 / accum)
        loss_sum = loss_sum + out.loss.detach().float()
    p.scaler.unscale_(p.optimizer)
    max_norm = config.grad_clip if config.grad_clip is not None else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(p.model.parameters(), max_norm)
    if guard.check(step=step, loss=loss_sum, grad_norm=grad_norm, scaler=p.scaler):
        guard.discard(p.optimizer, p.scaler)
        return
    p.scaler.step(p.optimizer)
    p.scaler.update()
    p.optimizer.zero_grad(set_to_none=True)
    if p.ema is not None:
        p.ema.update(p.model)
    window.add({"grad_norm": grad_norm.float()})


_VAL_STREAM = 0x7A1  # keys validation's random stream apart from the training streams


@torch.no_grad()
def _validate(
    p: _Parts, config: GeneratorTrainConfig, *, step: int, logger: TrainLogger, device: torch.device
) -> dict[str, float]:
    """Mean cross-entropy (sum over bit groups) and accuracy of the EMA (or raw) model on the fixed val subset.

    RandAR's orders and MaskGIT's masks come from a forked torch generator seeded from (seed, K): reproducible, the
    same at every validation, and invisible to the training stream.
    """
    val = p.tokens.val
    assert val is not None
    model = p.eval_model
    was_training = model.training
    model.eval()  # no dropout, no class dropout
    count = min(len(val), config.data.val_images)
    rows = torch.linspace(0, len(val) - 1, count).round().long().unique()
    values: dict[str, float] = {}
    try:
        for k in p.tokens.levels:
            loss = accuracy = 0.0
            with forked_torch_rng(derive_seed(config.seed, _VAL_STREAM, k), device=device):
                for chunk in rows.split(config.batch_size):
                    batch = val.batch(chunk, num_tokens=k).to(device, non_blocking=True)
                    with autocast(device, config.precision):
                        out = model(
                            indices=batch.indices,
                            assignment=batch.assignment,
                            labels=p.labels(batch.labels),
                            num_tokens=k,
                        )
                    loss += float(out.loss) * len(chunk)
                    accuracy += float(out.losses["accuracy"]) * len(chunk)
            suffix = f"_k{k}" if p.sampler is not None else ""
            values[f"loss{suffix}"], values[f"accuracy{suffix}"] = loss / len(rows), accuracy / len(rows)
    finally:
        model.train(was_training)
    if p.sampler is not None:  # MergeAR, RandAR: also the mean over the merge levels
        values["loss"] = sum(values[f"loss_k{k}"] for k in p.tokens.levels) / len(p.tokens.levels)
        values["accuracy"] = sum(values[f"accuracy_k{k}"] for k in p.tokens.levels) / len(p.tokens.levels)
    logger.scalars(step=step, values=values, prefix="val")
    per_k = ", ".join(f"K={k} {values[f'loss_k{k}']:.4f}" for k in p.tokens.levels) if p.sampler is not None else ""
    detail = f" ({per_k})" if per_k else ""
    logger.info(f"step {step}: val loss {values['loss']:.4f}{detail}, accuracy {values['accuracy']:.4f}")
    return values
