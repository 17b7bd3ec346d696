"""The demo's photographs: the ones bundled in the scikit-image wheel, or any image folder, split by whole photo.

The built-in set is read straight from the installed wheel's ``skimage/data`` folder with Pillow; nothing of
scikit-image is imported (its functions would pull in SciPy and more), so ``pip install --no-deps scikit-image`` is
enough. Training uses random crops of the training photos; evaluation uses photos the tokenizer never saw.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from mergevq.data.images import ImageDecodeError, list_images, load_image
from mergevq.data.transforms import resize_shorter_side, to_tensor

__all__ = [
    "BUILTIN_HELD_OUT",
    "BUILTIN_PHOTOS",
    "CropSet",
    "DemoDataError",
    "Photo",
    "PhotoSet",
    "PhotoSource",
    "builtin_photo_dir",
    "crops_of",
    "fit_for_tiling",
    "load_builtin_photos",
    "load_folder_photos",
    "write_training_crops",
]


class DemoDataError(RuntimeError):
    """The demo's photographs cannot be found or read; the message says which and how to fix it."""


@dataclass(frozen=True)
class PhotoSource:
    name: str  # short name, used for file names and as the class name of its crops
    file: str  # file name inside the wheel's skimage/data folder
    credit: str  # what the picture is, its source and licence, as the wheel's docstrings state them


# Colour photographs shipped in the scikit-image wheel. The credit lines repeat the notes of the wheel's own
# loaders (skimage/data/_fetchers.py); where the wheel states no licence, the line says so.
BUILTIN_PHOTOS: tuple[PhotoSource, ...] = (
    PhotoSource(
        "astronaut",
        "astronaut.png",
        "Eileen Collins, NASA Great Images database; no known copyright restrictions, released into the public domain",
    ),
    PhotoSource(
        "chelsea",
        "chelsea.png",
        "Chelsea the cat; no copyright restrictions, CC0 by the photographer (Stefan van der Walt)",
    ),
    PhotoSource(
        "coffee",
        "coffee.png",
        "coffee cup, courtesy of Pikolo Espresso Bar; no copyright restrictions, CC0 by the photographer "
        "(Rachel Michetti)",
    ),
    PhotoSource(
        "hubble_deep_field",
        "hubble_deep_field.jpg",
        "Hubble eXtreme Deep Field, HubbleSite; captured by NASA, may be freely used in the public domain",
    ),
    PhotoSource(
        "immunohistochemistry",
        "ihc.png",
        "immunohistochemical staining of colonic glands, Center for Microscopy And Molecular Imaging (CMMI); "
        "no known copyright restrictions",
    ),
    PhotoSource(
        "motorcycle",
        "motorcycle_left.png",
        "left view of the Middlebury 2014 stereo benchmark's motorcycle (Scharstein et al., GCPR 2014), "
        "down-sampled by 4; the wheel states no licence",
    ),
    PhotoSource(
        "retina",
        "retina.jpg",
        "fundus photograph of a normal left eye (Mikael Häggström, Wikimedia Commons); CC0 1.0 Universal "
        "Public Domain Dedication",
    ),
    PhotoSource(
        "rocket",
        "rocket.jpg",
        "launch of DSCOVR on Falcon 9, SpaceX Photos; released in the public domain by SpaceX",
    ),
)
# Whole photographs kept out of training: everyday scenes, unlike most of the rest.
BUILTIN_HELD_OUT: tuple[str, ...] = ("chelsea", "coffee")


@dataclass(frozen=True)
class Photo:
    name: str
    path: Path
    image: Image.Image  # 8-bit RGB, full resolution
    credit: str  # source and licence ("" when unknown, e.g. a user's folder)


@dataclass(frozen=True)
class PhotoSet:
    """Training photos (class ``i`` = ``train[i]``) and held-out photos; ``source`` says where they came from."""

    train: tuple[Photo, ...]
    held_out: tuple[Photo, ...]
    source: str

    @property
    def class_names(self) -> list[str]:
        return [photo.name for photo in self.train]


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


def builtin_photo_dir() -> Path:
    """The ``skimage/data`` folder of the installed scikit-image wheel (the package itself is not imported)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise DemoDataError(
            "the built-in photographs come from the scikit-image wheel, which is not installed: "
            "pip install --no-deps scikit-image (only its data files are used), or pass --data DIR"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    missing = [source.file for source in BUILTIN_PHOTOS if not (folder / source.file).is_file()]
    if missing:
        raise DemoDataError(f"{folder} lacks {', '.join(missing)}; this scikit-image wheel ships other files")
    return folder


def _read(path: Path) -> Image.Image:
    try:
        return load_image(path)
    except ImageDecodeError as error:
        raise DemoDataError(str(error)) from error


def load_builtin_photos() -> PhotoSet:
    """The scikit-image photographs, with :data:`BUILTIN_HELD_OUT` kept for evaluation."""
    folder = builtin_photo_dir()
    photos = [Photo(s.name, folder / s.file, _read(folder / s.file), s.credit) for s in BUILTIN_PHOTOS]
    version = importlib.metadata.version("scikit-image")
    return PhotoSet(
        train=tuple(p for p in photos if p.name not in BUILTIN_HELD_OUT),
        held_out=tuple(p for p in photos if p.name in BUILTIN_HELD_OUT),
        source=f"the photographs bundled in the scikit-image {version} wheel",
    )


def load_folder_photos(*, root: str | Path, held_out: int, max_photos: int) -> PhotoSet:
    """Every image under ``root`` (ImageFolder or flat), one photo each; ``held_out`` of them kept for evaluation.

    With more than ``max_photos`` files an evenly strided subset is used. The held-out photos are spread evenly over
    the sorted list too, so a folder sorted by subject keeps every subject in training.
    """
    root = Path(root).expanduser()
    try:
        files = [path for path, _ in list_images(root)]
    except (FileNotFoundError, NotADirectoryError) as error:
        raise DemoDataError(f"--data {root}: {error}") from error
    if max_photos < 2 or held_out < 1 or held_out >= max_photos:
        raise DemoDataError(f"need max_photos >= 2 and 1 <= held_out < max_photos, got {max_photos}, {held_out}")
    if len(files) < 2:
        raise DemoDataError(f"--data {root} holds {len(files)} image(s); the demo needs at least 2 (train + held out)")
    if len(files) > max_photos:
        files = [files[i * len(files) // max_photos] for i in range(max_photos)]
    held_out = min(held_out, len(files) - 1)
    chosen = {round((i + 0.5) * len(files) / held_out - 0.5) for i in range(held_out)}
    names: set[str] = set()
    photos = []
    for i, path in enumerate(files):
        name = path.relative_to(root).with_suffix("").as_posix().replace("/", "_")
        while name in names:  # a.jpg and a.png
            name += "_"
        names.add(name)
        photos.append((i in chosen, Photo(name, path, _read(path), "")))
    return PhotoSet(
        train=tuple(p for kept, p in photos if not kept),
        held_out=tuple(p for kept, p in photos if kept),
        source=f"the image folder {root}",
    )


# ----------------------------------------------------------------------------------------------------------------------
# Crops and tiling sizes
# ----------------------------------------------------------------------------------------------------------------------


def fit_for_tiling(image: Image.Image, *, shorter: int, multiple: int) -> Image.Image:
    """Resize the shorter side to ``shorter`` and centre-crop the longer one to a multiple of ``multiple``."""
    if shorter % multiple:
        raise ValueError(f"shorter side {shorter} is not a multiple of the tile size {multiple}")
    resized = resize_shorter_side(image, shorter)
    width = resized.width - resized.width % multiple
    height = resized.height - resized.height % multiple
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def _random_crops(scaled: Image.Image, *, count: int, size: int, rng: random.Random) -> list[Image.Image]:
    """``count`` crops of ``size`` px at uniformly random positions of an already resized photo."""
    crops = []
    for _ in range(count):
        left = rng.randrange(scaled.width - size + 1)
        top = rng.randrange(scaled.height - size + 1)
        crops.append(scaled.crop((left, top, left + size, top + size)))
    return crops


def write_training_crops(
    *, photos: tuple[Photo, ...], output: Path, count: int, size: int, scales: tuple[int, ...], seed: int
) -> Path:
    """``count`` random crops per photo as PNG files in an ImageFolder: ``output/NN_<name>/NNNNN.png``.

    The crops are spread evenly over the photo resized to each shorter side in ``scales`` (several scales: the
    tokenizer sees both fine texture and whole objects). The ``NN_`` prefix keeps the folders in photo order, so a
    crop's class label is its photo's index.
    """
    rng = random.Random(seed)
    for index, photo in enumerate(photos):
        folder = output / f"{index:02d}_{photo.name}"
        folder.mkdir(parents=True, exist_ok=True)
        written = 0
        for j, scale in enumerate(scales):
            share = (count + len(scales) - 1 - j) // len(scales)  # the shares add up to count
            scaled = resize_shorter_side(photo.image, max(scale, size))  # once per scale: resizing is the slow part
            for crop in _random_crops(scaled, count=share, size=size, rng=rng):
                crop.save(folder / f"{written:05d}.png")
                written += 1
    return output


@dataclass(frozen=True)
class CropSet:
    images: torch.Tensor  # [N, 3, size, size] in [-1, 1]
    photos: list[str]  # the photo each crop came from


def crops_of(*, photos: tuple[Photo, ...], count: int, size: int, scale: int, seed: int) -> CropSet:
    """``count`` random crops per photo, the photo resized to shorter side ``scale``."""
    rng = random.Random(seed)
    tensors, names = [], []
    for photo in photos:
        scaled = resize_shorter_side(photo.image, max(scale, size))
        for crop in _random_crops(scaled, count=count, size=size, rng=rng):
            tensors.append(to_tensor(crop))
            names.append(photo.name)
    return CropSet(images=torch.stack(tensors), photos=names)
