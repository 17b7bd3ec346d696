"""Stage-2 token files: round trip, compact storage, atomic writes and error messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mergevq.data.tokens as tokens_module
from mergevq.data.tokens import TokenFile, load_tokens, save_tokens


def _example(num_images: int = 5, num_kept: int = 16, num_positions: int = 64, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    assignment = torch.randint(0, num_kept, (num_images, num_positions), generator=g)
    assignment[:, :num_kept] = torch.arange(num_kept)  # every merged token owns at least one position
    return {
        "indices": torch.randint(0, 2**18, (num_images, num_kept), generator=g),
        "assignment": assignment,
        "labels": torch.randint(-1, 10, (num_images,), generator=g),
        "meta": {"preset": "tiny-32", "num_tokens": num_kept, "image_size": 32, "split": "train", "bits": [6, 12]},
    }


def _stored_dtypes(path: Path) -> dict[str, torch.dtype]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key).dtype for key in handle.keys()}  # noqa: SIM118


def test_round_trip_returns_int64_and_stores_compactly(tmp_path: Path) -> None:
    data = _example()
    path = save_tokens(tmp_path / "sub" / "train.safetensors", **data)
    assert path.is_file()
    loaded = load_tokens(path)
    assert isinstance(loaded, TokenFile)
    for key in ("indices", "assignment", "labels"):
        tensor = getattr(loaded, key)
        assert tensor.dtype == torch.int64
        assert torch.equal(tensor, data[key])
    assert loaded.meta == data["meta"]
    assert (len(loaded), loaded.num_tokens, loaded.num_positions) == (5, 16, 64)
    assert _stored_dtypes(path) == {"indices": torch.int32, "assignment": torch.int16, "labels": torch.int64}


def test_numpy_inputs_and_wide_assignment(tmp_path: Path) -> None:
    # L >= 32768 positions with as many kept tokens: assignment values no longer fit int16.
    num_positions = 40_000
    path = save_tokens(
        tmp_path / "wide.safetensors",
        indices=np.zeros((1, num_positions), dtype=np.int64),
        assignment=np.arange(num_positions, dtype=np.int64)[None],
        labels=np.array([3]),
        meta={},
    )
    assert _stored_dtypes(path)["assignment"] == torch.int32
    loaded = load_tokens(path)
    assert loaded.assignment.dtype == torch.int64
    assert int(loaded.assignment[0, -1]) == num_positions - 1
    assert loaded.labels.tolist() == [3]


def test_failed_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "tokens.safetensors"
    save_tokens(target, **_example(seed=1))
    before = target.read_bytes()

    def crash_midway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial garbage")
        raise RuntimeError("disk full")

    monkeypatch.setattr(tokens_module, "save_file", crash_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        save_tokens(target, **_example(seed=2))
    with pytest.raises(RuntimeError, match="disk full"):
        save_tokens(tmp_path / "fresh.safetensors", **_example(seed=2))
    # The old file is intact, the new one never appeared, and no temporary file is left around.
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens.safetensors"]


def test_save_rejects_inconsistent_inputs(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    data = _example()
    with pytest.raises(ValueError, match=r"bad\.safetensors.*number of images N differs"):
        save_tokens(path, **{**data, "labels": data["labels"][:4]})
    with pytest.raises(ValueError, match=r"assignment values must lie in \[0, K=16\)"):
        save_tokens(path, **{**data, "assignment": data["assignment"] + 1})
    with pytest.raises(ValueError, match=r"indices \[N, K\]"):
        save_tokens(path, **{**data, "indices": data["indices"][0]})
    with pytest.raises(ValueError, match="JSON"):
        save_tokens(path, **{**data, "meta": {"when": object()}})
    with pytest.raises(TypeError, match="integer"):
        save_tokens(path, **{**data, "indices": data["indices"].float()})
    assert not path.exists()


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_tokens(missing)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not a safetensors file at all")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        load_tokens(garbage)

    data = _example()
    metadata = {"format": "mergevq-tokens", "version": "1", "meta": "{}"}
    lacking = tmp_path / "lacking.safetensors"
    save_file({"indices": data["indices"], "assignment": data["assignment"]}, str(lacking), metadata=metadata)
    with pytest.raises(ValueError, match=r"lacking\.safetensors lacks tensor\(s\) labels"):
        load_tokens(lacking)

    mismatched = tmp_path / "mismatch.safetensors"
    tensors = {"indices": data["indices"], "assignment": data["assignment"][:3], "labels": data["labels"]}
    save_file(tensors, str(mismatched), metadata=metadata)
    with pytest.raises(ValueError, match=r"mismatch\.safetensors.*N differs.*assignment \(3, 64\)"):
        load_tokens(mismatched)

    foreign = tmp_path / "weights.safetensors"
    save_file({k: data[k] for k in ("indices", "assignment", "labels")}, str(foreign))
    with pytest.raises(ValueError, match=r"weights\.safetensors is not a mergevq-tokens file"):
        load_tokens(foreign)
