"""Image folders as tensors: robust decoding, ImageFolder and flat layouts, reproducible and resumable loaders.

Reproducibility model: item ``i`` of epoch ``e`` is a pure function of ``(files, seed, e, i)``. The random transform
gets its own ``random.Random`` derived from ``(seed, epoch, index)``, and the index order comes from a sampler seeded
by ``(seed, epoch)``. Because the loader's batch sampler tags every index with its epoch, this holds with persistent
workers too (whose dataset copies never see a later ``set_epoch``), and a run resumed with ``start_batch=n``
produces exactly the batches an uninterrupted epoch would have produced after its first ``n``.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torch.utils.data.dataloader import default_collate

from mergevq.data.transforms import ImageTransform, to_rgb
from mergevq.train.rng import derive_seed

__all__ = [
    "DEFAULT_EXTENSIONS",
    "EpochSampler",
    "ImageDataset",
    "ImageDecodeError",
    "SkipBatchSampler",
    "SkippedImageWarning",
    "find_classes",
    "list_images",
    "load_image",
    "make_loader",
    "set_loader_epoch",
]

DEFAULT_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class ImageDecodeError(OSError):
    """A file could not be opened or fully decoded as an image; ``path`` names it."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot decode image {path}: {reason}")
        self.path = path
        self.reason = reason


class SkippedImageWarning(UserWarning):
    """An unreadable file was skipped by :class:`ImageDataset` (filter this category to silence it)."""


# ----------------------------------------------------------------------------------------------------------------------
# Listing and decoding
# ----------------------------------------------------------------------------------------------------------------------


def _normalise_extensions(extensions: str | Iterable[str]) -> tuple[str, ...]:
    items = [extensions] if isinstance(extensions, str) else list(extensions)
    out = tuple(sorted({(e if e.startswith(".") else "." + e).lower() for e in items}))
    if not out:
        raise ValueError("extensions must name at least one file suffix, e.g. ('.jpg', '.png')")
    return out


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _check_root(root: Path) -> None:
    if not root.exists():
        raise FileNotFoundError(f"image folder does not exist: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"image folder is not a directory: {root}")


def _walk_images(directory: Path, extensions: tuple[str, ...]) -> list[Path]:
    # Follows symlinked folders (common for ImageNet) but visits each real folder once, so link cycles terminate.
    found: list[Path] = []
    seen: set[str] = set()
    for current, dirnames, filenames in os.walk(directory, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        for name in filenames:
            if not _is_hidden(name) and os.path.splitext(name)[1].lower() in extensions:
                found.append(Path(current, name))
    # Sort on the relative POSIX path: independent of the file system's listing order and of the OS.
    return sorted(found, key=lambda p: p.relative_to(directory).as_posix())


def find_classes(root: str | Path) -> list[str]:
    """Sorted names of the visible sub-folders of ``root`` (the ImageFolder classes); empty for a flat folder."""
    root = Path(root).expanduser()
    _check_root(root)
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not _is_hidden(entry.name))


def _scan_folder(root: Path, extensions: tuple[str, ...]) -> tuple[list[tuple[Path, int]], list[str]]:
    classes = find_classes(root)
    if not classes:
        return [(path, -1) for path in _walk_images(root, extensions)], []
    loose = [
        name
        for name in os.listdir(root)
        if not _is_hidden(name) and os.path.splitext(name)[1].lower() in extensions and (root / name).is_file()
    ]
    if loose:
        warnings.warn(
            f"{root} has class folders, so its {len(loose)} top-level image file(s) are ignored", stacklevel=3
        )
    samples = [(path, label) for label, name in enumerate(classes) for path in _walk_images(root / name, extensions)]
    return samples, classes


def list_images(root: str | Path, *, extensions: Iterable[str] = DEFAULT_EXTENSIONS) -> list[tuple[Path, int]]:
    """``(path, label)`` for every image under ``root``, in a deterministic order.

    Layouts: ``root/<class>/**/<image>`` (classes are the sorted sub-folder names; label = position) or a flat
    ``root/<image>`` (label -1). Hidden files and folders are ignored; suffixes match case-insensitively.
    Raises ``FileNotFoundError`` for a missing root; an empty folder gives an empty list.
    """
    root = Path(root).expanduser()
    return _scan_folder(root, _normalise_extensions(extensions))[0]


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode ``path`` as 8-bit RGB (see :func:`~mergevq.data.transforms.to_rgb`).

    The pixels are decoded here (``load()``), so truncated files fail now rather than later inside a transform.
    Raises :class:`ImageDecodeError` naming the file for anything unreadable.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except Exception as exc:  # Pillow signals bad data with many types (OSError, SyntaxError, ValueError, ...)
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, FileNotFoundError):
            reason = "file not found"
        raise ImageDecodeError(path, reason) from exc


def _verify_image(path: Path) -> str | None:
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as exc:
        return str(exc) or type(exc).__name__
    return None


def _decode_image(path: Path) -> str | None:
    try:
        load_image(path)
    except ImageDecodeError as exc:
        return exc.reason
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """Images under ``root`` (ImageFolder or flat layout, see :func:`list_images`) as ``[3, H, W]`` tensors.

    Items are ``{"image": float32 [3, H, W] in [-1, 1], "label": int, "index": int}``, where ``index`` is the sample
    actually returned. An unreadable file (corrupt, truncated, empty, not an image) is skipped with a
    :class:`SkippedImageWarning` (once per file and process), recorded in ``skipped_files`` (path -> reason), and
    replaced by the next loadable sample (``i + 1``, ``i + 2``, ... modulo the length), so a bad file never stops a
    run and the replacement is deterministic. Skip records are per process: with DataLoader workers they live in the
    workers; call :meth:`scan` up front to find (and drop) bad files in the main process.

    ``max_images`` keeps an evenly strided subset (so every class stays represented), independent of ``seed``.
    With ``require_readable`` (default) construction decodes files until one succeeds, so a folder in which no file
    is an image fails here, in one line, rather than later inside a DataLoader worker.
    """

    accepts_epoch_index = True  # __getitem__ understands (epoch, index) keys, see SkipBatchSampler

    def __init__(
        self,
        root: str | Path,
        *,
        transform: ImageTransform,
        extensions: Iterable[str] = DEFAULT_EXTENSIONS,
        max_images: int | None = None,
        seed: int = 0,
        require_readable: bool = True,
    ) -> None:
        self.root = Path(root).expanduser()
        self.transform = transform
        self.extensions = _normalise_extensions(extensions)
        self.seed = int(seed)
        self.epoch = 0
        samples, self.classes = _scan_folder(self.root, self.extensions)
        if not samples:
            raise ValueError(f"no image files ({', '.join(self.extensions)}) found under {self.root}")
        if max_images is not None:
            if max_images <= 0:
                raise ValueError(f"max_images must be positive, got {max_images}")
            if max_images < len(samples):
                samples = [samples[(i * len(samples)) // max_images] for i in range(max_images)]
        self.samples: list[tuple[Path, int]] = samples
        self.skipped_files: dict[Path, str] = {}
        if require_readable:
            self._require_one_readable()

    def _require_one_readable(self) -> None:
        # Usually the first file decodes and this costs one image. Bad files met on the way are not recorded: the
        # loader's own skipping (with its warning) stays the one place that reports them.
        first_error = None
        for path, _ in self.samples:
            reason = _decode_image(path)
            if reason is None:
                return
            first_error = first_error or f"{path.name}: {' '.join(reason.split())}"
        raise ValueError(
            f"none of the {len(self.samples)} image files under {self.root} could be decoded (e.g. {first_error})"
        )

    # -- bookkeeping -------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_files)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def set_epoch(self, epoch: int) -> None:
        """Epoch used by plain integer indexing (the loader from :func:`make_loader` passes the epoch per item)."""
        self.epoch = int(epoch)

    def item_rng(self, index: int, *, epoch: int | None = None) -> random.Random:
        """The rng that drives the random transform of sample ``index`` in ``epoch`` (default: current epoch)."""
        return random.Random(derive_seed(self.seed, self.epoch if epoch is None else epoch, index))

    def _record_skip(self, path: Path, reason: str) -> None:
        if path in self.skipped_files:
            return
        self.skipped_files[path] = reason
        warnings.warn(f"skipping unreadable image {path}: {reason}", SkippedImageWarning, stacklevel=3)

    # -- access ------------------------------------------------------------------------------------------------------

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (self.epoch, int(key))
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        index %= n
        for offset in range(n):
            j = (index + offset) % n
            path, label = self.samples[j]
            if path in self.skipped_files:
                continue
            try:
                img = load_image(path)
            except ImageDecodeError as exc:
                self._record_skip(path, exc.reason)
                continue
            image = self.transform(img, self.item_rng(j, epoch=epoch))
            return {"image": image, "label": label, "index": j}
        raise RuntimeError(f"none of the {n} image files under {self.root} could be decoded")

    def scan(self, *, verify: bool = True, num_threads: int = 0) -> list[Path]:
        """Check every file now, drop the bad ones from ``samples`` and record them in ``skipped_files``.

        ``verify=True`` is the cheap check (Pillow ``verify()``: header and structure; catches empty, non-image and
        most corrupt files, but not every truncated JPEG). ``verify=False`` fully decodes each file (slow, exact).
        ``num_threads > 0`` checks files in a thread pool. Returns the paths dropped by this call.
        """
        check = _verify_image if verify else _decode_image
        paths = [path for path, _ in self.samples]
        if num_threads > 0:
            with ThreadPoolExecutor(max_workers=num_threads) as pool:
                reasons = list(pool.map(check, paths))
        else:
            reasons = [check(path) for path in paths]
        bad = [path for path, reason in zip(paths, reasons) if reason is not None]
        for path, reason in zip(paths, reasons):
            if reason is not None:
                self._record_skip(path, reason)
        if len(bad) == len(paths):
            raise RuntimeError(f"none of the {len(paths)} image files under {self.root} could be decoded")
        bad_set = set(bad)
        self.samples = [sample for sample in self.samples if sample[0] not in bad_set]
        return bad

    def __repr__(self) -> str:
        layout = f"{len(self.classes)} classes" if self.classes else "flat"
        return f"ImageDataset(root={str(self.root)!r}, images={len(self)}, {layout}, skipped={self.num_skipped})"


# ----------------------------------------------------------------------------------------------------------------------
# Samplers and loader
# ----------------------------------------------------------------------------------------------------------------------


class EpochSampler(Sampler[int]):
    """``range(num_samples)`` in order, or shuffled by a permutation that depends only on ``(seed, epoch)``."""

    def __init__(self, num_samples: int, *, shuffle: bool, seed: int = 0) -> None:
        self.num_samples = int(num_samples)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_samples))
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


class SkipBatchSampler(Sampler[list[Any]]):
    """Batches indices from ``sampler`` and can start an epoch after its first ``start_batch`` batches.

    ``set_epoch(e, start_batch=n)`` forwards ``e`` to the inner sampler (so shuffling follows the epoch) and makes the
    next passes yield batches ``n, n+1, ...`` of epoch ``e``: resuming an interrupted run at batch ``n`` replays the
    rest of that epoch exactly, without loading the skipped images. The skip stays until the next ``set_epoch``.
    With ``tag_epoch`` each index is sent as ``(epoch, index)`` so workers use the right augmentation rng.
    """

    def __init__(
        self,
        sampler: Sampler[int] | Sequence[int],
        *,
        batch_size: int,
        drop_last: bool,
        epoch: int = 0,
        start_batch: int = 0,
        tag_epoch: bool = False,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.tag_epoch = tag_epoch
        self.epoch = 0
        self.start_batch = 0
        self.set_epoch(epoch, start_batch=start_batch)

    def set_epoch(self, epoch: int, *, start_batch: int = 0) -> None:
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)

    def _num_batches(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        return max(0, self._num_batches() - self.start_batch)

    def __iter__(self) -> Iterator[list[Any]]:
        epoch, skip = self.epoch, self.start_batch
        batch: list[int] = []
        emitted = 0
        for index in self.sampler:
            batch.append(index)
            if len(batch) == self.batch_size:
                if emitted >= skip:
                    yield [(epoch, i) for i in batch] if self.tag_epoch else batch
                emitted += 1
                batch = []
        if batch and not self.drop_last and emitted >= skip:
            yield [(epoch, i) for i in batch] if self.tag_epoch else batch


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader generator; give `random` and NumPy the same per-worker seed.
    seed = torch.initial_seed() % (1 << 32)
    random.seed(seed)
    np.random.seed(seed)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int,
    drop_last: bool,
    distributed: bool | None = None,
    epoch: int = 0,
    start_batch: int = 0,
    num_replicas: int | None = None,
    rank: int | None = None,
    pin_memory: bool | None = None,
    prefetch_factor: int | None = None,
) -> DataLoader:
    """A DataLoader with a :class:`SkipBatchSampler` over a seeded sampler; items collate into batched tensors.

    ``distributed=None`` uses a ``DistributedSampler`` when ``torch.distributed`` is initialised or ``num_replicas``
    is given; ``True`` forces it (needs an initialised group or explicit ``num_replicas`` and ``rank``).
    Per epoch call ``set_loader_epoch(loader, epoch=e)`` (``start_batch=n`` to resume mid-epoch).
    Workers are seeded and persistent when ``num_workers > 0``.
    """
    if distributed is None:
        distributed = num_replicas is not None or (dist.is_available() and dist.is_initialized())
    if distributed:
        if (num_replicas is None or rank is None) and not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "distributed loading needs an initialised torch.distributed group, or num_replicas and rank"
            )
        sampler: Sampler[int] = DistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
    else:
        sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed)  # type: ignore[arg-type]
    batch_sampler = SkipBatchSampler(
        sampler,
        batch_size=batch_size,
        drop_last=drop_last,
        epoch=epoch,
        start_batch=start_batch,
        tag_epoch=bool(getattr(dataset, "accepts_epoch_index", False)),
    )
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    workers = num_workers > 0
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=default_collate,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        worker_init_fn=_seed_worker if workers else None,
        generator=torch.Generator().manual_seed(int(seed) % (1 << 63)),
        persistent_workers=workers,
        prefetch_factor=prefetch_factor if workers else None,
    )


def set_loader_epoch(loader: DataLoader, *, epoch: int, start_batch: int = 0) -> None:
    """Move a :func:`make_loader` loader to ``epoch``, optionally skipping its first ``start_batch`` batches."""
    batch_sampler = loader.batch_sampler
    if not isinstance(batch_sampler, SkipBatchSampler):
        raise TypeError("set_loader_epoch needs a loader from make_loader (its batch sampler is a SkipBatchSampler)")
    batch_sampler.set_epoch(epoch, start_batch=start_batch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
