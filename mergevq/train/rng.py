"""One way to derive seeds, and the global RNG states a checkpoint carries.

Every random stream in training is keyed on integers: (seed, step, rank) for the loop, (seed, epoch, index) for the
data pipeline. :func:`derive_seed` turns such a tuple into one seed, so that a resumed run regenerates exactly the
streams an uninterrupted one would have used. This module imports nothing from the package, so the data modules can
use it without import cycles.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["derive_seed", "forked_torch_rng", "reseed_globals", "rng_state", "set_rng_state"]

_MASK_63 = (1 << 63) - 1


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixing integer parts (SeedSequence: tuples that differ anywhere give unrelated streams).

    63 bits fit every consumer as is: ``torch.Generator.manual_seed``, ``random.Random`` and NumPy's generators.
    """
    state = np.random.SeedSequence([int(p) % (1 << 63) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & _MASK_63


def reseed_globals(seed: int) -> None:
    """Seed the torch (CPU and CUDA), ``random`` and NumPy global generators."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))


@contextlib.contextmanager
def forked_torch_rng(seed: int, *, device: torch.device) -> Iterator[None]:
    """Run a block on torch's CPU generator (and ``device``'s, when CUDA) seeded with ``seed``; their states are put
    back after it, so the block is reproducible and the surrounding random stream does not notice it ran."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        if cuda:  # only this device: fork_rng restores only the devices it was given
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain containers (loadable with ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [py_version, list(py_internal), py_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (the CUDA part only where CUDA is available)."""
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
