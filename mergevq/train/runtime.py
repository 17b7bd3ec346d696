"""The parts every training loop shares: process set-up, precision, optimizers, DDP, stopping, data position, metrics.

A loop (``train/tokenizer.py``, ``train/generator.py``) is, in order::

    info = init_distributed(...); configure_determinism(...); prepare_output_dir(...)
    build modules (seeded) → build_optimizer / make_scaler → Checkpointer(...).resume()
    stream = BatchStream(make_loader(...)); model = wrap_ddp(...); window = MetricWindow(...)
    with StopFlag() as stop:
        while step < max_steps: forward under autocast(...), backward (maybe_no_sync), scaler.unscale_, clip,
            guard.check(...) (skip the update of a non-finite step), step, window.add(...),
            log when due, checkpointer.save(...) when due or any_rank(stop.requested)

``prepare_output_dir`` locks the output directory (:mod:`mergevq.train.output_lock`); the ``preserve_torch_settings``
scope around the run releases it. Problems that stop a run are :class:`~mergevq.train.errors.RunError` subclasses
with one-line messages (the training commands print them and exit 1).

Nothing here knows about tokenizers or generators.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from mergevq.data.images import set_loader_epoch
from mergevq.train import checkpoint as ckpt
from mergevq.train import distributed as du
from mergevq.train.errors import OutputDirBusy, RunError, TrainingDiverged
from mergevq.train.output_lock import locks_released_on_exit, release_output_dir, take_output_lock

__all__ = [
    "BatchStream",
    "MetricWindow",
    "NonFiniteGuard",
    "OutputDirBusy",
    "RunError",
    "StopFlag",
    "TrainingDiverged",
    "WindowMeans",
    "any_rank",
    "autocast",
    "build_optimizer",
    "configure_determinism",
    "make_scaler",
    "maybe_no_sync",
    "prepare_output_dir",
    "preserve_torch_settings",
    "release_output_dir",
    "wrap_ddp",
]

Precision = Literal["fp32", "bf16", "fp16"]


# ----------------------------------------------------------------------------------------------------------------------
# Process set-up
# ----------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def preserve_torch_settings() -> Iterator[None]:
    """Restore the process-wide state a run changes on exit: thread count, deterministic algorithms, and the output
    directory locks taken inside the block (:func:`prepare_output_dir`), so that the next run, in this process or
    another, may use the directory."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        with locks_released_on_exit():
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def configure_determinism(*, device: torch.device, deterministic: bool, threads: int | None) -> None:
    """Deterministic kernels (bit-exact resume on the same hardware), or the fast ones (cuDNN autotune, TF32)."""
    if threads is not None:
        torch.set_num_threads(threads)
    if deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def prepare_output_dir(output_dir: str | Path, *, info: du.DistInfo, lock: bool = True) -> Path:
    """Create ``output_dir``, lock it for this run, clear leftovers of interrupted checkpoint writes, synchronise.

    Rank 0 is the only writer of ``output_dir``. It takes an exclusive lock on ``output_dir/.lock`` (holding its
    pid), so a second run on the same directory stops with :class:`OutputDirBusy` instead of interleaving
    checkpoints; the lock lasts until :func:`release_output_dir` or the end of the process. An output_dir that
    cannot be created or written is a one-line :class:`RunError`.
    """
    path = Path(output_dir)
    if info.is_main:
        if path.exists() and not path.is_dir():
            raise RunError(f"output_dir {path} exists and is not a directory")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"output_dir {path}: cannot create it ({e.strerror or e})") from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise RunError(f"output_dir {path} is not writable")
        if lock:
            take_output_lock(path)
        ckpt.remove_stale(path / "checkpoints")
    du.barrier()
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Precision and optimizers
# ----------------------------------------------------------------------------------------------------------------------


def autocast(device: torch.device, precision: Precision | str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass (``fp32``: no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(device: torch.device, precision: Precision | str) -> torch.amp.GradScaler:
    """A GradScaler, enabled for fp16 only (a disabled one passes ``scale``/``step`` through unchanged)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def build_optimizer(
    params: Iterable[nn.Parameter],
    *,
    kind: Literal["adam", "adamw"] | str,
    lr: float,
    betas: tuple[float, float],
    eps: float = 1.0e-8,
    weight_decay: float = 0.0,
    decay_matrices_only: bool = False,
) -> torch.optim.Optimizer:
    """Adam or AdamW over ``params`` (those without ``requires_grad`` are left out).

    ``decay_matrices_only``: weight decay on parameters with two or more dimensions only (linear and conv weights,
    embeddings), none on biases and norm gains, the usual GPT recipe. The two groups keep a fixed order, so
    optimizer state saved by one run loads into the next.
    """
    if kind not in ("adam", "adamw"):
        raise ValueError(f"optimizer must be 'adam' or 'adamw', got {kind!r}")
    trainable = [p for p in params if p.requires_grad]
    groups: list[dict[str, Any]]
    if decay_matrices_only:
        groups = [
            {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ]
    else:
        groups = [{"params": trainable, "weight_decay": weight_decay}]
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    return cls(groups, lr=lr, betas=tuple(betas), eps=eps)


# ----------------------------------------------------------------------------------------------------------------------
# DDP
# ----------------------------------------------------------------------------------------------------------------------


def wrap_ddp(module: nn.Module, *, info: du.DistInfo, find_unused_parameters: bool = False) -> nn.Module:
    """``DistributedDataParallel(module)`` under torchrun with several processes; the module itself otherwise."""
    if info.world_size <= 1:
        return module
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(module, device_ids=ids, find_unused_parameters=find_unused_parameters)


def maybe_no_sync(module: nn.Module, *, sync: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if sync or not isinstance(module, DDP):
        return contextlib.nullcontext()
    return module.no_sync()


def any_rank(flag: bool, *, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (so all ranks stop, or save, together)."""
    if not du.is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


# ----------------------------------------------------------------------------------------------------------------------
# Stopping on a signal
# ----------------------------------------------------------------------------------------------------------------------


class StopFlag:
    """Set by SIGTERM/SIGINT: the loop saves a checkpoint after the current step and exits. A second signal aborts.

    Use as a context manager (handlers installed on enter, the previous ones restored on exit); ``signum`` keeps the
    first signal received, for the exit status.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                continue

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> StopFlag:
        self.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()


# ----------------------------------------------------------------------------------------------------------------------
# Non-finite steps
# ----------------------------------------------------------------------------------------------------------------------


def _warn0(message: str) -> None:
    if du.is_main_process():
        print(message, file=sys.stderr, flush=True)


class NonFiniteGuard:
    """Keeps NaN/inf out of the weights: a step with a non-finite loss or gradient is skipped, with a warning.

    After backward (and ``scaler.unscale_(optimizer)``, clipping) and before ``scaler.step(optimizer)``::

        if guard.check(step=step, loss=loss_sum, grad_norm=grad_norm, scaler=scaler):
            guard.discard(optimizer, scaler)  # no update (and no EMA update) for this step
        else:
            scaler.step(optimizer); scaler.update()

    More than ``max_skips`` skipped steps in a run raise :class:`TrainingDiverged`. Under fp16 a non-finite gradient
    with a finite loss is the GradScaler's overflow, which it skips and answers by lowering its scale: not counted,
    unless the scale has already fallen below ``min_scale`` (then it is not an overflow any more). The decision is
    taken jointly by all ranks (one small collective), and the count is part of the checkpoint (``state_dict``).
    """

    def __init__(self, *, max_skips: int, min_scale: float = 2.0**-14, report: Callable[[str], None] = _warn0) -> None:
        if max_skips < 0:
            raise ValueError(f"max_skips must be >= 0, got {max_skips}")
        self.max_skips = int(max_skips)
        self.min_scale = float(min_scale)
        self.report = report
        self.skipped = 0  # skipped steps so far in this run (resumed runs included)

    def check(
        self,
        *,
        step: int,
        loss: Tensor | float,
        grad_norm: Tensor | float | None = None,
        scaler: torch.amp.GradScaler | None = None,
        what: str = "loss",
    ) -> bool:
        """True when this step must be skipped (``step``: completed steps before it, as the loop counts)."""
        device = next((t.device for t in (loss, grad_norm) if isinstance(t, Tensor)), torch.device("cpu"))
        norm = 0.0 if grad_norm is None else grad_norm
        values = torch.stack([torch.as_tensor(v, device=device).detach().float().reshape(()) for v in (loss, norm)])
        finite = torch.isfinite(values).float()
        if du.is_distributed():  # every rank must take the same branch: skipping is collective
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        loss_ok, grad_ok = (bool(v) for v in finite.tolist())  # the one device sync
        if loss_ok and grad_ok:
            return False
        if loss_ok and scaler is not None and scaler.is_enabled() and scaler.get_scale() >= self.min_scale:
            return False  # fp16 overflow: GradScaler.step skips it and lowers the scale
        self.skipped += 1
        shown = ", ".join(f"{name} {v:.4g}" for name, v in zip((what, "grad norm"), values.tolist()))
        if self.skipped > self.max_skips:
            raise TrainingDiverged(
                f"training diverged: non-finite {what} or gradients at step {step + 1} ({shown}), and "
                f"{self.max_skips} step(s) were skipped already (nonfinite.max_skips={self.max_skips}); the newest "
                "checkpoint holds finite weights: resume with a lower optim.lr (and resume.allow_changes=true)"
            )
        self.report(
            f"warning: non-finite {what} or gradients at step {step + 1} ({shown}); skipping its update "
            f"({self.skipped} of at most {self.max_skips} in this run)"
        )
        return True

    @staticmethod
    def discard(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None) -> None:
        """Drop the step's gradients (the optimizer does not step); ``scaler`` must have been ``unscale_``-d."""
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.update()  # ends the scaler's step (lowering its scale when it found an inf)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: Mapping[str, Any], /) -> None:
        self.skipped = int(state.get("skipped", 0))

    @staticmethod
    def snapshot(*modules: nn.Module | None) -> Callable[[], None]:
        """Copies of the buffers of ``modules``; call the result to put them back when the step is skipped.

        A forward in training mode updates state that no optimizer owns (BatchNorm statistics, LeCAM anchors,
        centering vectors): a non-finite forward must not leave NaN there.
        """
        saved = [(b, b.detach().clone()) for m in modules if m is not None for b in m.buffers()]

        def restore() -> None:
            with torch.no_grad():
                for buffer, copy in saved:
                    buffer.copy_(copy)

        return restore


# ----------------------------------------------------------------------------------------------------------------------
# Data position
# ----------------------------------------------------------------------------------------------------------------------


class BatchStream:
    """Endless micro-batches from a ``make_loader`` loader, remembering the position as (epoch, batch within epoch).

    The position is what a checkpoint stores; a stream built from it continues with exactly the next batch.
    """

    def __init__(self, loader: Any, *, epoch: int = 0, batch_in_epoch: int = 0) -> None:
        self.loader = loader
        set_loader_epoch(loader, epoch=0, start_batch=0)
        self.batches_per_epoch = len(loader)
        if self.batches_per_epoch == 0:
            raise ValueError("the training set yields no full batch; lower batch_size or add data")
        self.epoch = epoch
        self.batch_in_epoch = batch_in_epoch
        if batch_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = epoch + 1, 0
        self._it: Iterator[Any] | None = None

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "batches_per_epoch": self.batches_per_epoch}

    def next(self) -> Any:
        while True:
            if self._it is None:
                set_loader_epoch(self.loader, epoch=self.epoch, start_batch=self.batch_in_epoch)
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
# Metrics and throughput
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowMeans:
    values: dict[str, float]  # per-step means over the window, averaged over ranks
    samples_per_s: float  # all ranks together, over the window's training time


class MetricWindow:
    """Sums of per-step scalars between two log lines, and the training throughput.

    Values stay tensors on the device while they accumulate, so a step never waits for the GPU; the sums are read
    (and averaged over ranks, in one collective) only by :meth:`reduce`, once per log line.
    """

    def __init__(self, *, device: torch.device, samples_per_step: int) -> None:
        self.device = device
        self.samples_per_step = samples_per_step  # over all ranks
        self._sums: dict[str, Tensor | float] = {}
        self._steps = 0
        self._seconds = 0.0
        self._started = 0.0
        self.total_steps = 0
        self.total_seconds = 0.0

    def start_step(self) -> None:
        self._started = time.perf_counter()

    def add(self, values: Mapping[str, Tensor | float], *, scale: float = 1.0) -> None:
        for key, value in values.items():
            term = value.detach() * scale if isinstance(value, Tensor) else float(value) * scale
            self._sums[key] = self._sums.get(key, 0.0) + term

    def end_step(self, *, sync: bool = False) -> None:
        """Close the step's timing; ``sync`` waits for the GPU first (do it on the steps that log)."""
        if sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self._started
        self._steps += 1
        self._seconds += seconds
        self.total_steps += 1
        self.total_seconds += seconds

    def reduce(self) -> WindowMeans:
        """Means since the last call (over steps, then ranks: a collective), and the window's throughput."""
        steps = max(self._steps, 1)
        values = du.all_reduce_mean({k: v / steps for k, v in self._sums.items()}, device=self.device)
        rate = self.samples_per_step * self._steps / max(self._seconds, 1e-9)
        self._sums, self._steps, self._seconds = {}, 0, 0.0
        return WindowMeans(values=values, samples_per_s=rate)

    @property
    def run_samples_per_s(self) -> float | None:
        """Throughput over every step this process timed (None before the first)."""
        if self.total_seconds <= 0:
            return None
        return self.samples_per_step * self.total_steps / self.total_seconds
