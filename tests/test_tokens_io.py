"""Stage-2 token files: round trip (one and several K), v1 files, compact storage, atomic writes, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mergevq.data.tokens as tokens_module
from mergevq.data.tokens import TokenFile, check_same_tokenizer, load_tokens, save_tokens, tokenizer_identity


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
    assert loaded.num_tokens_available == (16,) and loaded.version == "2"
    assert _stored_dtypes(path) == {"indices_k16": torch.int32, "assignment_k16": torch.int16, "labels": torch.int64}


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
    assert _stored_dtypes(path)[f"assignment_k{num_positions}"] == torch.int32
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


# ---------------------------------------------------------------------------------------------------------- several K


def _multi(num_images: int = 6, ks: tuple[int, ...] = (4, 16, 64), num_positions: int = 64, seed: int = 0) -> dict:
    entries = {}
    for k in ks:
        data = _example(num_images=num_images, num_kept=k, num_positions=num_positions, seed=seed + k)
        entries[k] = (data["indices"], data["assignment"])
    labels = torch.arange(num_images) % 3
    meta = {"tokenizer": "tiny-32", "num_tokens": list(ks), "num_positions": num_positions, "codebook_bits": 18}
    return {"entries": entries, "labels": labels, "meta": meta}


def test_several_k_round_trip(tmp_path: Path) -> None:
    data = _multi()
    path = save_tokens(tmp_path / "multi.safetensors", **data)
    loaded = load_tokens(path)
    assert loaded.num_tokens_available == (4, 16, 64)
    assert (len(loaded), loaded.num_positions) == (6, 64)
    for k, (indices, assignment) in data["entries"].items():
        got_indices, got_assignment = loaded.get(num_tokens=k)
        assert got_indices.dtype == got_assignment.dtype == torch.int64
        assert torch.equal(got_indices, indices) and torch.equal(got_assignment, assignment)
    assert torch.equal(loaded.labels, data["labels"]) and loaded.meta == data["meta"]
    dtypes = _stored_dtypes(path)
    assert sorted(dtypes) == ["assignment_k16", "assignment_k4", "assignment_k64", "indices_k16", "indices_k4",
                              "indices_k64", "labels"]  # fmt: skip
    assert dtypes["indices_k4"] == torch.int32 and dtypes["assignment_k64"] == torch.int16
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    assert header["format"] == "mergevq-tokens" and header["version"] == "2" and header["num_tokens"] == "[4, 16, 64]"

    # The single-K accessors refuse to guess which K is meant.
    for attribute in ("indices", "assignment", "num_tokens"):
        with pytest.raises(ValueError, match=r"several K \[4, 16, 64\].*use \.get\(num_tokens=K\)"):
            getattr(loaded, attribute)


def test_missing_k_error_lists_available(tmp_path: Path) -> None:
    path = save_tokens(tmp_path / "multi.safetensors", **_multi())
    with pytest.raises(ValueError) as info:
        load_tokens(path).get(num_tokens=32)
    message = str(info.value)
    assert "\n" not in message and "multi.safetensors" in message
    assert "K=32" in message and "[4, 16, 64]" in message


def test_version_1_file_still_loads(tmp_path: Path) -> None:
    data = _example(num_kept=16)
    path = tmp_path / "old.safetensors"
    tensors = {
        "indices": data["indices"].to(torch.int32),
        "assignment": data["assignment"].to(torch.int16),
        "labels": data["labels"],
    }
    metadata = {"format": "mergevq-tokens", "version": "1", "meta": '{"num_tokens": 16, "split": "train"}'}
    save_file(tensors, str(path), metadata=metadata)
    loaded = load_tokens(path)
    assert loaded.version == "1" and loaded.num_tokens_available == (16,) and loaded.num_tokens == 16
    assert torch.equal(loaded.indices, data["indices"]) and loaded.indices.dtype == torch.int64
    assert torch.equal(loaded.get(num_tokens=16)[1], data["assignment"])
    assert torch.equal(loaded.labels, data["labels"]) and loaded.meta == {"num_tokens": 16, "split": "train"}


def test_save_rejects_bad_entries(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    data = _multi()
    entries = data["entries"]

    # L differs between K.
    short = {**entries, 4: (entries[4][0], entries[4][1][:, :32])}
    with pytest.raises(ValueError, match=r"bad\.safetensors.*positions L differs.*K=4: L=32.*K=16: L=64"):
        save_tokens(path, **{**data, "entries": short})
    # Assignment of one K points past K.
    over = {**entries, 16: (entries[16][0], entries[16][1] + 1)}
    with pytest.raises(ValueError, match=r"assignment_k16 values must lie in \[0, K=16\), got \[1, 16\]"):
        save_tokens(path, **{**data, "entries": over})
    # Codebook index beyond 2^codebook_bits.
    wide = {**entries, 64: (entries[64][0] + 2**18, entries[64][1])}
    with pytest.raises(ValueError, match=r"indices_k64 codebook indices must be < 2\^18"):
        save_tokens(path, **{**data, "entries": wide})
    negative = {**entries, 4: (entries[4][0] - 2**20, entries[4][1])}
    with pytest.raises(ValueError, match=r"indices_k4 codebook indices must be >= 0"):
        save_tokens(path, **{**data, "entries": negative})
    # K above L, and a key that disagrees with the shape.
    num_positions = 8
    too_many = {16: (torch.zeros(6, 16, dtype=torch.long), torch.zeros(6, num_positions, dtype=torch.long))}
    with pytest.raises(ValueError, match=r"K=16 merged tokens, more than L=8"):
        save_tokens(path, **{**data, "entries": too_many})
    with pytest.raises(ValueError, match=r"stored for K=8 but has shape \(6, 16\)"):
        save_tokens(path, **{**data, "entries": {8: entries[16]}})
    # Different N between one K and the labels.
    with pytest.raises(ValueError, match=r"N differs.*indices_k16 \(5, 16\)"):
        save_tokens(path, **{**data, "entries": {**entries, 16: (entries[16][0][:5], entries[16][1][:5])}})
    with pytest.raises(ValueError, match="either entries= or indices="):
        save_tokens(path, **data, indices=entries[4][0])
    with pytest.raises(ValueError, match="no token entries"):
        save_tokens(path, **{**data, "entries": {}})
    assert not path.exists()


def _rewrite(source: Path, target: Path, *, tensors=None, metadata=None) -> Path:
    """Copy a token file with some tensors / header fields replaced (``None`` values drop a key)."""
    with safe_open(str(source), framework="pt") as handle:
        old_tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        old_metadata = handle.metadata()
    new_tensors = {k: v for k, v in {**old_tensors, **(tensors or {})}.items() if v is not None}
    new_metadata = {k: v for k, v in {**old_metadata, **(metadata or {})}.items() if v is not None}
    save_file(new_tensors, str(target), metadata=new_metadata)
    return target


def test_load_rejects_broken_v2_files(tmp_path: Path) -> None:
    good = save_tokens(tmp_path / "good.safetensors", **_multi())

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"truncated\.safetensors is not a readable safetensors token file"):
        load_tokens(truncated)

    wrong_format = _rewrite(good, tmp_path / "other.safetensors", metadata={"format": "someone-else"})
    with pytest.raises(ValueError, match=r"other\.safetensors is not a mergevq-tokens file \(format='someone-else'\)"):
        load_tokens(wrong_format)
    newer = _rewrite(good, tmp_path / "newer.safetensors", metadata={"version": "3"})
    with pytest.raises(
        ValueError, match=r"newer\.safetensors has format version '3'; this mergevq reads versions 1, 2"
    ):
        load_tokens(newer)

    lacking = _rewrite(good, tmp_path / "lacking.safetensors", tensors={"assignment_k16": None})
    with pytest.raises(ValueError, match=r"lacking\.safetensors lacks tensor\(s\) assignment_k16 \(header lists K="):
        load_tokens(lacking)
    extra = _rewrite(good, tmp_path / "extra.safetensors", tensors={"indices_k8": torch.zeros(6, 8, dtype=torch.int32)})
    with pytest.raises(ValueError, match=r"extra\.safetensors has unexpected tensor\(s\) indices_k8"):
        load_tokens(extra)
    bad_list = _rewrite(good, tmp_path / "badlist.safetensors", metadata={"num_tokens": "16"})
    with pytest.raises(ValueError, match=r"badlist\.safetensors has a bad num_tokens header '16'"):
        load_tokens(bad_list)

    inconsistent = _rewrite(
        good, tmp_path / "mixed.safetensors", tensors={"assignment_k4": torch.zeros(6, 32, dtype=torch.int16)}
    )
    with pytest.raises(ValueError, match=r"mixed\.safetensors is inconsistent: the number of positions L differs"):
        load_tokens(inconsistent)
    out_of_range = _rewrite(
        good, tmp_path / "range.safetensors", tensors={"assignment_k4": torch.full((6, 64), 4, dtype=torch.int16)}
    )
    with pytest.raises(ValueError, match=r"range\.safetensors is inconsistent: assignment_k4 values must lie in"):
        load_tokens(out_of_range)
    floats = _rewrite(good, tmp_path / "floats.safetensors", tensors={"labels": torch.zeros(6)})
    with pytest.raises(ValueError, match=r"floats\.safetensors: labels has dtype torch\.float32"):
        load_tokens(floats)


# ---------------------------------------------------------------------------------------------- tokenizer identity


class _Config:
    name, codebook_bits, num_tokens_full, grid_size, image_size = "tiny-32", 18, 64, 8, 32


def test_tokenizer_identity_and_check() -> None:
    meta = {"tokenizer": "tiny-32", "codebook_bits": 18, "num_positions": 64, "grid": [8, 8], "image_size": 32,
            "split": "train"}  # fmt: skip
    assert tokenizer_identity(meta) == tokenizer_identity(_Config()) == {
        "tokenizer": "tiny-32", "codebook_bits": 18, "num_positions": 64, "grid": [8, 8], "image_size": 32,
    }  # fmt: skip
    check_same_tokenizer(meta, _Config(), what_a="token file a", what_b="model b")
    check_same_tokenizer(meta, {**meta, "split": "val"}, what_a="a", what_b="b")  # the split is not the tokenizer

    other = {**meta, "tokenizer": "tiny-64", "num_positions": 256, "grid": [16, 16], "image_size": 64}
    with pytest.raises(ValueError) as info:
        check_same_tokenizer(meta, other, what_a="token file train.safetensors", what_b="generator checkpoint g.pt")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("token file train.safetensors and generator checkpoint g.pt come from different")
    assert "tokenizer 'tiny-32' vs 'tiny-64'" in message and "grid [8, 8] vs [16, 16]" in message
    with pytest.raises(ValueError, match="codebook_bits 18 vs 14"):
        check_same_tokenizer(meta, {**meta, "codebook_bits": 14}, what_a="a", what_b="b")
    # Fields one side lacks are skipped; nothing comparable at all is an error.
    check_same_tokenizer({"tokenizer": "tiny-32"}, meta, what_a="a", what_b="b")
    with pytest.raises(ValueError, match="cannot tell whether a and b share a tokenizer"):
        check_same_tokenizer({}, meta, what_a="a", what_b="b")
