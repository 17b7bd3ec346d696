"""Helpers shared by the benchmark scripts: timing with medians, peak memory in a fresh process, result files.

Every benchmark writes ``benchmarks/results/<name>.json`` and ``<name>.md`` and reports ratios against a baseline
measured in the same run, because these machines are shared and absolute times drift.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# glibc otherwise returns memory to the OS between iterations and timings of allocation-heavy ops swing 10-20x.
MALLOC_ENV = {
    "MALLOC_TRIM_THRESHOLD_": "1000000000",
    "MALLOC_MMAP_THRESHOLD_": "1000000000",
    "MALLOC_TOP_PAD_": "1000000000",
}


def time_fn(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 5) -> dict[str, float]:
    """Median / min / max wall time of ``fn()`` in milliseconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "repeats": repeats}


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_isolated(module: str, function: str, kwargs: dict[str, Any], *, timeout: float = 1800) -> dict[str, Any]:
    """Run ``module.function(**kwargs)`` in a fresh Python process and return the dict it returns.

    A fresh process gives an honest peak-RSS figure (``ru_maxrss`` never goes down within a process).
    """
    code = (
        f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import importlib; "
        f"res = getattr(importlib.import_module({module!r}), {function!r})(**json.loads(sys.argv[1])); "
        "print('@@RESULT@@' + json.dumps(res))"
    )
    env = {**os.environ, **MALLOC_ENV}
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True, env=env, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{module}.{function}({kwargs}) failed:\n{proc.stderr[-4000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@"))
    return json.loads(line[len("@@RESULT@@") :])


def machine_info() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(
    name: str, *, title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str], notes: str = "", extra=None
) -> tuple[Path, Path]:
    """Write ``results/<name>.json`` (rows + machine info) and ``results/<name>.md`` (a titled table)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {"name": name, "title": title, "machine": machine_info(), "rows": list(rows), "extra": extra or {}}
    json_path = RESULTS_DIR / f"{name}.json"
    md_path = RESULTS_DIR / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2))
    md = f"## {title}\n\n{markdown_table(rows, columns)}\n"
    if notes:
        md += f"\n{notes.strip()}\n"
    md_path.write_text(md)
    print(md)
    return json_path, md_path
