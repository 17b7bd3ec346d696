"""Exact save and resume of a training run, on top of the atomic checkpoint files of :mod:`mergevq.train.checkpoint`.

A :class:`Checkpointer` is told once which modules (safetensors files) and which stateful objects (optimizers,
GradScalers: entries of ``state.pt``) make up the run. Then ``save`` writes them with the data position, every
rank's RNG state and whatever per-rank extras the loop adds, and ``resume`` puts all of it back, so a resumed run
continues bit for bit where the saved one stopped. Rank 0 writes; all ranks take part (the per-rank states are
gathered).

``state.pt`` keys written here: ``epoch``, ``batch_in_epoch``, ``batches_per_epoch``, ``world_size``, ``ranks`` (one
dict per rank: ``rng`` + the loop's extras), one entry per tracked state object, ``train_config`` (the recipe, as
JSON), ``nonfinite`` (the :class:`~mergevq.train.runtime.NonFiniteGuard` count) and the loop's extra entries.

Guarantees every loop gets from here: weights or optimizer state holding NaN/inf are never saved
(:class:`~mergevq.train.runtime.TrainingDiverged`); a damaged newest checkpoint is reported in one line and the next
older intact one resumed; a run resumed with a changed recipe is refused unless allowed
(:func:`~mergevq.train.config_io.check_resume`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from mergevq.train import checkpoint as ckpt
from mergevq.train import distributed as du
from mergevq.train.config_io import RESUME_SAFE_KEYS, changes_text, check_resume, config_to_dict
from mergevq.train.rng import rng_state, set_rng_state
from mergevq.train.runtime import BatchStream, NonFiniteGuard, RunError, TrainingDiverged

__all__ = ["Checkpointer", "Resumed", "Stateful"]


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any], /) -> Any: ...


@dataclass(frozen=True)
class Resumed:
    step: int  # completed optimizer steps
    epoch: int  # data position to continue from
    batch_in_epoch: int
    path: Path  # the checkpoint directory
    state: dict[str, Any] = field(repr=False)  # the whole state.pt (configs, world size, the loop's extras)
    rank_state: dict[str, Any] = field(repr=False)  # this rank's entry of state["ranks"]; its RNG is already restored


class Checkpointer:
    """Save/resume of ``output_dir/checkpoints`` for one run.

    Args:
        root: the checkpoint directory (``output_dir/checkpoints``).
        info: this process's rank and world size.
        modules: file stem → module, written as ``<stem>.safetensors``; ``None`` leaves a stem out (an optional part
            such as a frozen alignment teacher, or the EMA of a run without one).
        substitutes: stem → stem read in its place when a checkpoint does not hold it, e.g. ``{"ema": "model"}``: a
            run that turned its EMA on starts the average from the checkpoint's weights.
        states: ``state.pt`` key → object with ``state_dict``/``load_state_dict`` (optimizers, GradScalers).
        keep_last: how many checkpoints to keep.
        guard: the run's non-finite step counter, saved and restored with the rest.
        recipe: the run's recipe (a dataclass or a plain dict), saved as ``train_config``; a resume compares it with
            the checkpoint's and refuses changes outside ``resume_safe_keys`` unless ``allow_recipe_changes``.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        info: du.DistInfo,
        modules: Mapping[str, nn.Module | None],
        states: Mapping[str, Stateful],
        substitutes: Mapping[str, str] | None = None,
        keep_last: int,
        guard: NonFiniteGuard | None = None,
        recipe: Any = None,
        allow_recipe_changes: bool = False,
        resume_safe_keys: Iterable[str] = RESUME_SAFE_KEYS,
    ) -> None:
        self.root = Path(root)
        self.info = info
        self.modules = {stem: m for stem, m in modules.items() if m is not None}
        self.states = dict(states)
        self.substitutes = dict(substitutes or {})
        self.keep_last = keep_last
        self.guard = guard
        self.recipe = config_to_dict(recipe) if dataclasses.is_dataclass(recipe) else recipe
        self.allow_recipe_changes = allow_recipe_changes
        self.resume_safe_keys = tuple(resume_safe_keys)
        self.latest: Path | None = None  # the newest checkpoint written or resumed from

    def resume(self, *, check: Callable[[dict[str, Any], Path], None] | None = None) -> Resumed | None:
        """Load the newest intact checkpoint into the tracked objects and this rank's RNG; None when there is none.

        ``check(state, path)`` runs on ``state.pt`` before the weights are verified (e.g. refuse a checkpoint of
        another model), then the recipe check; their errors propagate. Then every part is verified
        (:func:`~mergevq.train.checkpoint.read_newest`: checksums, readability, shapes, finite weights); a damaged
        checkpoint is reported in one line and the next older one used.
        """
        report = _warn0 if self.info.is_main else _quiet
        notes: list[str] = []

        def vet(state: dict[str, Any], path: Path) -> None:  # before the weights: another model is not damage
            if check is not None:
                check(state, path)
            notes[:] = self._check_recipe(state, path)

        found = ckpt.read_newest(
            self.root, parts=self.modules, substitutes=self.substitutes, check=vet, fits=self._fits, report=report
        )
        chosen = du.all_gather_objects(None if found is None else str(found.path))
        if len(set(chosen)) > 1:  # e.g. a file system that shows ranks different files
            raise RunError(f"the processes of this run would resume from different checkpoints: {chosen}")
        if found is None:
            return None
        state = found.state
        for stem, module in self.modules.items():
            module.load_state_dict(found.weights[stem])
        for key, obj in self.states.items():
            obj.load_state_dict(state[key])
        if self.guard is not None:
            self.guard.load_state_dict(state.get("nonfinite", {}))
        ranks = state["ranks"]
        # A run resumed on more processes than it was saved with gives the extra ranks rank 0's state.
        mine = ranks[self.info.rank] if self.info.rank < len(ranks) else ranks[0]
        set_rng_state(mine["rng"])
        self.latest = found.path
        resumed = Resumed(
            step=int(state["step"]),
            epoch=int(state["epoch"]),
            batch_in_epoch=int(state["batch_in_epoch"]),
            path=found.path,
            state=state,
            rank_state=mine,
        )
        if self.info.is_main:
            print(f"Resuming from step {resumed.step} ({found.path})", flush=True)
            if int(state["world_size"]) != self.info.world_size:
                print(
                    f"warning: the checkpoint was written by {state['world_size']} process(es), this run has "
                    f"{self.info.world_size}: data order and per-rank random streams will differ from the original run",
                    flush=True,
                )
            for stem, other in found.substituted.items():
                notes.append(f"the checkpoint holds no {stem} weights: {stem} starts from its {other} weights")
            for note in notes:
                print(note, file=sys.stderr if note.startswith("warning") else sys.stdout, flush=True)
        return resumed

    def _fits(self, loaded: ckpt.LoadedCheckpoint) -> None:
        for stem, module in self.modules.items():
            try:
                ckpt.check_fits(module, loaded.weights[stem], loaded.file(stem))
            except ValueError as e:
                raise ckpt.CheckpointDamaged(str(e)) from None

    def _check_recipe(self, state: dict[str, Any], path: Path) -> list[str]:
        """Refuse a changed recipe (ConfigError) unless allowed; returns the lines that report the changes."""
        if self.recipe is None or "train_config" not in state:
            return []
        saved = json.loads(state["train_config"])
        harmless, other = check_resume(
            saved,
            self.recipe,
            allow_changes=self.allow_recipe_changes,
            source=f"checkpoint {path}",
            safe=self.resume_safe_keys,
        )
        notes = []
        if harmless:
            notes.append(f"changed settings: {changes_text(harmless)}")
        if other:
            notes.append(f"warning: resuming with a changed recipe (resume.allow_changes=true): {changes_text(other)}")
        return notes

    def save(
        self,
        *,
        step: int,
        stream: BatchStream,
        rank_extra: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Path | None:
        """Write a checkpoint after ``step`` optimizer steps (collective); returns its path on rank 0.

        ``rank_extra``: this rank's own state besides its RNG (tensors and plain containers), gathered to rank 0.
        ``extra``: more ``state.pt`` entries (rank 0's are written). ``meta``: more ``meta.json`` fields.
        """
        # Checked on every rank (DDP keeps them identical), so that all ranks stop together rather than wait for a
        # rank 0 that refused to write.
        bad = ckpt.first_nonfinite(
            [(f"{stem}.{k}", v) for stem, m in self.modules.items() for k, v in m.state_dict().items()]
            + list(ckpt.nested_tensors({key: obj.state_dict() for key, obj in self.states.items()}))
        )
        if bad is not None:
            last = f"; the newest checkpoint is {self.latest}" if self.latest is not None else ""
            raise TrainingDiverged(f"at step {step}: {bad} holds NaN/inf values, so it is not checkpointed{last}")
        ranks = du.all_gather_objects({"rng": rng_state(), **(rank_extra or {})})
        path = None
        if self.info.is_main:
            weights = {stem: module.state_dict() for stem, module in self.modules.items()}
            state = {
                **stream.position(),
                "world_size": self.info.world_size,
                **{key: obj.state_dict() for key, obj in self.states.items()},
                "ranks": ranks,
            }
            if self.guard is not None:
                state["nonfinite"] = self.guard.state_dict()
            if self.recipe is not None:
                state["train_config"] = json.dumps(self.recipe, default=list)
            state.update(extra or {})
            summary = {"epoch": stream.epoch, "batch_in_epoch": stream.batch_in_epoch, **(meta or {})}
            path = ckpt.save_checkpoint(
                self.root, step=step, weights=weights, state=state, meta=summary, keep_last=self.keep_last
            )
            self.latest = path
        du.barrier()
        return path


def _warn0(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _quiet(message: str) -> None:
    pass
