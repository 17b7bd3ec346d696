"""Image transforms on PIL images with Pillow, NumPy and torch only (no torchvision).

Every random transform takes an explicit ``random.Random`` so that augmentation is a pure function of
(image, rng state): the dataset derives one rng per (seed, epoch, index), which makes data order and
augmentation reproducible and resumable across processes and workers.

Tensors follow the tokenizer convention: ``[3, H, W]`` float32 in ``[-1, 1]``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

__all__ = [
    "ImageTransform",
    "center_crop",
    "eval_transform",
    "hflip",
    "random_crop",
    "random_resized_crop",
    "resize_shorter_side",
    "to_rgb",
    "to_tensor",
    "to_uint8_image",
    "train_transform",
]

Size = int | tuple[int, int]  # an int is a square; a tuple is (height, width)

_WHITE = (255, 255, 255)
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_INT16_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


# ----------------------------------------------------------------------------------------------------------------------
# Colour modes
# ----------------------------------------------------------------------------------------------------------------------


def _gray_to_rgb(gray_u8: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(gray_u8[:, :, None], 3, axis=2), mode="RGB")


def _rescale_to_u8(values: np.ndarray, *, low: float, high: float) -> np.ndarray:
    # Linear map [low, high] -> [0, 255] with rounding; a constant image maps to black.
    span = high - low
    if span <= 0:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float64) - low) * (255.0 / span)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow image to 8-bit RGB.

    - ``RGB`` is returned unchanged; ``1``, ``L``, ``CMYK``, ``YCbCr``, ``HSV`` and others use Pillow's conversion.
    - Transparency (``LA``, ``PA``, ``RGBA``, premultiplied modes, and ``P``/``L``/``RGB`` images with a
      ``transparency`` entry) is composited on a **white** background, the usual look of such images on a page.
    - 16-bit integer modes (``I;16``, ``I;16B``, ...) map 0..65535 linearly onto 0..255 (``v / 257``, rounded), so
      the full range is kept instead of clipped at 255.
    - ``I`` (32-bit int, what some decoders produce for 16-bit files) is read as 16-bit when its values lie in
      0..65535, otherwise rescaled from its own [min, max].
    - ``F`` (float): values in [0, 1] are intensities (x 255), values in [0, 255] are kept, anything else is
      rescaled from its own [min, max].
    """
    mode = img.mode
    if img.width == 0 or img.height == 0:
        return Image.new("RGB", img.size)
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _INT16_MODES:
        values = np.asarray(img).astype(np.uint32)
        # v / 257 is exact at both ends (65535 -> 255); integer rounding avoids float drift.
        return _gray_to_rgb(((values * 2 + 257) // 514).astype(np.uint8))
    if mode == "I":
        values = np.asarray(img, dtype=np.int64)
        if values.size and values.min() >= 0 and values.max() <= 65535:
            return _gray_to_rgb(((values * 2 + 257) // 514).astype(np.uint8))
        return _gray_to_rgb(_rescale_to_u8(values, low=float(values.min()), high=float(values.max())))
    if mode == "F":
        values = np.asarray(img, dtype=np.float64)
        finite = values[np.isfinite(values)]
        low = float(finite.min()) if finite.size else 0.0
        high = float(finite.max()) if finite.size else 0.0
        values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
        if low >= 0.0 and high <= 1.0:
            low, high = 0.0, 1.0
        elif low >= 0.0 and high <= 255.0:
            low, high = 0.0, 255.0
        return _gray_to_rgb(_rescale_to_u8(values, low=low, high=high))
    # High-bit-depth modes are handled above without their (rare) transparency key: Pillow's RGBA path would clip.
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


# ----------------------------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------------------------


def _pair(size: Size) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if height <= 0 or width <= 0:
        raise ValueError(f"crop/resize size must be positive, got {size!r}")
    return height, width


def resize_shorter_side(img: Image.Image, size: int, *, resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """Resize so that the shorter side equals ``size``, keeping the aspect ratio (the longer side is rounded)."""
    if size <= 0:
        raise ValueError(f"resize size must be positive, got {size}")
    width, height = img.size
    if min(width, height) == size:
        return img
    if width <= height:
        new_w, new_h = size, max(size, round(height * size / width))
    else:
        new_w, new_h = max(size, round(width * size / height)), size
    return img.resize((new_w, new_h), resample=resample)


def _crop(img: Image.Image, *, top: int, left: int, height: int, width: int) -> Image.Image:
    return img.crop((left, top, left + width, top + height))


def _check_fits(img: Image.Image, height: int, width: int) -> None:
    if img.height < height or img.width < width:
        raise ValueError(
            f"cannot crop {height}x{width} from a {img.height}x{img.width} image; resize it first "
            "(e.g. resize_shorter_side with a size >= the crop)"
        )


def center_crop(img: Image.Image, size: Size) -> Image.Image:
    """Crop the central ``size`` region (offsets rounded like ``round((H - h) / 2)``)."""
    height, width = _pair(size)
    _check_fits(img, height, width)
    top = int(round((img.height - height) / 2.0))
    left = int(round((img.width - width) / 2.0))
    return _crop(img, top=top, left=left, height=height, width=width)


def random_crop(img: Image.Image, size: Size, *, rng: random.Random) -> Image.Image:
    """Crop a ``size`` region at a uniformly random position drawn from ``rng`` (top first, then left)."""
    height, width = _pair(size)
    _check_fits(img, height, width)
    top = rng.randint(0, img.height - height)
    left = rng.randint(0, img.width - width)
    return _crop(img, top=top, left=left, height=height, width=width)


def _random_resized_box(
    img_h: int, img_w: int, *, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    area = img_h * img_w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= img_w and 0 < h <= img_h:
            return rng.randint(0, img_h - h), rng.randint(0, img_w - w), h, w
    # Fallback after 10 misses: the largest central box whose aspect ratio is clamped into `ratio`.
    in_ratio = img_w / img_h
    if in_ratio < ratio[0]:
        w, h = img_w, int(round(img_w / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = img_h, int(round(img_h * ratio[1]))
    else:
        w, h = img_w, img_h
    return (img_h - h) // 2, (img_w - w) // 2, h, w


def random_resized_crop(
    img: Image.Image,
    size: Size,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    rng: random.Random,
    resample: int = Image.Resampling.BICUBIC,
) -> Image.Image:
    """Crop a random box covering ``scale`` of the area with aspect ratio in ``ratio`` (log-uniform), then resize it
    to ``size``. Ten attempts, then a central box, as in the Inception/ImageNet recipe."""
    if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"need 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], got {scale=} {ratio=}")
    out_h, out_w = _pair(size)
    top, left, h, w = _random_resized_box(img.height, img.width, scale=scale, ratio=ratio, rng=rng)
    return img.resize((out_w, out_h), resample=resample, box=(left, top, left + w, top + h))


def hflip(img: Image.Image) -> Image.Image:
    """Mirror left-right."""
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


# ----------------------------------------------------------------------------------------------------------------------
# PIL <-> tensor
# ----------------------------------------------------------------------------------------------------------------------


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> ``[3, H, W]`` float32 in ``[-1, 1]`` (``v / 127.5 - 1``); other modes go through :func:`to_rgb`."""
    array_hw3 = np.asarray(to_rgb(img), dtype=np.uint8)
    tensor_3hw = torch.from_numpy(array_hw3.copy()).permute(2, 0, 1).float()
    return tensor_3hw.div_(127.5).sub_(1.0)


def to_uint8(tensor: torch.Tensor) -> torch.Tensor:
    """Values in ``[-1, 1]`` -> uint8 levels on the CPU, same shape; clamped, then rounded to the nearest level."""
    return ((tensor.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def to_uint8_image(tensor: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` tensor in ``[-1, 1]`` -> RGB PIL image (:func:`to_uint8` levels)."""
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected a [3, H, W] tensor, got shape {tuple(tensor.shape)}")
    return Image.fromarray(to_uint8(tensor).permute(1, 2, 0).contiguous().numpy(), mode="RGB")


# ----------------------------------------------------------------------------------------------------------------------
# Composite transform and presets
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ImageTransform:
    """``to_rgb`` -> resize shorter side -> crop -> optional flip -> tensor in ``[-1, 1]``.

    Random draws happen in a fixed order (crop position, then flip) from the rng passed at call time, so the output is
    a pure function of (image, rng state). ``crop="random_resized"`` crops from the original image and resizes the box
    to ``size`` (``resize`` is then unused), like the student view of SPEC §2.6.
    """

    size: int  # output side (square)
    resize: int | None = None  # shorter side before cropping; None -> size
    crop: Literal["center", "random", "random_resized"] = "center"
    hflip: bool = False  # random horizontal flip with probability 1/2
    resample: int = Image.Resampling.BICUBIC
    scale: tuple[float, float] = (0.08, 1.0)  # random_resized only
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random_resized only

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")
        if self.resize is None:
            self.resize = self.size
        if self.crop not in ("center", "random", "random_resized"):
            raise ValueError(f"crop must be 'center', 'random' or 'random_resized', got {self.crop!r}")
        if self.crop != "random_resized" and self.resize < self.size:
            raise ValueError(f"resize ({self.resize}) must be >= size ({self.size}) to crop {self.size}x{self.size}")

    @property
    def is_random(self) -> bool:
        return self.crop != "center" or self.hflip

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        if rng is None and self.is_random:
            raise ValueError(f"this transform is random (crop={self.crop!r}, hflip={self.hflip}); pass an rng")
        img = to_rgb(img)
        if self.crop == "random_resized":
            assert rng is not None
            img = random_resized_crop(
                img, self.size, scale=self.scale, ratio=self.ratio, rng=rng, resample=self.resample
            )
        else:
            assert self.resize is not None
            img = resize_shorter_side(img, self.resize, resample=self.resample)
            img = random_crop(img, self.size, rng=rng) if self.crop == "random" else center_crop(img, self.size)
        if self.hflip and rng is not None and rng.random() < 0.5:
            img = hflip(img)
        return to_tensor(img)


def train_transform(size: int, *, resize: int | None = None, hflip: bool = False) -> ImageTransform:
    """Stage-1 reconstruction view (SPEC §2.6): Resize shorter side (bicubic) + RandomCrop, no flip by default."""
    return ImageTransform(size=size, resize=resize, crop="random", hflip=hflip, resample=Image.Resampling.BICUBIC)


def eval_transform(size: int, *, resize: int | None = None) -> ImageTransform:
    """Evaluation view (SPEC §7): Resize shorter side (bilinear, as the reference rFID code) + CenterCrop."""
    return ImageTransform(size=size, resize=resize, crop="center", hflip=False, resample=Image.Resampling.BILINEAR)
