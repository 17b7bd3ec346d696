"""Pictures of what the tokenizer does: image grids, merge maps and reconstruction panels.

Images are tensors ``[3, H, W]`` (or ``[N, 3, H, W]``) in ``[-1, 1]``, the tokenizer's convention; the functions return
or write RGB PIL images. A *merge map* colours every position of the ``h×w`` token grid by the merged token that
absorbed it (``assignment[l] = k``), so regions the encoder merged show as one patch of colour.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from mergevq.data.transforms import to_uint8_image
from mergevq.eval.metrics import psnr as psnr_per_image

__all__ = [
    "image_grid",
    "make_reconstruction_panel",
    "merge_map",
    "palette",
    "save_reconstruction_panel",
]

_GOLDEN = (math.sqrt(5) - 1) / 2  # successive multiples mod 1 spread hues as evenly as possible
_MIN_SIDE = 128  # automatic upscaling makes small (CIFAR-sized) pictures at least this large
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)


# ----------------------------------------------------------------------------------------------------------------------
# Colours and conversions
# ----------------------------------------------------------------------------------------------------------------------


def palette(n: int) -> np.ndarray:
    """``n`` distinct RGB colours as uint8 ``[n, 3]``, the same on every call.

    Hue ``k`` is ``k·0.618… mod 1`` (golden-ratio steps), so consecutive indices, which are neighbouring merged
    tokens in raster order, get very different hues; saturation and value follow two other low-discrepancy sequences
    so that colours whose hues come close differ in brightness.
    """
    if n < 0:
        raise ValueError(f"palette size must be >= 0, got {n}")
    colours = np.empty((n, 3), dtype=np.uint8)
    for k in range(n):
        hue = (k * _GOLDEN) % 1.0
        saturation = 0.55 + 0.4 * ((k * 0.7548776662466927) % 1.0)
        value = 0.7 + 0.3 * ((k * 0.5698402909980532) % 1.0)
        colours[k] = [round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value)]
    return colours


def _to_uint8_array(image: Tensor) -> np.ndarray:
    """``[3, H, W]`` in ``[-1, 1]`` → uint8 ``[H, W, 3]``."""
    return np.asarray(to_uint8_image(image))


def _auto_scale(side: int) -> int:
    return max(1, math.ceil(_MIN_SIDE / max(side, 1)))


# ----------------------------------------------------------------------------------------------------------------------
# Grids
# ----------------------------------------------------------------------------------------------------------------------


def image_grid(
    images: Sequence[Tensor] | Tensor, *, nrow: int, padding: int = 2, pad_value: float = 1.0
) -> Image.Image:
    """Tile images into a grid with ``nrow`` images per row (the last row may be short).

    ``pad_value`` is in image units (``[-1, 1]``: 1 is white, -1 black). With ``N`` images of ``H×W`` the result is
    ``(c·W + (c+1)·padding) × (r·H + (r+1)·padding)`` with ``c = min(nrow, N)`` columns and ``r = ⌈N/nrow⌉`` rows.
    """
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W], got shape {tuple(images.shape)}")
        batch = list(images)
    else:
        batch = list(images)
    if not batch:
        raise ValueError("image_grid needs at least one image")
    if nrow < 1 or padding < 0:
        raise ValueError(f"need nrow >= 1 and padding >= 0, got nrow={nrow}, padding={padding}")
    shape = tuple(batch[0].shape)
    if len(shape) != 3 or shape[0] != 3 or any(tuple(im.shape) != shape for im in batch):
        raise ValueError(f"all images must be [3, H, W] of one size, got {sorted({tuple(im.shape) for im in batch})}")
    _, height, width = shape
    cols, rows = min(nrow, len(batch)), math.ceil(len(batch) / nrow)
    canvas = torch.full(
        (3, rows * height + (rows + 1) * padding, cols * width + (cols + 1) * padding), float(pad_value)
    )
    for i, image in enumerate(batch):
        top = padding + (i // nrow) * (height + padding)
        left = padding + (i % nrow) * (width + padding)
        canvas[:, top : top + height, left : left + width] = image.detach().float().cpu()
    return to_uint8_image(canvas)


# ----------------------------------------------------------------------------------------------------------------------
# Merge maps
# ----------------------------------------------------------------------------------------------------------------------


def merge_map(
    assignment: Tensor,
    *,
    grid: tuple[int, int],
    image: Tensor | None = None,
    upscale: int | None = None,
    alpha: float = 0.55,
    boundaries: bool = True,
    boundary_color: tuple[int, int, int] = (0, 0, 0),
) -> Image.Image:
    """Colour every grid position by its merged group; optionally blend over ``image`` and outline the groups.

    ``assignment`` is ``[L]`` or ``[h, w]`` with ``L = h·w`` group ids. The canvas is ``image``'s resolution when an
    image is given (the grid is upsampled nearest-neighbour onto it, so cells follow the encoder's receptive grid),
    else one pixel per grid cell; ``upscale`` multiplies it (default: the smallest factor giving a side ≥ 128 px).
    ``alpha`` is the opacity of the colours over the image. Boundaries are 1-px lines where neighbouring cells
    belong to different groups, drawn only when a cell is at least 3 px wide so they never swamp the colours.
    """
    height, width = int(grid[0]), int(grid[1])
    if assignment.numel() != height * width:
        raise ValueError(
            f"assignment has {assignment.numel()} positions but grid {height}x{width} has {height * width}"
        )
    if assignment.dtype.is_floating_point:
        raise TypeError(f"assignment must hold integer group ids, got {assignment.dtype}")
    groups_hw = assignment.detach().cpu().long().reshape(height, width).numpy()
    if groups_hw.min() < 0:
        raise ValueError(f"assignment values must be >= 0, got {int(groups_hw.min())}")
    base_h, base_w = (height, width) if image is None else (int(image.shape[-2]), int(image.shape[-1]))
    if image is not None and (image.ndim != 3 or image.shape[0] != 3):
        raise ValueError(f"expected image [3, H, W], got shape {tuple(image.shape)}")
    scale = _auto_scale(min(base_h, base_w)) if upscale is None else int(upscale)
    if scale < 1:
        raise ValueError(f"upscale must be >= 1, got {upscale}")
    out_h, out_w = base_h * scale, base_w * scale

    # Nearest mapping pixel → cell also covers canvases that are not a multiple of the grid.
    rows = (np.arange(out_h) * height) // out_h
    cols = (np.arange(out_w) * width) // out_w
    groups_px = groups_hw[rows[:, None], cols[None, :]]
    colours = palette(int(groups_hw.max()) + 1)[groups_px].astype(np.float32)
    if image is not None:
        pixels = _to_uint8_array(image).repeat(scale, axis=0).repeat(scale, axis=1).astype(np.float32)
        colours = alpha * colours + (1.0 - alpha) * pixels
    out = np.clip(np.rint(colours), 0, 255).astype(np.uint8)

    if boundaries and min(out_h // height, out_w // width) >= 3:
        edge = np.zeros((out_h, out_w), dtype=bool)
        edge[:, 1:] |= groups_px[:, 1:] != groups_px[:, :-1]  # first pixel column of a new group
        edge[1:, :] |= groups_px[1:, :] != groups_px[:-1, :]
        out[edge] = boundary_color
    return Image.fromarray(out, mode="RGB")


# ----------------------------------------------------------------------------------------------------------------------
# Reconstruction panels
# ----------------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont | None:
    # Pillow >= 10.1 ships a scalable default font when FreeType is present; older or minimal builds only the bitmap.
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError, AttributeError):
        pass
    try:
        return ImageFont.load_default()
    except (OSError, ImportError):
        return None  # no font at all: the panel is drawn without labels


def _text_height(font: ImageFont.ImageFont | ImageFont.FreeTypeFont | None) -> int:
    if font is None:
        return 0
    bottom = font.getbbox("Kg=0123456789 dB")[3]
    return int(bottom) + 4


def _format_psnr(value: float) -> str:
    return "PSNR inf" if math.isinf(value) else f"{value:.2f} dB"


def make_reconstruction_panel(
    *,
    original: Tensor,
    reconstructions: Mapping[int, Tensor],
    assignments: Mapping[int, Tensor] | None,
    grid: tuple[int, int],
    psnr: Mapping[int, float] | None = None,
    scale: int | None = None,
    padding: int = 4,
) -> Image.Image:
    """One row: ``input | (merge map, reconstruction) per K``, each tile under a small label.

    ``reconstructions`` and ``assignments`` map K to ``[3, H, W]`` and ``[L]``; pass ``assignments=None`` for a row
    without merge maps. PSNR (dB, per image on ``[-1, 1]``) is computed unless given. ``scale`` magnifies every tile
    (default: the smallest factor giving tiles ≥ 128 px, so 32×32 images stay readable).
    """
    if original.ndim != 3 or original.shape[0] != 3:
        raise ValueError(f"expected original [3, H, W], got shape {tuple(original.shape)}")
    if assignments is not None and set(assignments) != set(reconstructions):
        raise ValueError(f"assignments cover K={sorted(assignments)} but reconstructions K={sorted(reconstructions)}")
    height, width = int(original.shape[1]), int(original.shape[2])
    factor = _auto_scale(min(height, width)) if scale is None else int(scale)
    tile_h, tile_w = height * factor, width * factor

    def enlarge(image: Tensor) -> Image.Image:
        return to_uint8_image(image).resize((tile_w, tile_h), Image.Resampling.NEAREST)

    original = original.detach().float().cpu()
    tiles: list[tuple[str, Image.Image]] = [("input", enlarge(original))]
    for k, reconstruction in reconstructions.items():
        reconstruction = reconstruction.detach().float().cpu().clamp(-1, 1)
        if reconstruction.shape != original.shape:
            raise ValueError(
                f"reconstruction for K={k} has shape {tuple(reconstruction.shape)}, expected {tuple(original.shape)}"
            )
        value = (
            float(psnr[k])
            if psnr is not None and k in psnr
            else float(psnr_per_image(reconstruction[None], original.clamp(-1, 1)[None])[0])
        )
        if assignments is not None:
            tiles.append((f"K={k} merges", merge_map(assignments[k], grid=grid, image=original, upscale=factor)))
        tiles.append((f"K={k}: {_format_psnr(value)}", enlarge(reconstruction)))

    font = _font(max(10, min(14, tile_w // 10)))
    label_h = _text_height(font)
    panel = Image.new(
        "RGB",
        (len(tiles) * tile_w + (len(tiles) + 1) * padding, tile_h + label_h + 2 * padding),
        _BACKGROUND,
    )
    draw = ImageDraw.Draw(panel)
    for i, (label, tile) in enumerate(tiles):
        left = padding + i * (tile_w + padding)
        panel.paste(tile, (left, padding + label_h))
        if font is not None:
            draw.text((left + 1, padding), label, fill=_TEXT, font=font)
    return panel


def save_reconstruction_panel(
    path: str | Path,
    *,
    original: Tensor,
    reconstructions: Mapping[int, Tensor],
    assignments: Mapping[int, Tensor] | None,
    grid: tuple[int, int],
    psnr: Mapping[int, float] | None = None,
    scale: int | None = None,
) -> Path:
    """Write :func:`make_reconstruction_panel` to ``path`` (format from the suffix, PNG recommended)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_reconstruction_panel(
        original=original,
        reconstructions=reconstructions,
        assignments=assignments,
        grid=grid,
        psnr=psnr,
        scale=scale,
    ).save(path)
    return path
