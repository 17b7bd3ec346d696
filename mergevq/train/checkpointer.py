"""Exact save and resume of a training run, on top of the atomic checkpoint files of :mod:`mergevq.train.checkpoint`.

A :class:`Checkpointer` is told once which modules (safetensors files) and which stateful objects (optimizers,
GradScalers: entries of ``state.pt``) make up the run. Then ``save`` writes them with the data position, every
rank's RNG state and whatever per-rank extras the loop adds, and ``resume`` puts all of it back, so a resumed run
continues bit for bit where the saved one stopped. Rank 0 writes; all ranks take part (the per-rank states are
gathered).

``state.pt`` keys written here: ``epoch``, ``batch_in_epoch``, ``batches_per_epoch``, ``world_size``, ``ranks`` (one
dict per rank: ``rng`` + the loop's extras), one entry per tracked state object, and the loop's extra entries
(typically the model and training configs as JSON strings).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from mergevq.train import checkpoint as ckpt
from mergevq.train import distributed as du
from mergevq.train.rng import rng_state, set_rng_state
from mergevq.train.runtime import BatchStream

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
            such as a frozen alignment teacher).
        states: ``state.pt`` key → object with ``state_dict``/``load_state_dict`` (optimizers, GradScalers).
        keep_last: how many checkpoints to keep.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        info: du.DistInfo,
        modules: Mapping[str, nn.Module | None],
        states: Mapping[str, Stateful],
        keep_last: int,
    ) -> None:
        self.root = Path(root)
        self.info = info
        self.modules = {stem: m for stem, m in modules.items() if m is not None}
        self.states = dict(states)
        self.keep_last = keep_last
        self.latest: Path | None = None  # the newest checkpoint written or resumed from

    def resume(self, *, check: Callable[[dict[str, Any], Path], None] | None = None) -> Resumed | None:
        """Load the newest checkpoint into the tracked objects and this rank's RNG; None when there is none.

        ``check(state, path)`` runs before anything is loaded (e.g. refuse a checkpoint of another model).
        """
        found = ckpt.find_latest(self.root)
        if found is None:
            return None
        state = ckpt.load_state(found.path)
        if check is not None:
            check(state, found.path)
        for stem, module in self.modules.items():
            ckpt.load_module(module, found.path, stem)
        for key, obj in self.states.items():
            obj.load_state_dict(state[key])
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
        return resumed

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
        ranks = du.all_gather_objects({"rng": rng_state(), **(rank_extra or {})})
        path = None
        if self.info.is_main:
            weights = {stem: module.state_dict() for stem, module in self.modules.items()}
            state = {
                **stream.position(),
                "world_size": self.info.world_size,
                **{key: obj.state_dict() for key, obj in self.states.items()},
                "ranks": ranks,
                **(extra or {}),
            }
            summary = {"epoch": stream.epoch, "batch_in_epoch": stream.batch_in_epoch, **(meta or {})}
            path = ckpt.save_checkpoint(
                self.root, step=step, weights=weights, state=state, meta=summary, keep_last=self.keep_last
            )
            self.latest = path
        du.barrier()
        return path
