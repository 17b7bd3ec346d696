"""Process-group set-up for ``torchrun`` and the few collective helpers the training loop needs.

A plain ``python`` launch (no ``WORLD_SIZE`` in the environment) runs as a single process without a process group;
every helper then degrades to the obvious single-process behaviour.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_gather_objects",
    "all_reduce_mean",
    "barrier",
    "cleanup",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "print0",
    "rank",
    "world_size",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(*, device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).

    ``device``: "auto" (CUDA if available, one GPU per local rank), "cpu" or "cuda". The backend is NCCL on CUDA and
    gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank_ = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but CUDA is not available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    return DistInfo(rank=rank_, world_size=world, local_rank=local_rank, device=dev)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (flushed, so it interleaves sensibly with progress bars and subprocess pipes)."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(values: dict[str, float | torch.Tensor], *, device: torch.device) -> dict[str, float]:
    """Mean of each scalar over ranks (one collective for the whole dict); returns Python floats."""
    if not values:
        return {}
    keys = sorted(values)
    stacked = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked /= world_size()
    return {k: float(v) for k, v in zip(keys, stacked.tolist())}


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list without a process group)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
