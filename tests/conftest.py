"""Shared fixtures: real CIFAR-10 images located through an environment variable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_DEFAULT_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def cifar10_path() -> Path:
    """Where the CIFAR-10 ImageFolder lives (``MERGEVQ_CIFAR10``, else ``../shared/data/cifar10``)."""
    return Path(os.environ.get("MERGEVQ_CIFAR10", _DEFAULT_CIFAR10))


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    root = cifar10_path()
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        pytest.skip(f"CIFAR-10 not found at {root} (set MERGEVQ_CIFAR10 to an ImageFolder with train/ and test/)")
    return root
