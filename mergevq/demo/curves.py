"""Training curves of the demo's two runs, read back from the runs' ``logs/train.jsonl``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mergevq.eval.plots import line_plot

__all__ = ["Curve", "plot_curves", "read_log"]


@dataclass(frozen=True)
class Curve:
    split: str  # "train" or "val"
    key: str  # the logged value, e.g. "reconstruction", "psnr_k64", "loss"
    label: str  # legend text


def read_log(path: Path) -> list[dict]:
    """The rows of a run's ``train.jsonl``; a resumed run's rewritten steps keep their last value."""
    rows: dict[tuple[str, int], dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[(row["split"], row["step"])] = row
    return [rows[key] for key in sorted(rows, key=lambda key: (key[0], key[1]))]


def plot_curves(*, log: Path, curves: Sequence[Curve], output: Path, title: str, y_label: str) -> Path | None:
    """One plot of the logged ``curves`` against the optimizer step; None when none of them was logged."""
    rows = read_log(log)
    series = {
        curve.label: [(row["step"], row[curve.key]) for row in rows if row["split"] == curve.split and curve.key in row]
        for curve in curves
    }
    series = {label: points for label, points in series.items() if points}
    if not series:
        return None
    many = max(len(points) for points in series.values()) > 12
    return line_plot(
        output,
        title=title,
        x_label="optimizer step",
        y_label=y_label,
        series=series,
        x_ticks="auto",
        markers=not many,  # a long curve reads better as a plain line
    )
