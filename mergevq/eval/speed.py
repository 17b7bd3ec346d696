"""Timing helpers for ``mergevq benchmark``: warm-up, repeats, medians, throughput and a description of the machine.

Shared machines are noisy, so every figure is a median over ``repeats`` timed calls after ``warmup`` untimed ones,
reported with its min and max. GPU work is synchronised before and after each call so asynchronous kernels are
inside the measured interval.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["MALLOC_ENV", "Timing", "machine_info", "peak_memory_mb", "reset_peak_memory", "time_callable"]

# glibc returns freed memory to the OS between iterations unless told otherwise, and allocation-heavy steps then
# swing 10-20x between runs (docs/ENVIRONMENT.md). Set these in the benchmark process's environment.
MALLOC_ENV = {
    "MALLOC_TRIM_THRESHOLD_": "1000000000",
    "MALLOC_MMAP_THRESHOLD_": "1000000000",
    "MALLOC_TOP_PAD_": "1000000000",
}


@dataclass(frozen=True)
class Timing:
    """Wall times of ``repeats`` calls (seconds), after ``warmup`` untimed calls."""

    times_s: tuple[float, ...]
    warmup: int

    @property
    def repeats(self) -> int:
        return len(self.times_s)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)

    @property
    def max_s(self) -> float:
        return max(self.times_s)

    def items_per_second(self, items: int) -> dict[str, float]:
        """Throughput for ``items`` processed per call: median, and the range given by the slowest/fastest call."""
        return {"median": items / self.median_s, "min": items / self.max_s, "max": items / self.min_s}

    def to_dict(self, *, items: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "median_ms": self.median_s * 1e3,
            "min_ms": self.min_s * 1e3,
            "max_ms": self.max_s * 1e3,
            "repeats": self.repeats,
            "warmup": self.warmup,
            "times_ms": [t * 1e3 for t in self.times_s],
        }
        if items is not None:
            out["items_per_call"] = items
            out["items_per_s"] = self.items_per_second(items)
        return out


def _synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(
    fn: Callable[[], object], *, warmup: int = 2, repeats: int = 5, device: torch.device | None = None
) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (``time.perf_counter``)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    for _ in range(warmup):
        fn()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return Timing(times_s=tuple(times), warmup=warmup)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(*, device: torch.device | None = None) -> dict[str, Any]:
    """Where a figure was measured: software versions, CPU, threads, GPU, and whether the malloc settings were on."""
    cuda = device is not None and device.type == "cuda"
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(terse=True),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device) if device is not None else None,
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "malloc_env": all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return info


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak GPU memory allocated since the last reset (cuda), and the process's peak RSS (never decreases)."""
    out: dict[str, float] = {}
    if device.type == "cuda":
        out["gpu_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        out["process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:  # not on POSIX
        pass
    return out
