"""Whole photographs through a tokenizer trained on small crops: cut into tiles, encode each, stitch back.

A tiny tokenizer sees ``S×S`` images; a photo of ``(r·S)×(c·S)`` pixels becomes ``r·c`` tiles. The merge groups of
all tiles are renumbered into one assignment over the photo's full token grid, so a single merge map shows every
group of every tile, each in its own colour, with boundaries across tile edges too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TiledReconstruction", "reconstruct_tiled", "stitch", "tile"]


def tile(image: Tensor, *, size: int) -> Tensor:
    """``[3, r·size, c·size]`` → ``[r·c, 3, size, size]``, tiles in raster order."""
    channels, height, width = image.shape
    if height % size or width % size:
        raise ValueError(f"image of {height}x{width} px does not split into {size}x{size} tiles")
    rows, cols = height // size, width // size
    tiles = image.reshape(channels, rows, size, cols, size).permute(1, 3, 0, 2, 4)
    return tiles.reshape(rows * cols, channels, size, size)


def stitch(tiles: Tensor, *, rows: int, cols: int) -> Tensor:
    """The inverse of :func:`tile`: ``[r·c, C, h, w]`` → ``[C, r·h, c·w]`` (also for token grids with C = 1)."""
    count, channels, height, width = tiles.shape
    if count != rows * cols:
        raise ValueError(f"{count} tiles cannot fill a {rows}x{cols} layout")
    grid = tiles.reshape(rows, cols, channels, height, width).permute(2, 0, 3, 1, 4)
    return grid.reshape(channels, rows * height, cols * width)


@dataclass(frozen=True)
class TiledReconstruction:
    reconstruction: Tensor  # [3, H, W] in [-1, 1], the tiles' reconstructions stitched
    assignment: Tensor  # [H/f, W/f] group id of every token position, unique across tiles
    num_groups: int  # merged tokens over the whole photo (K per tile × tiles)
    grid: tuple[int, int]  # the photo's token grid (rows, cols)


@torch.no_grad()
def reconstruct_tiled(
    *, model: torch.nn.Module, image: Tensor, num_tokens: int, batch_size: int = 64
) -> TiledReconstruction:
    """Encode every tile of ``image`` with ``num_tokens`` merged tokens, decode, stitch; renumber the groups."""
    config = model.config
    size, per_side = config.image_size, config.grid_size
    rows, cols = image.shape[1] // size, image.shape[2] // size
    tiles = tile(image, size=size)
    recon, groups = [], []
    for first in range(0, len(tiles), batch_size):
        encoded = model.encode(tiles[first : first + batch_size], num_tokens=num_tokens)
        recon.append(model.decode(encoded).clamp(-1, 1))
        groups.append(encoded.assignment)
    assignment_NL = torch.cat(groups)
    # Tile t's group k becomes t·K + k: every group keeps its own id (and colour) over the whole photo.
    offsets = torch.arange(len(tiles), device=assignment_NL.device)[:, None] * num_tokens
    unique_NL = (assignment_NL + offsets).reshape(len(tiles), 1, per_side, per_side)
    return TiledReconstruction(
        reconstruction=stitch(torch.cat(recon), rows=rows, cols=cols),
        assignment=stitch(unique_NL, rows=rows, cols=cols)[0],
        num_groups=len(tiles) * num_tokens,
        grid=(rows * per_side, cols * per_side),
    )
