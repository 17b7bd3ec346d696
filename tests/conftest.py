"""Shared fixtures: real CIFAR-10 images located through an environment variable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One BLAS/OpenMP thread per test process: tests start DDP workers and DataLoader workers beside the main process, and
# on a 2-core machine oversubscribed OpenMP threads spin against each other (small ops then run 10-80x slower).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

_DEFAULT_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def cifar10_path() -> Path:
    """Where the CIFAR-10 ImageFolder lives (``MERGEVQ_CIFAR10``, else ``../shared/data/cifar10``)."""
    return Path(os.environ.get("MERGEVQ_CIFAR10", _DEFAULT_CIFAR10))


torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    root = cifar10_path()
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        pytest.skip(f"CIFAR-10 not found at {root} (set MERGEVQ_CIFAR10 to an ImageFolder with train/ and test/)")
    return root


@pytest.fixture(scope="session")
def mergevq_cli():
    """Run the real ``mergevq`` command in-process: ``mergevq_cli("sample", "--help")`` returns the exit code."""
    import mergevq.cli

    def run(*argv: str | Path) -> int:
        args = mergevq.cli.build_parser().parse_args([str(a) for a in argv])
        return args.func(args)

    return run


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny-32 tokenizer saved with ``save_pretrained`` (seeded: the same weights every run)."""
    from mergevq import MergeVQ

    torch.manual_seed(0)
    return MergeVQ.from_preset("tiny-32").save_pretrained(tmp_path_factory.mktemp("tiny_tokenizer"))
