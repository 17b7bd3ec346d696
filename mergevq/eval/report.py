"""Result files → markdown tables, PNG line plots and the results page (``scripts/make_results.py``).

Result files are the JSON written by ``mergevq evaluate tokenizer|generator|probe`` and ``mergevq benchmark`` (a
``"kind"`` field names which, ``"command"`` holds the command line that produced it), and the files of the
``benchmarks/`` scripts (``{"name", "title", "machine", "rows", "extra"}``). Rendering is a pure function of the
files: the page holds no generation date, so regenerating it from the same files gives the same bytes.
Plots are drawn with matplotlib (:func:`mergevq.eval.plots.line_plot`, the optional ``report`` extra).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mergevq.eval.plots import line_plot

__all__ = [
    "ResultFile",
    "benchmark_table",
    "format_value",
    "generator_table",
    "line_plot",
    "load_results",
    "markdown_table",
    "probe_table",
    "render_results_page",
    "save_result",
    "to_json_value",
    "tokenizer_table",
]

KINDS = ("tokenizer_eval", "probe_eval", "generator_eval", "benchmark")


# ----------------------------------------------------------------------------------------------------------------------
# Result files
# ----------------------------------------------------------------------------------------------------------------------


def to_json_value(value: Any) -> Any:
    """Plain JSON data: non-finite floats → None (JSON has no inf/NaN), tuples → lists, paths and NumPy → Python."""
    if isinstance(value, Mapping):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def save_result(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON at ``path`` (parent folders created)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json_value(payload), indent=2, allow_nan=False) + "\n")
    return path


@dataclass(frozen=True)
class ResultFile:
    path: Path
    data: dict[str, Any]

    @property
    def kind(self) -> str:
        kind = self.data.get("kind")
        if kind in KINDS:
            return kind
        if {"name", "rows"} <= set(self.data):
            return "benchmark_script"
        return "unknown"

    @property
    def untrained(self) -> bool:
        weights = str((self.data.get("model") or {}).get("weights", ""))  # null for the raw-pixel probe
        return weights.startswith("random")


def load_results(paths: Iterable[str | Path]) -> list[ResultFile]:
    """Read result JSON files (duplicates dropped, order kept); a file that is not JSON raises ``ValueError``."""
    out: list[ResultFile] = []
    seen: set[Path] = set()
    for p in paths:
        path = Path(p)
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not a JSON file: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} does not hold a JSON object")
        out.append(ResultFile(path, data))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Markdown tables
# ----------------------------------------------------------------------------------------------------------------------


def format_value(value: Any, *, digits: int = 4) -> str:
    """Compact cell text: None → "n/a", floats to ``digits`` significant digits, large ones without exponent."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and abs(value) >= 10**digits:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    if isinstance(value, (list, tuple)):
        return " ".join(format_value(v, digits=digits) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def markdown_table(*, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return (v if isinstance(v, str) else format_value(v)).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _fixed(value: Any, places: int) -> str:
    return "n/a" if value is None else f"{value:.{places}f}"


def tokenizer_table(data: Mapping[str, Any]) -> str:
    """K | merged | PSNR | SSIM | LPIPS | rFID | usage | perplexity, from a ``tokenizer_eval`` payload."""
    rows = []
    for r in data["results"]:
        psnr = _fixed(r["psnr"], 2)
        if r.get("psnr_num_inf"):
            psnr += f" (+{r['psnr_num_inf']} inf)"
        k = str(r["num_tokens"])
        if r.get("assignment") == "predicted":  # decoded through the learned Source Recovery
            k += f" (predicted S, {_percent(r.get('recovery_accuracy'))}% right)"
        rows.append(
            [
                k,
                str(r["merged_tokens"]),
                psnr,
                _fixed(r["ssim"], 4),
                _fixed(r.get("lpips"), 4),
                _fixed(r.get("rfid"), 2),
                f"{r['codebook_usage']:.3e}" if r.get("codebook_usage") is not None else "n/a",
                str(r["codebook_used_codes"]),
                _fixed(r.get("codebook_perplexity"), 1),
            ]
        )
    header = ["K", "merged", "PSNR (dB)", "SSIM", "LPIPS", "rFID", "usage", "codes used", "perplexity"]
    return markdown_table(header=header, rows=rows)


_PROBE_FEATURES = {"cls": "CLS", "mean_tokens": "mean of merged tokens", "pixels": "raw pixels"}


def probe_table(data: Mapping[str, Any]) -> str:
    """K | features | linear top-1 | k-NN top-1 | train top-1, from a ``probe_eval`` payload (accuracies in %).

    The rows follow the payload's ``feature_kinds`` (files written before it existed hold ``cls`` and
    ``mean_tokens``); the raw-pixel baseline has no K ("-").
    """
    rows = []
    for r in data["results"]:
        for name in data.get("feature_kinds") or ("cls", "mean_tokens"):
            f = r[name]
            rows.append(
                [
                    "-" if r["num_tokens"] is None else str(r["num_tokens"]),
                    _PROBE_FEATURES.get(name, name),
                    _percent(f["linear_top1"]),
                    _percent(f.get("linear_top5")),
                    _percent(f["knn_top1"]),
                    _percent(f.get("linear_train_top1")),
                ]
            )
    knn = f"k-NN top-1 (%), k={data['knn_k']}"
    header = ["K", "features", "linear top-1 (%)", "linear top-5 (%)", knn, "linear train top-1 (%)"]
    return markdown_table(header=header, rows=rows)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def generator_table(data: Mapping[str, Any]) -> str:
    """FID | precision | recall | IS | counts, from a ``generator_eval`` payload; unavailable metrics say so."""
    m = data["metrics"]
    is_text = "n/a" if m["inception_score"] is None else f"{m['inception_score']:.2f} ± {m['inception_score_std']:.2f}"
    row = [
        _fixed(m["fid"], 3),
        _fixed(m["precision"], 4),
        _fixed(m["recall"], 4),
        is_text,
        str(data["samples"]["num_images"]),
        str(data["reference"]["num_images"] if data["reference"]["num_images"] is not None else "n/a"),
    ]
    header = ["FID", "precision", "recall", "IS", "samples", "reference"]
    return markdown_table(header=header, rows=[row])


_PHASES = (("encode", "encode"), ("decode", "decode"), ("encode_decode", "encode+decode"), ("train_step", "train step"))


def benchmark_table(data: Mapping[str, Any]) -> str:
    """Per K: median images/s (and median ms per batch) of each phase, from a ``benchmark`` payload."""
    phases = [(key, label) for key, label in _PHASES if any(key in r["phases"] for r in data["rows"])]
    # Shared machines drift: a ratio to a K measured in the same run is more telling than an absolute figure.
    largest = max(data["rows"], key=lambda r: r["num_tokens"])
    base = largest["phases"].get("encode_decode")
    header = ["K"] + [f"{label} img/s (ms/batch)" for _, label in phases]
    if base is not None and len(data["rows"]) > 1:
        header.append(f"encode+decode speed vs K={largest['num_tokens']}")
    rows = []
    for r in data["rows"]:
        row = [str(r["num_tokens"])]
        for key, _ in phases:
            t = r["phases"].get(key)
            row.append("n/a" if t is None else f"{_g4(t['items_per_s']['median'])} ({_g4(t['median_ms'])})")
        if len(header) > len(row):
            both = r["phases"].get("encode_decode")
            row.append("n/a" if both is None else f"{base['median_ms'] / both['median_ms']:.2f}×")
        rows.append(row)
    return markdown_table(header=header, rows=rows)


def _g4(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"


def _generic_table(data: Mapping[str, Any]) -> str:
    rows = data.get("rows") or []
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    return markdown_table(header=columns, rows=[[r.get(c) for c in columns] for r in rows])


# ----------------------------------------------------------------------------------------------------------------------
# The results page
# ----------------------------------------------------------------------------------------------------------------------


def _relative(path: Path, start: Path) -> str:
    try:
        return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return path.as_posix()


def _machine_line(machine: Mapping[str, Any] | None) -> str:
    if not machine:
        return ""
    parts = []
    if machine.get("gpu") or machine.get("cuda"):
        parts.append(str(machine.get("gpu") or machine.get("cuda")))
    else:
        cpu = machine.get("cpu")
        cores = machine.get("logical_cpus")
        threads = machine.get("torch_threads", machine.get("threads"))
        parts.append(f"CPU {cpu}" + (f" ({cores} logical cores" if cores else "") + (")" if cores else ""))
        if threads:
            parts.append(f"{threads} torch thread(s)")
    parts.append(f"torch {machine.get('torch')}")
    if machine.get("date"):
        parts.append(str(machine["date"]))
    return "Measured on: " + ", ".join(parts) + "."


def _command_block(command: str | None, *, what: str) -> str:
    if not command:
        return f"_{what}: no command recorded in the result file._"
    return f"{what}:\n\n```\n{command}\n```"


@dataclass
class _Page:
    output: Path
    figures_dir: Path
    base: Path
    lines: list[str]

    def add(self, *text: str) -> None:
        self.lines.extend(text)

    def figure(self, result: ResultFile, suffix: str, *, alt: str, **plot: Any) -> None:
        path = line_plot(self.figures_dir / f"{result.path.stem}_{suffix}.png", **plot)
        source = result.data.get("command")
        self.add(f"![{alt}]({_relative(path, self.output.parent)})", "")
        self.add(f"_Figure: {alt}. Data: `{_relative(result.path, self.base)}`, from `{source}`._", "")


def _tokenizer_section(page: _Page, result: ResultFile) -> None:
    d = result.data
    model, data = d["model"], d["data"]
    page.add(f"### Reconstruction: {model['preset']} on `{data['root']}`", "")
    weights = "**untrained (random initialisation)**" if result.untrained else f"weights from `{model['source']}`"
    page.add(
        f"{data['num_images']} images at {data['image_size']}×{data['image_size']}, model `{model['preset']}` "
        f"({weights}). {_machine_line(d.get('machine'))}",
        "",
    )
    page.add(tokenizer_table(d), "")
    for warning in d.get("warnings", []):
        page.add(f"> Warning: {warning}", "")
    ks = sorted({r["num_tokens"] for r in d["results"]})
    modes = list(dict.fromkeys(r.get("assignment", "true") for r in d["results"]))

    def series(metric: str) -> dict[str, list[tuple[int, Any]]]:
        # One line per assignment: the encoder's ("true") and, where evaluated, the Source Recovery's.
        label = {"true": metric, "predicted": f"{metric}, predicted assignment"}
        return {
            label.get(mode, f"{metric}, {mode}"): [
                (r["num_tokens"], r.get(metric.lower())) for r in d["results"] if r.get("assignment", "true") == mode
            ]
            for mode in modes
        }

    if len(ks) > 1:
        name = model["preset"]
        page.figure(
            result,
            "psnr",
            alt=f"PSNR vs K ({name}, {data['num_images']} images)",
            title=f"Reconstruction PSNR vs K ({name})",
            x_label="K (merged tokens)",
            y_label="PSNR (dB)",
            series=series("PSNR"),
            log_x=True,
        )
        if any(r.get("rfid") is not None for r in d["results"]):
            page.figure(
                result,
                "rfid",
                alt=f"rFID vs K ({name}, {data['num_images']} images)",
                title=f"rFID vs K ({name}, {data['num_images']} images)",
                x_label="K (merged tokens)",
                y_label="rFID",
                series=series("rFID"),
                log_x=True,
            )
    defs = d.get("definitions", {})
    if defs:
        page.add("<details><summary>Metric definitions</summary>", "")
        page.add(*[f"- **{k}**: {v}" for k, v in defs.items()], "", "</details>", "")
    page.add(_command_block(d.get("command"), what="Produced by"), "")


def _probe_section(page: _Page, result: ResultFile) -> None:
    d = result.data
    model = d["model"]
    if model is None:  # the raw-pixel baseline (``--pixels``)
        size = d["input"]["image_size"]
        page.add("### Linear probe and k-NN: raw pixels (baseline)", "")
        subject = f"raw pixels at {size}×{size}, no encoder"
    else:
        weights = "**untrained (random initialisation)**" if result.untrained else f"weights from `{model['source']}`"
        page.add(f"### Linear probe and k-NN: {model['preset']}", "")
        subject = f"model `{model['preset']}` ({weights})"
    page.add(
        f"{d['train']['num_images']} training / {d['test']['num_images']} test images from `{d['train']['root']}` "
        f"and `{d['test']['root']}`, {subject}. {_machine_line(d.get('machine'))}",
        "",
    )
    page.add(probe_table(d), "")
    if model is not None and len(d["results"]) > 1:
        page.figure(
            result,
            "probe",
            alt=f"probe accuracy vs K ({model['preset']})",
            title=f"Probe top-1 vs K ({model['preset']})",
            x_label="K (merged tokens)",
            y_label="top-1 accuracy (%)",
            series={
                f"{feat} {how}": [(r["num_tokens"], 100 * r[key][metric]) for r in d["results"]]
                for key, feat in (("cls", "CLS"), ("mean_tokens", "mean tokens"))
                for metric, how in (("linear_top1", "linear"), ("knn_top1", "k-NN"))
            },
            log_x=True,
        )
    defs = d.get("definitions", {})
    if defs:
        page.add(*[f"- **{k}**: {v}" for k, v in defs.items()], "")
    page.add(_command_block(d.get("command"), what="Produced by"), "")


def _generator_section(page: _Page, result: ResultFile) -> None:
    d = result.data
    page.add(f"### FID: `{d['samples']['source']}` vs `{d['reference']['source']}`", "")
    page.add(
        f"Samples: {d['samples']['num_images']} images ({d['samples']['format']}); reference: "
        f"{d['reference']['num_images']} ({d['reference']['format']}). {_machine_line(d.get('machine'))}",
        "",
    )
    page.add(generator_table(d), "")
    for name, reason in d["metrics"].get("unavailable", {}).items():
        page.add(f"- `{name}` not reported: {reason}")
    page.add("")
    for warning in d.get("warnings", []):
        page.add(f"> Warning: {warning}", "")
    page.add(_command_block(d.get("command"), what="Produced by"), "")


def _benchmark_section(page: _Page, result: ResultFile) -> None:
    d = result.data
    model, settings = d["model"], d["settings"]
    page.add(f"### Speed: {model['preset']}, batch {settings['batch_size']}, {settings['device']}", "")
    page.add(
        f"Median of {settings['repeats']} timed calls after {settings['warmup']} warm-up call(s), "
        f"{settings['image_size']}×{settings['image_size']} inputs, {settings['precision']}. "
        f"{_machine_line(d.get('machine'))}",
        "",
    )
    page.add(benchmark_table(d), "")
    if d.get("notes"):
        page.add(*[f"- {n}" for n in d["notes"]], "")
    if len(d["rows"]) > 1:
        series = {
            label: [
                (r["num_tokens"], r["phases"][key]["items_per_s"]["median"] if key in r["phases"] else None)
                for r in d["rows"]
            ]
            for key, label in _PHASES
            if any(key in r["phases"] for r in d["rows"])
        }
        values = [y for pts in series.values() for _, y in pts if y]
        page.figure(
            result,
            "speed",
            alt=f"images/s vs K ({model['preset']}, batch {settings['batch_size']}, {settings['device']})",
            title=f"Throughput vs K ({model['preset']}, batch {settings['batch_size']}, {settings['device']})",
            x_label="K (merged tokens)",
            y_label="images / s (median)",
            series=series,
            log_x=True,
            log_y=bool(values) and max(values) / min(values) > 20,
        )
    page.add(_command_block(d.get("command"), what="Produced by"), "")


def _script_section(page: _Page, result: ResultFile) -> None:
    d = result.data
    page.add(f"### {d.get('title') or d['name']}", "")
    machine = _machine_line(d.get("machine"))
    if machine:
        page.add(machine, "")
    page.add(_generic_table(d), "")
    page.add(f"Data: `{_relative(result.path, page.base)}`.", "")
    page.add(_command_block(_script_command(page.base, result), what="Produced by"), "")


def _script_command(base: Path, result: ResultFile) -> str | None:
    name = result.data.get("name")
    return f"python benchmarks/bench_{name}.py" if (base / "benchmarks" / f"bench_{name}.py").is_file() else None


_SECTIONS = (
    ("tokenizer_eval", "Tokenizer reconstruction", _tokenizer_section),
    ("probe_eval", "Representation (frozen encoder)", _probe_section),
    ("generator_eval", "Generation metrics", _generator_section),
    ("benchmark", "Tokenizer speed (`mergevq benchmark`)", _benchmark_section),
    ("benchmark_script", "Component benchmarks (`benchmarks/`)", _script_section),
)


def render_results_page(
    *,
    results: Sequence[ResultFile],
    output: str | Path,
    figures_dir: str | Path,
    base: str | Path,
    title: str = "MergeVQ results",
    notes: Sequence[str] = (),
    generator_command: str | None = None,
) -> str:
    """Markdown of the results page; figures are written to ``figures_dir`` as a side effect.

    ``output`` is where the page will live (image links are relative to it); ``base`` is the folder paths are shown
    relative to (the repository root); ``generator_command`` is the command that rebuilds the page.
    """
    page = _Page(output=Path(output), figures_dir=Path(figures_dir), base=Path(base), lines=[])
    page.add(f"# {title}", "")
    if generator_command:
        page.add(f"Generated by `{generator_command}` from the result files below; do not edit by hand.", "")
    # Speed does not depend on the weights: only quality figures of an untrained model need the warning.
    untrained = [r for r in results if r.untrained and r.kind != "benchmark"]
    if untrained:
        page.add(
            "> **A tokenizer evaluated here is untrained (random initialisation).** Its reconstruction and probe "
            "figures check that the evaluation pipeline runs end to end; they say nothing about the quality of "
            "the MergeVQ method.",
            "",
        )
    for note in notes:
        page.add(f"> {note}", "")
    unknown = [r for r in results if r.kind == "unknown"]
    for kind, heading, render in _SECTIONS:
        chosen = [r for r in results if r.kind == kind]
        if not chosen:
            continue
        page.add(f"## {heading}", "")
        for result in chosen:
            render(page, result)
    for result in unknown:
        page.add(f"_Skipped `{_relative(result.path, page.base)}`: not a known result file._", "")

    commands = [r.data["command"] for r in results if r.data.get("command")]
    commands += [c for r in results if r.kind == "benchmark_script" and (c := _script_command(page.base, r))]
    if commands or generator_command:
        page.add("## Reproduce", "", "```")
        page.add(*commands)
        if generator_command:
            page.add(generator_command)
        page.add("```", "")
    return "\n".join(page.lines).rstrip() + "\n"
