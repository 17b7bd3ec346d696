"""Held-out evaluation of the demo tokenizer: crops and whole photos at several K, scores, merge maps and panels.

Scores are per image on ``[-1, 1]`` pixels (PSNR in dB; LPIPS: the offline shift-tolerant VGG LPIPS of
:mod:`mergevq.losses.perceptual`, lower is closer); each K's figure is the mean over the images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from mergevq.data.transforms import to_tensor, to_uint8_image
from mergevq.demo.photos import CropSet, Photo, fit_for_tiling
from mergevq.demo.tiles import reconstruct_tiled
from mergevq.eval.metrics import psnr
from mergevq.viz import make_reconstruction_panel, merge_map

__all__ = ["CropScores", "PhotoFigures", "evaluate_crops", "evaluate_photos", "merge_levels", "overview_figure"]


def merge_levels(num_positions: int) -> list[int]:
    """The K shown everywhere: L, L/2 and L/4 (largest first, duplicates dropped for tiny grids)."""
    levels: list[int] = []
    for k in (num_positions, num_positions // 2, num_positions // 4):
        if k >= 1 and k not in levels:
            levels.append(k)
    return levels


def _lpips(metric: nn.Module | None, a: Tensor, b: Tensor) -> list[float] | None:
    if metric is None:
        return None
    with torch.no_grad():
        return [float(v) for v in metric(a, b).reshape(-1)]


def _mean(values: Sequence[float] | None) -> float | None:
    return None if not values else sum(values) / len(values)


@dataclass(frozen=True)
class CropScores:
    num_tokens: int
    psnr: list[float]  # per crop, dB
    lpips: list[float] | None  # per crop; None when LPIPS is off

    @property
    def mean_psnr(self) -> float:
        return float(_mean(self.psnr))  # type: ignore[arg-type]

    @property
    def mean_lpips(self) -> float | None:
        return _mean(self.lpips)


@dataclass(frozen=True)
class CropEvaluation:
    scores: list[CropScores]  # one per K, largest K first
    panels: list[Path]  # PNG panels: input | (merge map, reconstruction) per K
    panel_photos: list[str]  # the held-out photo of each panel


@torch.no_grad()
def evaluate_crops(
    *,
    model: nn.Module,
    crops: CropSet,
    levels: list[int],
    lpips: nn.Module | None,
    output: Path,
    panels_per_photo: int,
) -> CropEvaluation:
    """Reconstruct every held-out crop at each K; score them and draw a panel for the first crops of each photo."""
    images = crops.images
    grid = (model.config.grid_size, model.config.grid_size)
    recon: dict[int, Tensor] = {}
    assignment: dict[int, Tensor] = {}
    scores = []
    for k in levels:
        encoded = model.encode(images, num_tokens=k)
        recon[k] = model.decode(encoded).clamp(-1, 1)
        assignment[k] = encoded.assignment
        values = [float(v) for v in psnr(recon[k], images)]
        scores.append(CropScores(num_tokens=k, psnr=values, lpips=_lpips(lpips, recon[k], images)))

    panels, names = [], []
    shown: dict[str, int] = {}
    for i, name in enumerate(crops.photos):
        if shown.get(name, 0) >= panels_per_photo:
            continue
        shown[name] = shown.get(name, 0) + 1
        panel = make_reconstruction_panel(
            original=images[i],
            reconstructions={k: recon[k][i] for k in levels},
            assignments={k: assignment[k][i] for k in levels},
            grid=grid,
            psnr={s.num_tokens: s.psnr[i] for s in scores},
        )
        path = output / f"crop_{name}_{shown[name]}.png"
        panel.save(path)
        panels.append(path)
        names.append(name)
    return CropEvaluation(scores=scores, panels=panels, panel_photos=names)


@dataclass(frozen=True)
class PhotoLevel:
    num_tokens: int  # K per tile
    num_groups: int  # merged tokens over the whole photo
    psnr: float
    lpips: float | None
    reconstruction: Path  # PNG, the photo's size
    merge_map: Path  # PNG, the groups over the photo (enlarged so that the boundaries show)


@dataclass(frozen=True)
class PhotoFigures:
    name: str
    size: tuple[int, int]  # (width, height) in pixels, as shown
    tiles: int
    original: Path
    levels: list[PhotoLevel] = field(default_factory=list)


@torch.no_grad()
def evaluate_photos(
    *,
    model: nn.Module,
    photos: Sequence[Photo],
    levels: list[int],
    lpips: nn.Module | None,
    output: Path,
    shorter_side: int,
) -> list[PhotoFigures]:
    """Each held-out photo at ``shorter_side`` px, tiled into the tokenizer's size, at each K per tile."""
    size = model.config.image_size
    side = max(size, shorter_side - shorter_side % size)
    cell = size // model.config.grid_size  # pixels per token position
    upscale = max(1, -(-12 // cell))  # cells of >= 12 px: the 1-px group boundaries stay readable
    results = []
    for photo in photos:
        image = to_tensor(fit_for_tiling(photo.image, shorter=side, multiple=size))
        original = output / f"photo_{photo.name}.png"
        to_uint8_image(image).save(original)
        figures = PhotoFigures(
            name=photo.name,
            size=(image.shape[2], image.shape[1]),
            tiles=(image.shape[1] // size) * (image.shape[2] // size),
            original=original,
        )
        for k in levels:
            tiled = reconstruct_tiled(model=model, image=image, num_tokens=k)
            recon_path = output / f"photo_{photo.name}_k{k}.png"
            to_uint8_image(tiled.reconstruction).save(recon_path)
            map_path = output / f"photo_{photo.name}_k{k}_merges.png"
            # Light colours (alpha 0.35): hundreds of groups over a photo would otherwise hide the photo.
            merge_map(tiled.assignment, grid=tiled.grid, image=image, upscale=upscale, alpha=0.35).save(map_path)
            lpips_values = _lpips(lpips, tiled.reconstruction[None], image[None])
            figures.levels.append(
                PhotoLevel(
                    num_tokens=k,
                    num_groups=tiled.num_groups,
                    psnr=float(psnr(tiled.reconstruction[None], image[None])[0]),
                    lpips=lpips_values[0] if lpips_values else None,
                    reconstruction=recon_path,
                    merge_map=map_path,
                )
            )
        results.append(figures)
    return results


def overview_figure(*, photo: PhotoFigures, full: int, output: Path, height: int = 256) -> Path:
    """One strip: the photo, its merge maps at every K below ``full`` (= L) and its reconstruction at the smallest K,
    all scaled (nearest neighbour: the pixels stay the model's) to ``height`` px and written to ``output``."""
    merged = [level for level in photo.levels if level.num_tokens < full] or photo.levels
    smallest = min(photo.levels, key=lambda level: level.num_tokens)
    paths = [photo.original, *(level.merge_map for level in merged), smallest.reconstruction]
    pictures = []
    for path in paths:
        with Image.open(path) as image:
            width = round(image.width * height / image.height)
            pictures.append(image.convert("RGB").resize((width, height), Image.Resampling.NEAREST))
    gap = 8
    canvas = Image.new("RGB", (sum(p.width for p in pictures) + gap * (len(pictures) - 1), height), "white")
    left = 0
    for picture in pictures:
        canvas.paste(picture, (left, 0))
        left += picture.width + gap
    canvas.save(output)
    return output
