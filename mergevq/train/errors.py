"""Problems that stop a training run; the training commands print their one-line message and exit 1."""

from __future__ import annotations

__all__ = ["OutputDirBusy", "RunError", "TrainingDiverged"]


class RunError(RuntimeError):
    """A problem that stops a run, with a one-line message (the training commands print it and exit 1)."""


class TrainingDiverged(RunError):
    """Loss or gradients stayed non-finite (:class:`~mergevq.train.runtime.NonFiniteGuard`), or the weights did."""


class OutputDirBusy(RunError):
    """Another live process holds the output directory's lock."""
