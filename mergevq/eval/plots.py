"""Line plots as PNG files, drawn with matplotlib (the optional ``report`` extra: ``pip install mergevq[report]``).

One function serves the results page (sweeps over K: a marker per point, x ticks at the data's x values) and the
demo report (training curves: many points, automatic ticks). The output is a pure function of the arguments: the
figure is rendered off-screen at a fixed size and written by Pillow as plain RGB without metadata, so the same data
gives the same bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from PIL import Image

__all__ = ["COLORS", "line_plot"]

# matplotlib's default cycle (tab:blue, tab:red, tab:green, tab:orange, ...): a series keeps its colour on every plot.
COLORS: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (255, 127, 14),
    (148, 103, 189),
    (140, 86, 75),
)
_DPI = 100


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'mergevq[report]' (or pip install matplotlib)") from error
    matplotlib.use("Agg", force=True)  # off-screen: no display, the same pixels everywhere
    import matplotlib.pyplot as plt

    return plt


def _tick_label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        return f"{value:.0e}"
    return f"{value:.6g}"


def _clean(
    series: Mapping[str, Sequence[tuple[float, float | None]]], *, log_x: bool, log_y: bool
) -> dict[str, list[tuple[float, float | None]]]:
    """Points sorted by x; a missing, non-finite or (on a log axis) non-positive y becomes a gap (None)."""
    out = {}
    for name, values in series.items():
        points = []
        for x, y in values:
            if log_x and x <= 0:
                continue
            bad = y is None or not math.isfinite(y) or (log_y and y <= 0)
            points.append((float(x), None if bad else float(y)))
        out[name] = sorted(points, key=lambda p: p[0])
    return out


def line_plot(
    path: str | Path,
    *,
    title: str,
    x_label: str,
    y_label: str,
    series: Mapping[str, Sequence[tuple[float, float | None]]],
    log_x: bool = False,
    log_y: bool = False,
    size: tuple[int, int] = (800, 440),
    x_ticks: Literal["data", "auto"] = "data",
    markers: bool = True,
) -> Path:
    """Draw ``series`` (name → [(x, y)], y None for a gap) as lines and write an RGB PNG of ``size`` pixels.

    ``x_ticks="data"`` puts a tick at every x value (the K values of a sweep); ``"auto"`` leaves matplotlib's
    locator (training curves). Lines break at gaps; a point between two gaps still shows as its marker. With more
    than one series a legend sits right of the axes, so it never hides a line. Log axes drop non-positive values.

    Raises:
        ValueError: when no series has any x value.
        ImportError: without matplotlib.
    """
    points = _clean(series, log_x=log_x, log_y=log_y)
    xs = sorted({x for values in points.values() for x, _ in values})
    if not xs:
        raise ValueError(f"nothing to plot: no x values in {title!r}")
    plt = _pyplot()
    from matplotlib import ticker

    width, height = size
    with plt.rc_context({"font.size": 11, "axes.titlesize": 13}):
        fig, ax = plt.subplots(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
        try:
            for index, (name, values) in enumerate(points.items()):
                color = tuple(c / 255 for c in COLORS[index % len(COLORS)])
                x_all = [x for x, _ in values]
                y_all = [math.nan if y is None else y for _, y in values]
                ax.plot(x_all, y_all, color=color, linewidth=1.5 if not markers else 2.0, label=name)
                if markers or sum(y is not None for _, y in values) == 1:
                    ax.plot(x_all, y_all, linestyle="none", marker="o", markersize=6, color=color)
            if log_x:
                ax.set_xscale("log", base=2)
            if log_y:
                ax.set_yscale("log")
                # 1-2-5 ticks with plain labels (200, not 2×10²), as a reader compares them to the tables.
                ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_minor_locator(ticker.NullLocator())
                ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: _tick_label(value)))
            if x_ticks == "data":
                ax.set_xticks(xs, [_tick_label(x) for x in xs])
                ax.xaxis.set_minor_locator(ticker.NullLocator())  # a log axis would add unlabelled minor ticks
            ax.set_title(title)
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label)
            ax.grid(True, color=(0.88, 0.88, 0.88), linewidth=0.8)
            ax.set_axisbelow(True)
            if len(points) > 1:  # one series: the y label names it
                ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=10)
            fig.tight_layout()
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=_DPI, facecolor="white")
        finally:
            plt.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as rendered:
        image = rendered.convert("RGB")
    if image.size != (width, height):  # tight_layout keeps the canvas; guard against a backend that does not
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")  # Pillow writes no date or software tag: identical data, identical bytes
    return path
