"""The demo pipeline: photographs → a tiny tokenizer → held-out reconstructions and merge maps → a tiny generator →
samples → ``report.html`` with ``summary.json`` and the PNGs beside it.

Everything runs on the CPU in minutes (see :class:`~mergevq.demo.settings.DemoSettings`), offline. The training
runs, their recipes and the token file stay under ``OUTPUT/work/``, so each stage can be rerun or continued with the
commands the report lists.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mergevq.data.transforms import resize_shorter_side, to_uint8_image
from mergevq.demo.curves import Curve, plot_curves
from mergevq.demo.generation import GenerationResult, generate
from mergevq.demo.page import write_report
from mergevq.demo.photos import Photo, PhotoSet, crops_of, load_builtin_photos, load_folder_photos, write_training_crops
from mergevq.demo.reconstruction import evaluate_crops, evaluate_photos, merge_levels, overview_figure
from mergevq.demo.settings import DemoSettings
from mergevq.demo.steps import train_from_recipe
from mergevq.eval.report import save_result
from mergevq.tokenizer.model import MergeVQ
from mergevq.train.output_lock import release_output_dir, take_output_lock

__all__ = ["DemoOutputError", "DemoResult", "prepare_output", "run_demo"]

_MARKER = ".mergevq-demo"  # marks a folder the demo wrote, which a later demo may clear
_HELD_OUT_PHOTOS = 2  # with --data: whole photos kept for evaluation
_MAX_PHOTOS = 16  # with --data: at most this many photos (one generator class each)


class DemoOutputError(RuntimeError):
    """The output folder cannot be used (it holds something the demo did not write)."""


@dataclass(frozen=True)
class DemoResult:
    output: Path
    report: Path
    summary: Path
    seconds: float


class _Stages:
    """Numbered stage headers with the elapsed time, and the seconds each stage took."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.count = 0
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, key: str, title: str) -> Iterator[None]:
        self.count += 1
        print(f"[{self.count}/{self.total}] {title} (at {time.perf_counter() - self.start:.0f} s)", flush=True)
        began = time.perf_counter()
        yield
        self.seconds[key] = round(time.perf_counter() - began, 2)


def prepare_output(*, output: Path) -> Path:
    """Create ``output`` or clear a previous demo's files there, and lock it for this process (release it with
    :func:`~mergevq.train.output_lock.release_output_dir`); a folder with other contents is refused."""
    output = output.expanduser()
    if output.exists() and not output.is_dir():
        raise DemoOutputError(f"--output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not (output / _MARKER).is_file():
        raise DemoOutputError(
            f"--output {output} is not empty and was not written by `mergevq demo`; choose a new or empty folder"
        )
    output.mkdir(parents=True, exist_ok=True)
    take_output_lock(output)  # a second demo on the same folder stops here instead of clearing this one's files
    for entry in output.iterdir():
        if entry.name in (_MARKER, ".lock"):
            continue
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    (output / _MARKER).write_text("written by mergevq demo; a later demo run clears this folder\n")
    return output


def _shown(path: Path) -> str:
    """``path`` as the commands show it: relative to the working directory when it lies below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def _photo_records(photos: PhotoSet) -> dict[str, Any]:
    def record(photo: Photo, cls: int | None) -> dict[str, Any]:
        width, height = photo.image.size
        out = {"name": photo.name, "file": str(photo.path), "size": [width, height], "credit": photo.credit}
        out["thumbnail"] = f"source_{photo.name}.png"
        return out | ({"class": cls} if cls is not None else {})

    return {
        "source": photos.source,
        "train": [record(p, i) for i, p in enumerate(photos.train)],
        "held_out": [record(p, None) for p in photos.held_out],
    }


def _machine(threads: int, device: str) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads,
        "device": device,
    }


@dataclass(frozen=True)
class _TokenizerRun:
    recipe: Path
    command: str
    run_dir: Path
    export: Path
    steps: int
    images_per_second: float | None


def _train_tokenizer(
    *, work: Path, settings: DemoSettings, candidates: list[int], threads: int, device: str, progress: bool
) -> _TokenizerRun:
    """Stage 1 with the project's training loop, from a recipe file the report points to."""
    from mergevq.train.recipe import load_config
    from mergevq.train.tokenizer import train

    recipe = work / "tokenizer.yaml"
    command = f"mergevq train-tokenizer {shlex.quote(_shown(recipe))}"
    steps = settings.tokenizer_steps
    values = {
        "model": {"preset": settings.tokenizer_preset},
        "data": {"train": _shown(work / "crops"), "val": _shown(work / "heldout"), "num_workers": 0, "val_images": 16},
        # Minutes on a CPU: no LPIPS or GAN terms and no alignment teacher; L1, LFQ and Source Recovery losses only.
        "loss": {"perceptual": "none", "adversarial_weight": 0.0},
        "alignment": {"kind": "none"},
        # The K the report shows (L, L/2, L/4) and some between, equally often.
        "merge": {"distribution": "uniform", "candidates": candidates},
        "optim": {"lr": settings.tokenizer_lr},
        "batch_size": settings.tokenizer_batch,
        "max_steps": steps,
        "ema_decay": 0.99,  # a short run: 0.999 would still hold much of the initial weights at the end
        "log_every": max(1, steps // 60),
        "val_every": max(1, steps // 5),
        "checkpoint_every": steps,
        "keep_last": 1,
        "seed": settings.seed,
        "threads": threads,
        "device": device,
        "output_dir": _shown(work / "tokenizer"),
    }
    result = train_from_recipe(
        path=recipe, values=values, command=command, load_config=load_config, train=train, progress=progress
    )
    return _TokenizerRun(
        recipe=recipe,
        command=command,
        run_dir=work / "tokenizer",
        export=result.export,
        steps=result.step,
        images_per_second=result.images_per_second,
    )


def run_demo(
    *,
    output: str | Path = "demo_out",
    data: str | Path | None = None,
    settings: DemoSettings | None = None,
    threads: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> DemoResult:
    """Run the whole demo into ``output`` (created, or a previous demo's output replaced); returns where it wrote.

    ``data``: an image folder to use instead of the built-in photographs (two whole photos are held out).
    ``threads``: torch threads (default: every core, at most 8). ``device``: ``cpu`` or ``cuda``. Raises
    :class:`DemoOutputError`, :class:`~mergevq.demo.photos.DemoDataError` or
    :class:`~mergevq.demo.steps.StageFailed` with a one-line reason.
    """
    settings = settings or DemoSettings()
    threads = threads or max(1, min(8, os.cpu_count() or 1))
    output = prepare_output(output=Path(output))
    try:
        return _run(output=output, data=data, settings=settings, threads=threads, device=device, progress=progress)
    finally:
        release_output_dir(output)


def _levels_between(full: int) -> list[int]:
    """Training merge counts: L/4, 3L/8, L/2, 3L/4 and L (distinct, at least 1)."""
    return sorted({max(1, round(full * f)) for f in (0.25, 0.375, 0.5, 0.75, 1.0)})


def _run(
    *, output: Path, data: str | Path | None, settings: DemoSettings, threads: int, device: str, progress: bool
) -> DemoResult:
    from mergevq.losses.perceptual import LPIPS
    from mergevq.tokenizer.config import get_preset
    from mergevq.train.runtime import preserve_torch_settings

    stages = _Stages(total=5)
    work = output / "work"
    preset = get_preset(settings.tokenizer_preset)
    size, full = preset.image_size, preset.num_tokens_full
    levels = merge_levels(full)
    with preserve_torch_settings():
        torch.set_num_threads(threads)
        with stages.stage("data", "photographs and random training crops"):
            if data is None:
                photos = load_builtin_photos()
            else:
                photos = load_folder_photos(root=data, held_out=_HELD_OUT_PHOTOS, max_photos=_MAX_PHOTOS)
            write_training_crops(
                photos=photos.train,
                output=work / "crops",
                count=settings.crops_per_photo,
                size=size,
                scales=settings.crop_scales,
                seed=settings.seed,
            )
            crops = crops_of(
                photos=photos.held_out,
                count=settings.eval_crops_per_photo,
                size=size,
                scale=settings.photo_side,
                seed=settings.seed + 1,
            )
            for photo in photos.train + photos.held_out:  # small pictures of the sources, for the report
                resize_shorter_side(photo.image, 96).save(output / f"source_{photo.name}.png")
            (work / "heldout").mkdir(parents=True)
            for i, image in enumerate(crops.images):  # the tokenizer run's validation images
                to_uint8_image(image).save(work / "heldout" / f"{i:04d}.png")
            print(
                f"  {len(photos.train)} training photos x {settings.crops_per_photo} crops of {size}x{size} px, "
                f"{len(photos.held_out)} held-out photos ({', '.join(p.name for p in photos.held_out)}); "
                f"from {photos.source}",
                flush=True,
            )

        title = f"training the {preset.name} tokenizer for {settings.tokenizer_steps} steps"
        with stages.stage("tokenizer", title):
            tokenizer = _train_tokenizer(
                work=work,
                settings=settings,
                candidates=_levels_between(full),
                threads=threads,
                device=device,
                progress=progress,
            )

        with stages.stage("reconstruction", f"held-out reconstructions and merge maps at K = {levels}"):
            model = MergeVQ.from_pretrained(tokenizer.export).to(device).eval()
            lpips = LPIPS(variant="shift_tolerant").eval().to(device) if settings.lpips else None
            crop_eval = evaluate_crops(
                model=model,
                crops=crops,
                levels=levels,
                lpips=lpips,
                output=output,
                panels_per_photo=settings.panels_per_photo,
            )
            photo_eval = evaluate_photos(
                model=model,
                photos=photos.held_out,
                levels=levels,
                lpips=lpips,
                output=output,
                shorter_side=settings.photo_side,
            )
            overview = overview_figure(photo=photo_eval[0], full=full, output=output / "overview.png")
            for s in crop_eval.scores:
                lp = "" if s.mean_lpips is None else f", LPIPS {s.mean_lpips:.3f}"
                print(f"  K={s.num_tokens}: held-out crops PSNR {s.mean_psnr:.2f} dB{lp}", flush=True)
            tokenizer_params = model.parameter_counts()["total"]
            del model, lpips

        with stages.stage("generator", f"a {settings.generator_kind} generator on the tokens, and samples"):
            generation = generate(
                tokenizer_dir=tokenizer.export,
                crops_dir=work / "crops",
                work=work,
                output=output,
                levels=sorted(k for k in levels if k < full) or [full],
                settings=settings,
                device=device,
                threads=threads,
                progress=progress,
            )

        with stages.stage("report", "training curves, summary.json and report.html"):
            curves = _plot_curves(
                tokenizer=tokenizer,
                generation=generation,
                output=output,
                validated=sorted({preset.default_num_tokens, full}),
            )
            total = time.perf_counter() - stages.start
            summary = {
                "kind": "mergevq_demo",
                "command": "mergevq " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["demo"] else None,
                "settings": asdict(settings),
                "data": _photo_records(photos),
                "tokenizer": {
                    "preset": preset.name,
                    "image_size": size,
                    "num_positions": full,
                    "grid": [preset.grid_size, preset.grid_size],
                    "parameters": tokenizer_params,
                    "steps": tokenizer.steps,
                    "images_per_second": tokenizer.images_per_second,
                    "recipe": _shown(tokenizer.recipe),
                    "export": _shown(tokenizer.export),
                    "training_merge_counts": _levels_between(full),
                },
                "reconstruction": {
                    "num_tokens": levels,
                    "overview": {"file": overview.name, "photo": photo_eval[0].name},
                    "crops": [
                        {
                            "num_tokens": s.num_tokens,
                            "psnr": s.mean_psnr,
                            "lpips": s.mean_lpips,
                            "num_images": len(s.psnr),
                            "psnr_per_image": s.psnr,
                            "lpips_per_image": s.lpips,
                        }
                        for s in crop_eval.scores
                    ],
                    "panels": [
                        {"photo": name, "file": path.name}
                        for name, path in zip(crop_eval.panel_photos, crop_eval.panels)
                    ],
                    "photos": [
                        {
                            "name": p.name,
                            "size": list(p.size),
                            "tiles": p.tiles,
                            "original": p.original.name,
                            "levels": [
                                {
                                    "num_tokens": level.num_tokens,
                                    "num_groups": level.num_groups,
                                    "psnr": level.psnr,
                                    "lpips": level.lpips,
                                    "reconstruction": level.reconstruction.name,
                                    "merge_map": level.merge_map.name,
                                }
                                for level in p.levels
                            ],
                        }
                        for p in photo_eval
                    ],
                },
                "generator": {
                    "kind": settings.generator_kind,
                    "parameters": generation.parameters,
                    "steps": generation.steps,
                    "grids_per_second": generation.grids_per_second,
                    "num_tokens": generation.num_tokens,
                    "recipe": _shown(generation.recipe),
                    "export": _shown(generation.export),
                    "classes": [
                        {
                            "class": c,
                            "photo": photos.train[c].name,
                            "samples": samples.name,
                            "merge_map": None if maps is None else maps.name,
                        }
                        for c, samples, maps in zip(
                            generation.rows.classes, generation.rows.samples, generation.rows.merge_maps
                        )
                    ],
                    "sampling": {
                        key: generation.rows.summary.get(key)
                        for key in ("settings", "speed", "peak_cache_bytes", "distinct_groups")
                    },
                },
                "curves": curves,
                "commands": {
                    "tokenizer": [tokenizer.command],
                    "generator": generation.commands,
                },
                "timings": {"stages": dict(stages.seconds), "total_seconds_before_report": round(total, 1)},
                "machine": _machine(threads, device),
            }
            summary_path = save_result(output / "summary.json", summary)
            report = write_report(output=output, summary=summary)
    seconds = time.perf_counter() - stages.start
    print(f"done in {seconds:.0f} s: open {_shown(report)}", flush=True)
    return DemoResult(output=output, report=report, summary=summary_path, seconds=seconds)


def _plot_curves(
    *, tokenizer: _TokenizerRun, generation: GenerationResult, output: Path, validated: list[int]
) -> dict[str, str]:
    """The training curves as PNGs beside the report: name → file name (``validated``: the K the tokenizer's
    validation reports, its default K and L)."""
    plots = {
        "tokenizer_loss": plot_curves(
            log=tokenizer.run_dir / "logs" / "train.jsonl",
            curves=[Curve("train", "reconstruction", "L1 reconstruction (train crops)")],
            output=output / "curve_tokenizer_loss.png",
            title="Tokenizer: reconstruction loss",
            y_label="L1 on [-1, 1] pixels",
        ),
        "tokenizer_psnr": plot_curves(
            log=tokenizer.run_dir / "logs" / "train.jsonl",
            curves=[Curve("val", f"psnr_k{k}", f"K={k}") for k in validated],
            output=output / "curve_tokenizer_psnr.png",
            title="Tokenizer: PSNR on the held-out crops (EMA weights)",
            y_label="PSNR (dB)",
        ),
        "generator_loss": plot_curves(
            log=generation.run_dir / "logs" / "train.jsonl",
            curves=[Curve("train", "loss", "cross-entropy (train tokens)")],
            output=output / "curve_generator_loss.png",
            title=f"Generator ({generation.rows.summary.get('generator_kind', 'generator')}): training loss",
            y_label="cross-entropy (nats per code)",
        ),
    }
    return {name: path.name for name, path in plots.items() if path is not None}
