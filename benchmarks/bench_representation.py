"""Representation quality of trained tokenizers against raw pixels: linear probe and k-NN on CIFAR-10.

Every tokenizer export given with ``--models`` is probed with ``mergevq evaluate probe`` (CLS token and the mean of
the merged tokens, at each ``--num-tokens`` K), and so are the raw pixels (``--pixels``) under exactly the same
protocol, so each row also reads as a gain over pixels, in points of top-1:

    python benchmarks/bench_representation.py \\
        --models merged=runs/quality/merged-s0/export,runs/quality/merged-s1/export \\
                 noalign=runs/quality/merged-noalign-s0/export --num-tokens 16 64

``NAME=DIR1,DIR2`` gives several seeds of one model: their accuracies are averaged and the spread is the sample
standard deviation over seeds. Whether a model was trained with alignment is read from the run's ``config.yaml``
beside its export directory (``alignment.kind`` and ``loss.alignment_weight``).

The paper's point to check: alignment adds semantics, i.e. an aligned tokenizer reaches >= 10 points of linear top-1
over raw pixels and a visible gain over the same tokenizer trained with ``alignment: none``. The notes state whether
this holds, whichever way it falls.

Each probe's JSON is kept in ``--work-dir`` and reused when its settings match, so an interrupted run continues.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MALLOC_ENV, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PIXELS = "pixels"  # the name of the raw-pixel row (not allowed as a model name)
TARGET_GAIN_POINTS = 10.0  # aligned tokenizer vs raw pixels, linear top-1
VISIBLE_GAIN_POINTS = 1.0  # aligned vs `alignment: none`: at least this, and more than the seed spread
KIND_LABELS = {"cls": "CLS", "mean_tokens": "mean of merged", "pixels": "pixels"}
COLUMNS = [
    "features",
    "K",
    "feature kind",
    "seeds",
    "linear top-1 (%)",
    "linear std (pts)",
    "k-NN top-1 (%)",
    "k-NN std (pts)",
    "linear gain vs pixels (pts)",
    "k-NN gain vs pixels (pts)",
]


@dataclass(frozen=True)
class ModelSpec:
    """One ``--models`` entry: a name and its export directories (one per seed)."""

    name: str
    dirs: tuple[Path, ...]


@dataclass(frozen=True)
class Settings:
    """What a stored probe JSON must have been run with to be reused."""

    train: Path
    test: Path
    num_tokens: tuple[int, ...]
    max_train: int
    max_test: int
    epochs: int


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def _model_spec(text: str) -> ModelSpec:  # an argparse type: called with one positional string
    """``NAME=DIR`` or ``NAME=DIR1,DIR2,...`` (seeds of the same model) → :class:`ModelSpec`."""
    name, sep, dirs = text.partition("=")
    name = name.strip()
    paths = tuple(Path(d).expanduser() for d in dirs.split(",") if d.strip())
    if not sep or not name or not paths:
        raise argparse.ArgumentTypeError(f"--models: expected NAME=DIR or NAME=DIR1,DIR2, got {text!r}")
    if name == PIXELS:
        raise argparse.ArgumentTypeError(f"--models: {PIXELS!r} is the raw-pixel row; pick another name")
    return ModelSpec(name=name, dirs=paths)


def _display(path: Path) -> str:
    """A path relative to the repository root (how results and commands are written, not machine paths)."""
    return Path(os.path.relpath(Path(path).resolve(), ROOT)).as_posix()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models",
        metavar="NAME=DIR[,DIR...]",
        type=_model_spec,
        nargs="+",
        required=True,
        help="tokenizer export directories; several comma-separated ones are seeds, averaged",
    )
    parser.add_argument("--num-tokens", metavar="K", type=int, nargs="+", default=[16, 64], help="K values")
    parser.add_argument("--max-train", metavar="N", type=int, default=10000, help="training images (strided subset)")
    parser.add_argument("--max-test", metavar="N", type=int, default=2000, help="test images (strided subset)")
    parser.add_argument("--epochs", metavar="N", type=int, default=90, help="linear-probe epochs")
    parser.add_argument(
        "--data",
        metavar="DIR",
        type=Path,
        default=Path(os.environ.get("MERGEVQ_CIFAR10", ROOT.parent / "shared" / "data" / "cifar10")),
        help="CIFAR-10 ImageFolder with train/ and test/ (default: $MERGEVQ_CIFAR10, else ../shared/data/cifar10)",
    )
    parser.add_argument(
        "--work-dir", metavar="DIR", type=Path, default=ROOT / "runs" / "representation", help="per-probe JSON files"
    )
    parser.add_argument("--name", default="representation", help="result name: benchmarks/results/<name>.json/.md")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the probes run")
    return parser


def reproduce_command(*, args: argparse.Namespace) -> str:
    """The exact command line of this run, with repository-relative paths."""
    models = [f"{m.name}={','.join(_display(d) for d in m.dirs)}" for m in args.models]
    parts = ["python", "benchmarks/bench_representation.py", "--models", *models]
    parts += ["--num-tokens", *map(str, args.num_tokens), "--max-train", str(args.max_train)]
    parts += ["--max-test", str(args.max_test), "--epochs", str(args.epochs), "--data", _display(args.data)]
    parts += ["--work-dir", _display(args.work_dir), "--name", args.name, "--device", args.device]
    return shlex.join(parts)


# ----------------------------------------------------------------------------------------------------------------------
# Running the probes (resumable)
# ----------------------------------------------------------------------------------------------------------------------


def probe_path(*, work_dir: Path, name: str, seed_index: int | None = None) -> Path:
    """Where one probe's JSON lives: ``<name>.json`` for pixels, ``<name>-<i>.json`` for seed ``i`` of a model."""
    return work_dir / (f"{name}.json" if seed_index is None else f"{name}-{seed_index}.json")


def _option(command: str, flag: str) -> str | None:
    parts = shlex.split(command)
    return parts[parts.index(flag) + 1] if flag in parts and parts.index(flag) + 1 < len(parts) else None


def _same_path(recorded: str | None, expected: Path) -> bool:
    # Recorded paths are relative to the repository root, where the probes run.
    return recorded is not None and (ROOT / recorded).resolve() == expected.resolve()


def matches(
    *, data: Mapping[str, Any], settings: Settings, model_dir: Path | None, image_size: int | None = None
) -> bool:
    """Whether a stored probe JSON was run with ``settings`` on ``model_dir`` (None: raw pixels at ``image_size``)."""
    try:
        command = data["command"]
        if model_dir is None:
            same_source = data.get("features") == PIXELS and data["input"]["image_size"] == image_size
        else:
            same_source = data.get("features") == "encoder" and _same_path(data["model"]["source"], model_dir)
            same_source = same_source and list(data["num_tokens"]) == list(settings.num_tokens)
        return (
            same_source
            and _same_path(data["train"]["root"], settings.train)
            and _same_path(data["test"]["root"], settings.test)
            and data["linear_probe"]["epochs"] == settings.epochs
            and _option(command, "--max-train") == str(settings.max_train)
            and _option(command, "--max-test") == str(settings.max_test)
        )
    except (KeyError, TypeError, ValueError):
        return False


def probe_command(
    *, output: Path, settings: Settings, model_dir: Path | None, image_size: int | None, device: str
) -> list[str]:
    """``python -m mergevq evaluate probe ...`` for one model directory (None: the raw pixels)."""
    source = ["--pixels", "--image-size", str(image_size)] if model_dir is None else ["--model", _display(model_dir)]
    tokens = [] if model_dir is None else ["--num-tokens", *map(str, settings.num_tokens)]
    return [
        sys.executable, "-m", "mergevq", "evaluate", "probe", *source,
        "--train", _display(settings.train), "--test", _display(settings.test), *tokens,
        "--max-train", str(settings.max_train), "--max-test", str(settings.max_test),
        "--epochs", str(settings.epochs), "--device", device, "--output", _display(output),
    ]  # fmt: skip


def run_probe(
    *, output: Path, settings: Settings, model_dir: Path | None, image_size: int | None = None, device: str = "auto"
) -> dict[str, Any]:
    """The probe's JSON: reused from ``output`` when its settings match, else computed in a subprocess."""
    what = "raw pixels" if model_dir is None else _display(model_dir)
    if output.is_file():
        try:
            data = json.loads(output.read_text())
        except json.JSONDecodeError:
            data = None  # a file cut short by an interruption: run again
        if data is not None and matches(data=data, settings=settings, model_dir=model_dir, image_size=image_size):
            print(f"  {what}: reusing {_display(output)}", flush=True)
            return data
        print(f"  {what}: {_display(output)} was made with other settings, running again", flush=True)
    command = probe_command(output=output, settings=settings, model_dir=model_dir, image_size=image_size, device=device)
    print(f"  {what}: {shlex.join(command[1:])}", flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, **MALLOC_ENV}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"probe of {what} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    print(f"  {what}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(output.read_text())


def alignment_of(*, model_dir: Path) -> str | None:
    """The alignment a tokenizer was trained with, from the run's ``config.yaml`` beside its export directory.

    ``"none"`` when ``alignment.kind`` is none or ``loss.alignment_weight`` is 0, else the kind (``"dinov2"``,
    ``"ema"``, ...); None when no readable config is found (the verdict then leaves the model out).
    """
    for candidate in (model_dir / "config.yaml", model_dir.parent / "config.yaml"):
        if not candidate.is_file():
            continue
        try:
            config = yaml.safe_load(candidate.read_text()) or {}
        except yaml.YAMLError:
            return None
        kind = str((config.get("alignment") or {}).get("kind", "dinov2"))  # the recipe's default kind
        weight = float((config.get("loss") or {}).get("alignment_weight", 1.0))
        return "none" if kind == "none" or weight == 0 else kind
    return None


# ----------------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------------


def _spread(values: Sequence[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def aggregate(*, name: str, runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (K, feature kind) of a model's seeds: mean accuracies in %, sample std over seeds in points."""
    rows = []
    first = runs[0]
    kinds = first.get("feature_kinds") or ["cls", "mean_tokens"]
    for result in first["results"]:
        k = result["num_tokens"]
        for kind in kinds:
            entries = []
            for run in runs:
                found = [r for r in run["results"] if r["num_tokens"] == k]
                if not found or kind not in found[0]:
                    raise ValueError(f"{name}: a seed has no {kind} result at K={k}")
                entries.append(found[0][kind])
            linear = [100 * e["linear_top1"] for e in entries]
            knn = [100 * e["knn_top1"] for e in entries]
            rows.append(
                {
                    "features": name,
                    "K": "-" if k is None else k,
                    "feature kind": KIND_LABELS.get(kind, kind),
                    "seeds": len(runs),
                    "linear top-1 (%)": statistics.fmean(linear),
                    "linear std (pts)": _spread(linear),
                    "k-NN top-1 (%)": statistics.fmean(knn),
                    "k-NN std (pts)": _spread(knn),
                }
            )
    return rows


def build_rows(
    *, model_runs: Mapping[str, Sequence[Mapping[str, Any]]], pixel_run: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The table: the raw-pixel row first, then each model's rows with their gain over pixels in points."""
    pixel_rows = aggregate(name=PIXELS, runs=[pixel_run])
    if len(pixel_rows) != 1:
        raise ValueError(f"the pixel probe has {len(pixel_rows)} results, expected one")
    pixels = pixel_rows[0]
    pixels["linear gain vs pixels (pts)"] = 0.0
    pixels["k-NN gain vs pixels (pts)"] = 0.0
    rows = [pixels]
    for name, runs in model_runs.items():
        for row in aggregate(name=name, runs=runs):
            row["linear gain vs pixels (pts)"] = row["linear top-1 (%)"] - pixels["linear top-1 (%)"]
            row["k-NN gain vs pixels (pts)"] = row["k-NN top-1 (%)"] - pixels["k-NN top-1 (%)"]
            rows.append(row)
    return rows


def _describe(row: Mapping[str, Any]) -> str:
    std = row["linear std (pts)"]
    spread = f" ± {std:.1f}" if std is not None else ""
    return f"{row['features']} ({row['feature kind']}, K={row['K']}: {row['linear top-1 (%)']:.1f}%{spread})"


def verdict(*, rows: Sequence[Mapping[str, Any]], alignment: Mapping[str, str | None]) -> tuple[bool | None, str]:
    """Whether the paper's point holds (None: cannot be judged) and a sentence saying so, whichever way it falls.

    Each aligned model is judged on its best row (linear top-1 over K and feature kind): the gain over raw pixels
    must reach ``TARGET_GAIN_POINTS``, and against every ``alignment: none`` model at the same K and feature kind
    it must be ahead by at least ``VISIBLE_GAIN_POINTS`` and by more than the two seed spreads added.
    """
    target = (
        f"Target (the paper's point): alignment adds semantics, i.e. a tokenizer trained with alignment reaches "
        f">= {TARGET_GAIN_POINTS:g} points of linear top-1 over raw pixels, and a visible gain (>= "
        f"{VISIBLE_GAIN_POINTS:g} point and beyond the seed spread) over the same tokenizer with `alignment: none`."
    )
    aligned = [n for n, a in alignment.items() if a not in (None, "none")]
    baselines = [n for n, a in alignment.items() if a == "none"]
    unknown = [n for n, a in alignment.items() if a is None]
    lines = [target]
    if unknown:
        lines.append(
            f"Alignment unknown (no run config.yaml beside the export, or seeds differ): {', '.join(unknown)}."
        )
    if not aligned:
        lines.append("Verdict: cannot be judged: no model trained with alignment was given.")
        return None, "\n\n".join(lines)
    model_rows = [r for r in rows if r["features"] != PIXELS]
    met = True
    for name in aligned:
        best = max((r for r in model_rows if r["features"] == name), key=lambda r: r["linear top-1 (%)"])
        gain = best["linear gain vs pixels (pts)"]
        ok = gain >= TARGET_GAIN_POINTS
        met &= ok
        lines.append(
            f"{name} (alignment: {alignment[name]}): best {_describe(best)} is {gain:+.1f} points over raw pixels "
            f"-> {'meets' if ok else 'misses'} the >= {TARGET_GAIN_POINTS:g}-point target."
        )
        for other in baselines:
            same = [
                r
                for r in model_rows
                if r["features"] == other and (r["K"], r["feature kind"]) == (best["K"], best["feature kind"])
            ]
            if not same:
                lines.append(f"{other} has no row at K={best['K']} ({best['feature kind']}): no comparison.")
                met = False
                continue
            base = same[0]
            delta = best["linear top-1 (%)"] - base["linear top-1 (%)"]
            noise = (best["linear std (pts)"] or 0.0) + (base["linear std (pts)"] or 0.0)
            visible = delta >= VISIBLE_GAIN_POINTS and delta > noise
            met &= visible
            lines.append(
                f"vs {_describe(base)} (alignment: none): {delta:+.1f} points"
                + (f" (seed spreads add to {noise:.1f})" if noise else "")
                + f" -> {'a visible gain' if visible else 'no visible gain'}."
            )
    if not baselines:
        lines.append("No `alignment: none` model was given, so the second half of the target is not checked.")
        verdict_text = "Verdict: cannot be judged fully (no `alignment: none` model); the pixel half is " + (
            "met." if met else "not met."
        )
        lines.append(verdict_text)
        return (None if met else False), "\n\n".join(lines)
    lines.append(f"Verdict: the target is {'met' if met else 'NOT met'} at this scale and budget.")
    return met, "\n\n".join(lines)


def notes_text(*, verdict_text: str, pixel_run: Mapping[str, Any], command: str) -> str:
    """Notes under the table: the protocol (counts from the pixel probe, the same for all rows), verdict, command."""
    return (
        f"Top-1 accuracies in % on {pixel_run['test']['num_images']} CIFAR-10 test images; the linear probes are "
        f"trained on {pixel_run['train']['num_images']} training images for {pixel_run['linear_probe']['epochs']} "
        f"epochs and the k-NN (k={pixel_run.get('knn_k', 20)}) votes among them. Gains are in points of top-1 over the "
        "raw-pixel row (same images, same probes). Several seeds: mean, and the sample std over seeds.\n\n"
        f"{verdict_text}\n\nReproduce: `{command}`"
    )


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def _pixel_image_size(model_runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> int:
    # Pixels at the tokenizers' own resolution, so both see the same images.
    sizes = {int(run["input"]["image_size"]) for runs in model_runs.values() for run in runs if run.get("input")}
    if len(sizes) > 1:
        print(f"warning: the tokenizers differ in resolution {sorted(sizes)}; pixels at {max(sizes)}", flush=True)
    return max(sizes) if sizes else 32


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [m.name for m in args.models]
    if len(set(names)) != len(names):
        raise SystemExit(f"--models: a name is given twice ({' '.join(names)}); join seeds as NAME=DIR1,DIR2")
    for spec in args.models:
        for d in spec.dirs:
            if not (d / "config.json").is_file():
                raise SystemExit(f"--models {spec.name}: {d} is not a tokenizer export (no config.json)")
    for split in ("train", "test"):
        if not (args.data / split).is_dir():
            raise SystemExit(f"--data: {args.data / split} not found (set MERGEVQ_CIFAR10 or pass --data)")
    settings = Settings(
        train=args.data / "train",
        test=args.data / "test",
        num_tokens=tuple(args.num_tokens),
        max_train=args.max_train,
        max_test=args.max_test,
        epochs=args.epochs,
    )
    args.work_dir.mkdir(parents=True, exist_ok=True)
    total = sum(len(m.dirs) for m in args.models) + 1
    done = 0
    model_runs: dict[str, list[dict[str, Any]]] = {}
    outputs: list[Path] = []
    alignment: dict[str, str | None] = {}
    for spec in args.models:
        model_runs[spec.name] = []
        for i, d in enumerate(spec.dirs):
            done += 1
            print(f"[{done}/{total}] {spec.name} seed {i}", flush=True)
            output = probe_path(work_dir=args.work_dir, name=spec.name, seed_index=i)
            outputs.append(output)
            model_runs[spec.name].append(run_probe(output=output, settings=settings, model_dir=d, device=args.device))
        kinds = {alignment_of(model_dir=d) for d in spec.dirs}
        alignment[spec.name] = kinds.pop() if len(kinds) == 1 else None
    done += 1
    print(f"[{done}/{total}] raw pixels", flush=True)
    outputs.append(probe_path(work_dir=args.work_dir, name=PIXELS))
    pixel_run = run_probe(
        output=outputs[-1],
        settings=settings,
        model_dir=None,
        image_size=_pixel_image_size(model_runs),
        device=args.device,
    )

    rows = build_rows(model_runs=model_runs, pixel_run=pixel_run)
    met, verdict_text = verdict(rows=rows, alignment=alignment)
    command = reproduce_command(args=args)
    write_results(
        args.name,
        title="Representation quality vs raw pixels (CIFAR-10 linear probe and k-NN)",
        rows=rows,
        columns=COLUMNS,
        notes=notes_text(verdict_text=verdict_text, pixel_run=pixel_run, command=command),
        extra={
            "target_met": met,
            "verdict": verdict_text,
            "reproduce": command,
            "alignment": alignment,
            "models": {m.name: [_display(d) for d in m.dirs] for m in args.models},
            "settings": {
                "num_tokens": list(settings.num_tokens),
                "max_train": settings.max_train,
                "max_test": settings.max_test,
                "epochs": settings.epochs,
                "data": _display(args.data),
            },
            "probe_files": [_display(p) for p in outputs],
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
