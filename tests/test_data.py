"""Image folders, decoding of odd files, transforms and resumable loaders."""

from __future__ import annotations

import io
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from mergevq.data.images import (
    ImageDataset,
    ImageDecodeError,
    SkipBatchSampler,
    SkippedImageWarning,
    list_images,
    load_image,
    make_loader,
    set_loader_epoch,
)
from mergevq.data.transforms import (
    ImageTransform,
    center_crop,
    eval_transform,
    hflip,
    random_crop,
    random_resized_crop,
    resize_shorter_side,
    to_rgb,
    to_tensor,
    to_uint8_image,
    train_transform,
)

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
    return path


def _batches(loader) -> list[dict]:
    return [{key: value.clone() for key, value in batch.items()} for batch in loader]


def _assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a["index"], b["index"])
        assert torch.equal(a["label"], b["label"])
        assert torch.equal(a["image"], b["image"])


@pytest.fixture
def cifar_test(cifar10_root) -> Path:
    return Path(cifar10_root) / "test"


@pytest.fixture
def textured_folder(tmp_path: Path) -> Path:
    # 12 noise images of varying size in two classes, enough texture that different crops differ.
    root = tmp_path / "textured"
    for i in range(12):
        _write_png(root / ("a" if i % 2 else "b") / f"{i:02d}.png", _noise(40 + i, 48, seed=i))
    return root


# ----------------------------------------------------------------------------------------------------------------------
# Real CIFAR-10
# ----------------------------------------------------------------------------------------------------------------------


def test_cifar10_images_labels_and_range(cifar_test: Path) -> None:
    ds = ImageDataset(cifar_test, transform=eval_transform(32), max_images=200)
    assert ds.classes == CIFAR_CLASSES
    assert len(ds) == 200
    # The strided subset keeps every class (20 each), not just the first class folder.
    assert np.bincount(ds.labels, minlength=10).tolist() == [20] * 10
    item = ds[37]
    path, label = ds.samples[37]
    assert item["label"] == label == CIFAR_CLASSES.index(path.parent.name)
    assert item["index"] == 37
    image = item["image"]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert -1.0 <= float(image.min()) < float(image.max()) <= 1.0
    # At 32 px the eval transform is the identity, so the tensor is exactly the decoded JPEG.
    decoded = np.array(Image.open(path).convert("RGB"))
    assert torch.equal(image, torch.from_numpy(decoded).permute(2, 0, 1).float() / 127.5 - 1.0)
    assert np.array_equal(np.asarray(to_uint8_image(image)), decoded)


def test_cifar10_loader_two_workers_matches_single_process(cifar_test: Path) -> None:
    ds = ImageDataset(cifar_test, transform=train_transform(28, resize=32, hflip=True), max_images=96, seed=5)
    kwargs = dict(batch_size=16, shuffle=True, seed=3, drop_last=False)
    inline = make_loader(ds, num_workers=0, **kwargs)
    pooled = make_loader(ds, num_workers=2, **kwargs)
    assert pooled.persistent_workers
    orders = []
    for epoch in (0, 1):
        # Persistent workers never see the main process's set_epoch; the epoch travels with each index instead.
        set_loader_epoch(inline, epoch=epoch)
        set_loader_epoch(pooled, epoch=epoch)
        expected = _batches(inline)
        got = _batches(pooled)
        _assert_same_batches(got, expected)
        assert expected[0]["image"].shape == (16, 3, 28, 28)
        orders.append(torch.cat([b["index"] for b in got]).tolist())
        assert sorted(orders[-1]) == list(range(96))
    assert orders[0] != orders[1]  # each epoch has its own shuffle


# ----------------------------------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------------------------------


def test_image_folder_layout(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    _write_png(root / "zebra" / "b.png", _noise(8, 8))
    _write_png(root / "zebra" / "a.PNG", _noise(8, 8))  # suffixes match case-insensitively
    _write_png(root / "apple" / "deep" / "er" / "x.png", _noise(8, 8))  # nested folders count for their class
    _write_png(root / "apple" / "y.png", _noise(8, 8))
    _write_png(root / "apple" / ".hidden.png", _noise(8, 8))
    _write_png(root / ".cache" / "z.png", _noise(8, 8))  # hidden folder: not a class
    (root / "apple" / "notes.txt").write_text("not an image")
    samples = list_images(root)
    rel = [(p.relative_to(root).as_posix(), label) for p, label in samples]
    assert rel == [("apple/deep/er/x.png", 0), ("apple/y.png", 0), ("zebra/a.PNG", 1), ("zebra/b.png", 1)]
    ds = ImageDataset(root, transform=eval_transform(8))
    assert ds.classes == ["apple", "zebra"]
    assert [ds[i]["label"] for i in range(len(ds))] == [0, 0, 1, 1]
    assert list_images(root, extensions=[".png"]) == samples
    assert list_images(root, extensions=("jpg",)) == []


def test_flat_layout_has_label_minus_one(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for name in ("c.png", "a.png", "b.bmp"):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_noise(6, 6)).save(path)
    ds = ImageDataset(root, transform=eval_transform(6))
    assert ds.classes == []
    assert [p.name for p, _ in ds.samples] == ["a.png", "b.bmp", "c.png"]
    assert {ds[i]["label"] for i in range(3)} == {-1}


def test_missing_and_empty_folders_give_one_line_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as info:
        ImageDataset(missing, transform=eval_transform(8))
    assert str(missing) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="nope"):
        list_images(missing)

    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError) as info:
        ImageDataset(empty, transform=eval_transform(8))
    message = str(info.value)
    assert str(empty) in message and ".jpg" in message and ".webp" in message and "\n" not in message


# ----------------------------------------------------------------------------------------------------------------------
# Colour modes and file formats
# ----------------------------------------------------------------------------------------------------------------------


def _palette_with_transparency() -> Image.Image:
    img = Image.new("P", (2, 1))
    img.putpalette([200, 10, 20, 0, 0, 255] + [0] * (256 * 3 - 6))
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 1  # palette entry 1 fully transparent
    return img


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: Image.new("L", (2, 1), 77), [[77, 77, 77]] * 2),
        (lambda: Image.new("1", (2, 1), 1), [[255, 255, 255]] * 2),
        # Alpha is composited on white: 0 at alpha 128 -> 255 * (1 - 128/255) = 127.
        (lambda: Image.new("LA", (2, 1), (0, 128)), [[127, 127, 127]] * 2),
        (lambda: Image.new("RGBA", (2, 1), (255, 0, 0, 0)), [[255, 255, 255]] * 2),
        (lambda: Image.new("RGBA", (2, 1), (10, 20, 30, 255)), [[10, 20, 30]] * 2),
        (_palette_with_transparency, [[200, 10, 20], [255, 255, 255]]),
        (lambda: Image.new("CMYK", (2, 1), (0, 255, 255, 0)), [[255, 0, 0]] * 2),
        (lambda: Image.new("CMYK", (2, 1), (0, 0, 0, 255)), [[0, 0, 0]] * 2),
    ],
    ids=["L", "1", "LA", "RGBA-clear", "RGBA-opaque", "P-transparency", "CMYK-red", "CMYK-black"],
)
def test_to_rgb_pixel_values(make, expected, tmp_path: Path) -> None:
    img = make()
    out = to_rgb(img)
    assert out.mode == "RGB"
    assert np.asarray(out).reshape(-1, 3).tolist() == expected
    if img.mode != "CMYK":  # and through a real PNG file and load_image
        path = tmp_path / "odd.png"
        img.save(path)
        assert np.asarray(load_image(path)).reshape(-1, 3).tolist() == expected


def test_sixteen_bit_modes_scale_to_full_range(tmp_path: Path) -> None:
    values = np.array([[0, 128, 129, 257, 1000, 32767, 65406, 65535]], dtype=np.uint16)
    expected = np.array([[0, 0, 1, 1, 4, 127, 254, 255]], dtype=np.uint8)  # round(v / 257), not clipped at 255
    assert np.array_equal(np.rint(values / 257.0).astype(np.uint8), expected)
    little = Image.fromarray(values)
    big = Image.frombytes("I;16B", (values.shape[1], 1), values.astype(">u2").tobytes())
    as_int32 = Image.fromarray(values.astype(np.int32))
    assert (little.mode, big.mode, as_int32.mode) == ("I;16", "I;16B", "I")
    for img in (little, big, as_int32):
        out = np.asarray(to_rgb(img))
        assert out.shape == (1, 8, 3)
        assert np.array_equal(out[..., 0], expected) and np.array_equal(out[..., 2], expected), img.mode
    path = tmp_path / "deep.png"
    little.save(path)
    assert np.array_equal(np.asarray(load_image(path))[..., 1], expected)


def test_float_mode_in_unit_range() -> None:
    img = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert img.mode == "F"
    assert np.asarray(to_rgb(img))[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize(
    ("suffix", "save_kwargs", "tolerance"),
    [
        (".png", {}, 0),
        (".bmp", {}, 0),
        (".webp", {"lossless": True}, 0),
        (".jpeg", {"quality": 95, "subsampling": 0}, 8),
    ],
)
def test_file_formats_decode(tmp_path: Path, suffix: str, save_kwargs: dict, tolerance: int) -> None:
    array = np.zeros((16, 16, 3), dtype=np.uint8)
    array[:8, :, 0] = 250  # smooth blocks so JPEG stays close
    array[8:, :, 2] = 180
    path = tmp_path / f"img{suffix}"
    Image.fromarray(array).save(path, **save_kwargs)
    out = np.asarray(load_image(path)).astype(int)
    assert out.shape == (16, 16, 3)
    assert np.abs(out - array).max() <= tolerance
    assert [p.name for p, _ in list_images(tmp_path)] == [path.name]


# ----------------------------------------------------------------------------------------------------------------------
# Unreadable files
# ----------------------------------------------------------------------------------------------------------------------


def _write_bad_files(root: Path) -> dict[str, Path]:
    buffer = io.BytesIO()
    Image.fromarray(_noise(64, 64, seed=9)).save(buffer, format="JPEG", quality=95)
    jpeg = buffer.getvalue()
    bad = {
        "corrupt": root / "c1_corrupt.jpg",
        "truncated": root / "c3_truncated.jpg",
        "empty": root / "c5_empty.jpg",
        "text": root / "c7_text.png",
    }
    bad["corrupt"].write_bytes(np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    bad["truncated"].write_bytes(jpeg[: len(jpeg) // 2])
    bad["empty"].write_bytes(b"")
    bad["text"].write_text("this is a text file, renamed to .png\n")
    return bad


def test_load_image_names_the_bad_file(tmp_path: Path) -> None:
    bad = _write_bad_files(tmp_path)
    for path in bad.values():
        with pytest.raises(ImageDecodeError) as info:
            load_image(path)
        assert str(path) in str(info.value)
        assert info.value.path == path


def test_bad_files_are_skipped_counted_and_replaced_deterministically(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    root.mkdir()
    for i in (0, 2, 4, 6):
        _write_png(root / f"c{i}_good.png", _noise(8, 8, seed=i))
    bad = _write_bad_files(root)
    ds = ImageDataset(root, transform=eval_transform(8))
    assert len(ds) == 8  # sorted: good, bad, good, bad, ...
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = [ds[i]["index"] for i in range(len(ds))]
        second = [ds[i]["index"] for i in range(len(ds))]
    skipped = [w for w in caught if issubclass(w.category, SkippedImageWarning)]
    # One warning per bad file, even though each was requested twice.
    assert len(skipped) == 4
    for path in bad.values():
        assert sum(str(path) in str(w.message) for w in skipped) == 1
    assert first == second == [0, 2, 2, 4, 4, 6, 6, 0]  # a bad item i returns item i+1 (mod n)
    assert ds.num_skipped == 4
    assert set(ds.skipped_files) == set(bad.values())


def test_all_bad_files_raise_naming_the_root(tmp_path: Path) -> None:
    root = tmp_path / "allbad"
    root.mkdir()
    _write_bad_files(root)
    # Found at construction, in one line, rather than inside a DataLoader worker.
    with pytest.raises(ValueError, match=r"none of the 4 image files under .*allbad could be decoded") as info:
        ImageDataset(root, transform=eval_transform(8))
    assert len(str(info.value).splitlines()) == 1
    ds = ImageDataset(root, transform=eval_transform(8), require_readable=False)
    with pytest.warns(SkippedImageWarning), pytest.raises(RuntimeError, match="allbad"):
        ds[0]


def test_scan_drops_bad_files(tmp_path: Path) -> None:
    root = tmp_path / "scan"
    root.mkdir()
    good = [_write_png(root / f"c{i}_good.png", _noise(8, 8, seed=i)) for i in (0, 2)]
    bad = _write_bad_files(root)
    ds = ImageDataset(root, transform=eval_transform(8))
    with pytest.warns(SkippedImageWarning):
        cheap = ds.scan(verify=True, num_threads=2)
    assert {bad["corrupt"], bad["empty"], bad["text"]} <= set(cheap)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImageWarning)
        ds.scan(verify=False)  # full decode also catches the truncated JPEG
    assert [p for p, _ in ds.samples] == good
    assert set(ds.skipped_files) == set(bad.values())


# ----------------------------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------------------------


def _grid(height: int, width: int) -> np.ndarray:
    # Every pixel distinct in at least one channel, so a crop identifies its position.
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([rows * 10, cols * 10, (rows * width + cols) % 256], axis=-1).astype(np.uint8)


def test_center_crop_exact() -> None:
    array = _grid(6, 9)
    out = np.asarray(center_crop(Image.fromarray(array), 4))
    assert np.array_equal(out, array[1:5, 2:6])  # offsets round((6-4)/2)=1, round((9-4)/2)=2
    assert np.array_equal(np.asarray(center_crop(Image.fromarray(array), (2, 3))), array[2:4, 3:6])
    with pytest.raises(ValueError, match="resize it first"):
        center_crop(Image.fromarray(array), 7)


def test_resize_shorter_side_shapes() -> None:
    assert resize_shorter_side(Image.new("RGB", (40, 20)), 64).size == (128, 64)
    assert resize_shorter_side(Image.new("RGB", (30, 45)), 20).size == (20, 30)
    assert resize_shorter_side(Image.new("RGB", (33, 50)), 32).size == (32, 48)  # 50*32/33 = 48.48 -> 48


def test_hflip_and_tensor_round_trip() -> None:
    array = _grid(5, 7)
    img = Image.fromarray(array)
    assert np.array_equal(np.asarray(hflip(img)), array[:, ::-1])
    tensor = to_tensor(img)
    assert tensor.shape == (3, 5, 7) and tensor.dtype == torch.float32
    assert float(tensor.min()) >= -1.0 and float(tensor.max()) <= 1.0
    assert tensor[0, 0, 0].item() == -1.0  # 0 -> -1
    assert np.array_equal(np.asarray(to_uint8_image(tensor)), array)
    # Out-of-range values clamp; in-between values round to the nearest level.
    wild = torch.tensor([-3.0, 2.0, 0.0, 1.0 / 127.5 - 1.0 + 0.003]).view(1, 1, 4).expand(3, 1, 4)
    assert np.asarray(to_uint8_image(wild))[0, :, 0].tolist() == [0, 255, 128, 1]


def test_random_crops_reproducible_and_valid() -> None:
    array = _grid(20, 30)
    img = Image.fromarray(array)
    a = np.asarray(random_crop(img, 8, rng=random.Random(7)))
    b = np.asarray(random_crop(img, 8, rng=random.Random(7)))
    assert np.array_equal(a, b)
    top, left = a[0, 0, 0] // 10, a[0, 0, 1] // 10
    assert np.array_equal(a, array[top : top + 8, left : left + 8])  # a true crop of the input
    positions = {tuple(np.asarray(random_crop(img, 8, rng=random.Random(s)))[0, 0, :2]) for s in range(20)}
    assert len(positions) > 5
    c = random_resized_crop(img, 12, rng=random.Random(3))
    d = random_resized_crop(img, 12, rng=random.Random(3))
    assert c.size == (12, 12) and np.array_equal(np.asarray(c), np.asarray(d))
    e = random_resized_crop(img, (10, 14), scale=(0.2, 0.5), rng=random.Random(4))
    assert e.size == (14, 10)


def test_image_transform_is_a_function_of_the_rng() -> None:
    img = Image.fromarray(_noise(40, 50))
    transform = ImageTransform(size=24, resize=32, crop="random", hflip=True)
    x = transform(img, random.Random(11))
    assert x.shape == (3, 24, 24)
    assert torch.equal(x, transform(img, random.Random(11)))
    assert any(not torch.equal(x, transform(img, random.Random(s))) for s in range(5))
    with pytest.raises(ValueError, match="rng"):
        transform(img)
    with pytest.raises(ValueError, match="resize"):
        ImageTransform(size=32, resize=16)
    # Eval: resize shorter side to 24 then center crop; no rng needed.
    resized = resize_shorter_side(img, 24, resample=Image.Resampling.BILINEAR)
    assert torch.equal(eval_transform(24)(img), to_tensor(center_crop(resized, 24)))
    student = ImageTransform(size=16, crop="random_resized", hflip=True)
    assert student(img, random.Random(0)).shape == (3, 16, 16)


def test_dataset_augmentation_depends_on_seed_epoch_index(textured_folder: Path) -> None:
    transform = train_transform(24, resize=32)
    ds = ImageDataset(textured_folder, transform=transform, seed=1)
    same = ImageDataset(textured_folder, transform=transform, seed=1)
    assert torch.equal(ds[3]["image"], same[3]["image"])
    assert torch.equal(ds[(2, 3)]["image"], ds[(2, 3)]["image"])
    ds.set_epoch(2)
    assert torch.equal(ds[3]["image"], same[(2, 3)]["image"])
    epochs = {ds[(e, 3)]["image"].sum().item() for e in range(6)}
    assert len(epochs) > 1  # a new epoch draws new crops


# ----------------------------------------------------------------------------------------------------------------------
# Samplers and loaders
# ----------------------------------------------------------------------------------------------------------------------


def test_skipping_batches_reproduces_the_epoch_tail(textured_folder: Path) -> None:
    ds = ImageDataset(textured_folder, transform=train_transform(24, resize=32, hflip=True), seed=4)
    loader = make_loader(ds, batch_size=5, shuffle=True, num_workers=0, seed=9, drop_last=False, epoch=3)
    full = _batches(loader)
    assert [len(b["index"]) for b in full] == [5, 5, 2]
    resumed = make_loader(
        ds, batch_size=5, shuffle=True, num_workers=0, seed=9, drop_last=False, epoch=3, start_batch=1
    )
    assert len(resumed) == 2
    _assert_same_batches(_batches(resumed), full[1:])
    # The same through set_loader_epoch on a loader that has been used for another epoch.
    set_loader_epoch(loader, epoch=0)
    other = _batches(loader)
    assert not torch.equal(torch.cat([b["index"] for b in other]), torch.cat([b["index"] for b in full]))
    set_loader_epoch(loader, epoch=3, start_batch=2)
    _assert_same_batches(_batches(loader), full[2:])


def test_skip_batch_sampler_counts() -> None:
    sampler = SkipBatchSampler(range(10), batch_size=4, drop_last=False, start_batch=1)
    assert list(sampler) == [[4, 5, 6, 7], [8, 9]] and len(sampler) == 2
    sampler = SkipBatchSampler(range(10), batch_size=4, drop_last=True)
    assert list(sampler) == [[0, 1, 2, 3], [4, 5, 6, 7]] and len(sampler) == 2
    tagged = SkipBatchSampler(range(3), batch_size=2, drop_last=False, epoch=7, tag_epoch=True)
    assert list(tagged) == [[(7, 0), (7, 1)], [(7, 2)]]


def test_distributed_sampler_splits_the_data(textured_folder: Path) -> None:
    ds = ImageDataset(textured_folder, transform=eval_transform(24))
    seen = []
    for rank in (0, 1):
        loader = make_loader(
            ds, batch_size=3, shuffle=True, num_workers=0, seed=2, drop_last=False, distributed=True,
            num_replicas=2, rank=rank,
        )  # fmt: skip
        assert isinstance(loader.batch_sampler.sampler, DistributedSampler)
        assert len(loader) == 2  # 12 images / 2 ranks / batch 3
        seen.append(torch.cat([b["index"] for b in loader]).tolist())
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(12))
    single = make_loader(ds, batch_size=3, shuffle=True, num_workers=0, seed=2, drop_last=False)
    assert not isinstance(single.batch_sampler.sampler, DistributedSampler)
    with pytest.raises(ValueError, match="num_replicas"):
        make_loader(ds, batch_size=3, shuffle=True, num_workers=0, seed=2, drop_last=False, distributed=True)
