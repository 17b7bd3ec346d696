"""Stage 2 of the demo: the tokenizer's tokens of the training crops → a small generator → samples per photo.

The steps are the project's own commands, run in this process with the arguments a user would type (``mergevq
encode``, ``mergevq sample``) and a recipe file for ``mergevq train-generator``, so the report can list exactly what
ran. The class label of a crop is the index of the photo it was cut from.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mergevq.demo.settings import DemoSettings
from mergevq.demo.steps import run_cli, train_from_recipe

__all__ = ["GenerationResult", "SampleRows", "generate", "sample_rows"]


@dataclass(frozen=True)
class SampleRows:
    classes: list[int]
    samples: list[Path]  # one PNG row of samples per class
    merge_maps: list[Path | None]  # the same row as merge maps (MergeAR, RandAR), else None
    summary: dict[str, Any]  # the sample command's summary.json


def _grid_rows(path: Path, *, rows: int, per_row: int, padding: int) -> list[Image.Image]:
    """Cut an :func:`mergevq.viz.image_grid` picture back into its rows (its layout is documented there)."""
    with Image.open(path) as grid:
        grid.load()
        tile = (grid.width - (per_row + 1) * padding) // per_row  # width = c·W + (c + 1)·padding
        # Row r starts at padding + r·(tile + padding); keep the white padding around it.
        tops = [r * (tile + padding) for r in range(rows)]
        return [grid.crop((0, top, grid.width, top + tile + 2 * padding)) for top in tops]


def sample_rows(*, samples_dir: Path, output: Path) -> SampleRows:
    """Split ``mergevq sample``'s grid.png (and merge_maps.png) into one picture per class, for the report."""
    summary = json.loads((samples_dir / "summary.json").read_text())
    classes = list(summary["classes"])
    with np.load(samples_dir / "samples.npz") as data:
        labels = data["labels"]
    per_class = int((labels == classes[0]).sum())
    per_row = min(per_class, 16)  # the sample command shows at most 16 images of a class
    kw = {"rows": len(classes), "per_row": per_row, "padding": 2}
    rows = _grid_rows(samples_dir / "grid.png", **kw)
    maps = _grid_rows(samples_dir / "merge_maps.png", **kw) if (samples_dir / "merge_maps.png").is_file() else None
    sample_paths: list[Path] = []
    map_paths: list[Path | None] = []
    for i, c in enumerate(classes):
        path = output / f"samples_class{c}.png"
        rows[i].save(path)
        sample_paths.append(path)
        if maps is None:
            map_paths.append(None)
        else:
            maps[i].save(output / f"samples_class{c}_merges.png")
            map_paths.append(output / f"samples_class{c}_merges.png")
    return SampleRows(classes=classes, samples=sample_paths, merge_maps=map_paths, summary=summary)


@dataclass(frozen=True)
class GenerationResult:
    commands: list[str]  # what ran, in order: encode, train-generator, sample
    recipe: Path  # the generator's training recipe (YAML)
    run_dir: Path
    export: Path
    steps: int
    parameters: int
    grids_per_second: float | None  # training throughput (token grids per second)
    num_tokens: int  # the merge level the samples were drawn at
    rows: SampleRows


def generate(
    *,
    tokenizer_dir: Path,
    crops_dir: Path,
    work: Path,
    output: Path,
    levels: list[int],
    settings: DemoSettings,
    device: str,
    threads: int,
    progress: bool,
) -> GenerationResult:
    """Encode the training crops at ``levels`` (K below L), train a generator on them and sample every class."""
    from mergevq.generator import Generator
    from mergevq.train.generator import train
    from mergevq.train.generator_recipe import load_config

    tokens = work / "tokens" / "train.safetensors"
    encode = run_cli(
        ["encode", "--model", tokenizer_dir, "--data", crops_dir, "--num-tokens", *levels, "--output", tokens]
        + ["--num-workers", "0", "--batch-size", "64", "--device", device]
    )
    recipe_path = work / "generator.yaml"
    train_command = f"mergevq train-generator {shlex.quote(str(recipe_path))}"
    values = {
        "model": {
            "preset": settings.generator_preset,
            "kind": settings.generator_kind,
            "overrides": {"depth": settings.generator_depth},  # a shallower tiny model: minutes, not hours
        },
        "data": {"train": str(tokens), "val": None, "num_tokens": None},  # every stored K below L is a merge level
        "optim": {"lr": settings.generator_lr},
        "schedule": {"kind": "cosine", "warmup_steps": max(1, settings.generator_steps // 10), "min_lr_ratio": 0.1},
        "batch_size": settings.generator_batch,
        "max_steps": settings.generator_steps,
        "log_every": max(1, settings.generator_steps // 40),
        "val_every": settings.generator_steps,
        "checkpoint_every": settings.generator_steps,
        "keep_last": 1,
        "seed": settings.seed,
        "threads": threads,
        "device": device,
        "output_dir": str(work / "generator"),
    }
    result = train_from_recipe(
        path=recipe_path, values=values, command=train_command, load_config=load_config, train=train, progress=progress
    )
    parameters = Generator.from_pretrained(result.export).parameter_counts()["total"]

    k = max(levels)  # the larger merge level: the better samples after a short run
    samples_dir = work / "samples"
    sample = run_cli(
        ["sample", "--generator", result.export, "--tokenizer", tokenizer_dir, "--output", samples_dir]
        + ["--num-per-class", settings.samples_per_class, "--num-tokens", k, "--cfg", "2.0"]
        + ["--seed", settings.seed, "--device", device]
    )
    rows = sample_rows(samples_dir=samples_dir, output=output)
    return GenerationResult(
        commands=[encode, train_command, sample],
        recipe=recipe_path,
        run_dir=work / "generator",
        export=result.export,
        steps=result.step,
        parameters=parameters,
        grids_per_second=result.images_per_second,
        num_tokens=k,
        rows=rows,
    )
