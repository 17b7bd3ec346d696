"""Shared fixtures: real CIFAR-10 images located through an environment variable, the ``mergevq`` command run
in-process, a small saved tokenizer, and killing a training subprocess at a chosen step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
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


def _last_logged_step(log: Path) -> int:
    """The highest training step in a run's ``train.jsonl`` so far (-1 before the first); a line still being
    written is ignored."""
    if not log.is_file():
        return -1
    last = -1
    for line in log.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("split") == "train":
            last = max(last, int(row["step"]))
    return last


@pytest.fixture(scope="session")
def kill_after_step() -> Callable[..., None]:
    """``kill_after_step(process, run_dir=..., step=s)``: SIGKILL a training subprocess as soon as its
    ``logs/train.jsonl`` shows step ``s`` (the run must log every step).

    The kill lands at the same point of the run however loaded the machine is (a fixed delay in seconds would hit
    another step, or the end of the run, on a slower or faster machine), and still while the run is going.
    """

    def kill(process: subprocess.Popen, *, run_dir: Path, step: int, timeout: float = 180.0) -> None:
        log = run_dir / "logs" / "train.jsonl"
        deadline = time.monotonic() + timeout
        while _last_logged_step(log) < step:
            if process.poll() is not None:
                output = process.stdout.read().decode() if process.stdout else ""
                raise AssertionError(f"the run ended (code {process.returncode}) before step {step}: {output}")
            assert time.monotonic() < deadline, f"step {step} was not logged within {timeout:.0f} s"
            time.sleep(0.005)
        assert process.poll() is None, f"the run finished right after step {step}; kill at an earlier step"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        assert process.returncode == -signal.SIGKILL

    return kill
