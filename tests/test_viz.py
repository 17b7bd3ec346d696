"""Image grids, merge maps and reconstruction panels (mergevq.viz)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mergevq import viz
from mergevq.data.transforms import to_uint8_image
from mergevq.viz import image_grid, make_reconstruction_panel, merge_map, palette, save_reconstruction_panel


def _random_images(n: int, h: int, w: int, *, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=generator) * 2 - 1


# ---------------------------------------------------------------------------------------------------------------- grid


def test_image_grid_size_and_placement() -> None:
    images = _random_images(5, 8, 6)
    grid = image_grid(images, nrow=3, padding=2)
    # 3 columns, 2 rows: width 3·6 + 4·2, height 2·8 + 3·2.
    assert grid.size == (26, 22)
    pixels = np.asarray(grid)
    assert (pixels[0, :, :] == 255).all() and (pixels[:, 0, :] == 255).all()  # padding is white for pad_value=1
    # Image 4 (row 1, column 1) sits at top = 2 + 8 + 2, left = 2 + 6 + 2.
    expected = np.asarray(to_uint8_image(images[4]))
    np.testing.assert_array_equal(pixels[12:20, 10:16], expected)
    assert (pixels[12:20, 18:24] == 255).all()  # the missing 6th slot stays padding
    assert np.array_equal(np.asarray(image_grid(list(images), nrow=3)), pixels)  # list == batch tensor


def test_image_grid_pad_value_and_single_row() -> None:
    grid = image_grid(_random_images(2, 4, 4), nrow=8, padding=1, pad_value=-1.0)
    assert grid.size == (2 * 4 + 3, 4 + 2)  # columns = min(nrow, N)
    assert (np.asarray(grid)[0] == 0).all()  # pad_value -1 is black


def test_image_grid_rejects_mixed_sizes() -> None:
    with pytest.raises(ValueError, match="one size"):
        image_grid([torch.zeros(3, 4, 4), torch.zeros(3, 5, 4)], nrow=2)


# ----------------------------------------------------------------------------------------------------------- merge map


def test_palette_is_deterministic_and_distinct() -> None:
    colours = palette(256)
    assert colours.shape == (256, 3) and colours.dtype == np.uint8
    assert len({tuple(c) for c in colours}) == 256
    np.testing.assert_array_equal(palette(16), colours[:16])


# A 4×4 grid with 5 groups: four quadrants, except that group 4 takes two separated cells (ToMe merges need not be
# contiguous).
_ASSIGNMENT_HW = torch.tensor(
    [
        [0, 0, 1, 4],
        [0, 0, 1, 1],
        [2, 2, 3, 3],
        [4, 2, 3, 3],
    ]
)


def _cell_colours(image: Image.Image, grid: int) -> np.ndarray:
    """Colour at the centre of every grid cell → [grid, grid, 3]."""
    pixels = np.asarray(image)
    cell = pixels.shape[0] // grid
    centres = np.arange(grid) * cell + cell // 2
    return pixels[centres[:, None], centres[None, :]]


def test_merge_map_colours_groups() -> None:
    image = merge_map(_ASSIGNMENT_HW.flatten(), grid=(4, 4), upscale=8, boundaries=False)
    assert image.size == (32, 32) and image.mode == "RGB"
    pixels = np.asarray(image)
    colours = _cell_colours(image, 4)
    for group in range(5):
        cells = colours[_ASSIGNMENT_HW.numpy() == group]
        assert (cells == cells[0]).all(), f"group {group} is not one colour"
        np.testing.assert_array_equal(cells[0], palette(5)[group])
    distinct = {tuple(colours[_ASSIGNMENT_HW.numpy() == g][0]) for g in range(5)}
    assert len(distinct) == 5
    # Without boundaries, every pixel of a cell has the cell's colour.
    np.testing.assert_array_equal(pixels[8:16, 0:8], np.broadcast_to(colours[1, 0], (8, 8, 3)))


def test_merge_map_boundaries_and_shape_forms() -> None:
    flat = merge_map(_ASSIGNMENT_HW.flatten(), grid=(4, 4), upscale=8)
    square = merge_map(_ASSIGNMENT_HW, grid=(4, 4), upscale=8)
    np.testing.assert_array_equal(np.asarray(flat), np.asarray(square))  # [L] and [h, w] mean the same
    pixels = np.asarray(flat)
    assert (pixels[0:16, 16] == 0).all()  # group 0 | group 1 edge, first column of the new group
    assert not (pixels[0:16, 8] == 0).all(-1).any()  # no line inside group 0
    np.testing.assert_array_equal(
        _cell_colours(flat, 4), _cell_colours(merge_map(_ASSIGNMENT_HW, grid=(4, 4), upscale=8, boundaries=False), 4)
    )


def test_merge_map_over_image() -> None:
    picture = _random_images(1, 16, 16)[0]
    over = merge_map(_ASSIGNMENT_HW, grid=(4, 4), image=picture, upscale=2, boundaries=False, alpha=0.0)
    assert over.size == (32, 32)  # image resolution × upscale
    expected = np.asarray(to_uint8_image(picture)).repeat(2, axis=0).repeat(2, axis=1)
    np.testing.assert_array_equal(np.asarray(over), expected)  # alpha 0: the image itself, nearest-upsampled
    opaque = merge_map(_ASSIGNMENT_HW, grid=(4, 4), image=picture, upscale=2, boundaries=False, alpha=1.0)
    np.testing.assert_array_equal(
        np.asarray(opaque), np.asarray(merge_map(_ASSIGNMENT_HW, grid=(4, 4), upscale=8, boundaries=False))
    )
    assert merge_map(_ASSIGNMENT_HW, grid=(4, 4), image=picture).size == (128, 128)  # auto upscale to ≥ 128 px


def test_merge_map_rejects_wrong_sizes() -> None:
    with pytest.raises(ValueError, match="16 positions"):
        merge_map(torch.zeros(16, dtype=torch.long), grid=(3, 3))
    with pytest.raises(TypeError, match="integer"):
        merge_map(torch.zeros(16), grid=(4, 4))


# --------------------------------------------------------------------------------------------------------------- panel


def test_reconstruction_panel_written_and_readable(tmp_path) -> None:
    original = _random_images(1, 32, 32)[0]
    reconstructions = {8: _random_images(1, 32, 32, seed=1)[0], 64: original.clone()}
    assignments = {8: torch.arange(64) % 8, 64: torch.arange(64)}
    path = save_reconstruction_panel(
        tmp_path / "sub" / "panel.png",
        original=original,
        reconstructions=reconstructions,
        assignments=assignments,
        grid=(8, 8),
    )
    with Image.open(path) as panel:
        panel.load()
        width, height = panel.size
    tile = 128  # 32 px tiles are magnified 4× for readability
    assert width == 5 * tile + 6 * 4  # input + (merge map, reconstruction) × 2
    assert height > tile
    without_maps = make_reconstruction_panel(
        original=original, reconstructions=reconstructions, assignments=None, grid=(8, 8), scale=1
    )
    assert without_maps.size[0] == 3 * 32 + 4 * 4


def test_reconstruction_panel_without_fonts(monkeypatch) -> None:
    monkeypatch.setattr(viz, "_font", lambda size: None)  # e.g. a Pillow build without any font
    panel = make_reconstruction_panel(
        original=torch.zeros(3, 16, 16),
        reconstructions={4: torch.zeros(3, 16, 16)},  # identical images: PSNR = inf must not break the label
        assignments={4: torch.arange(16) % 4},
        grid=(4, 4),
        scale=2,
    )
    assert panel.size == (3 * 32 + 4 * 4, 32 + 2 * 4)  # no label strip
