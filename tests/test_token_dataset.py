"""TokenDataset / TokenBatch: batches at one K drawn by index arrays, DataLoader items, K-sparse raster targets."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from mergevq.data.tokens import TokenBatch, TokenDataset, load_tokens, save_tokens

NUM_IMAGES, NUM_POSITIONS, KS = 10, 64, (4, 16)


@pytest.fixture()
def token_path(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    entries = {}
    for k in KS:
        assignment = torch.randint(0, k, (NUM_IMAGES, NUM_POSITIONS), generator=g)
        assignment[:, :k] = torch.arange(k)
        entries[k] = (torch.randint(0, 2**18, (NUM_IMAGES, k), generator=g), assignment)
    labels = torch.arange(NUM_IMAGES) % 5
    meta = {"tokenizer": "tiny-32", "num_classes": 5, "codebook_bits": 18}
    return save_tokens(tmp_path / "train.safetensors", entries=entries, labels=labels, meta=meta)


def test_batch_by_index_array(token_path: Path) -> None:
    tokens = load_tokens(token_path)
    dataset = TokenDataset(token_path)
    assert len(dataset) == NUM_IMAGES and dataset.num_tokens_available == KS
    assert dataset.num_positions == NUM_POSITIONS and dataset.num_classes == 5
    rows = torch.tensor([7, 0, 3])
    for k in KS:
        batch = dataset.batch(rows, num_tokens=k)
        assert isinstance(batch, TokenBatch)
        assert batch.indices.shape == (3, k) and batch.assignment.shape == (3, NUM_POSITIONS)
        assert batch.labels.shape == (3,) and batch.labels.dtype == torch.int64
        assert (batch.num_tokens, batch.num_positions, len(batch)) == (k, NUM_POSITIONS, 3)
        indices, assignment = tokens.get(num_tokens=k)
        assert torch.equal(batch.indices, indices[rows]) and torch.equal(batch.assignment, assignment[rows])
        # The K-sparse raster target: each grid position carries its merged token's codebook index.
        raster = batch.raster_indices()
        assert raster.shape == (3, NUM_POSITIONS)
        for b, row in enumerate(rows.tolist()):
            for p in range(NUM_POSITIONS):
                assert raster[b, p] == indices[row, assignment[row, p]]
            assert set(raster[b].tolist()) == set(indices[row].tolist())  # exactly the K kept indices appear
    assert dataset.batch(slice(2, 5), num_tokens=4).labels.tolist() == [2, 3, 4]
    assert dataset.batch([1, 1], num_tokens=16).indices.shape == (2, 16)
    moved = dataset.batch(rows, num_tokens=4).to("cpu")
    assert moved.indices.device.type == "cpu"


def test_missing_k_and_subset(token_path: Path) -> None:
    dataset = TokenDataset(token_path)
    with pytest.raises(ValueError, match=r"train\.safetensors holds no K=8 tokens; available K: \[4, 16\]"):
        dataset.batch([0], num_tokens=8)
    only = TokenDataset(load_tokens(token_path), num_tokens=[16])
    assert only.num_tokens_available == (16,)
    assert sorted(only[0]) == ["assignment_k16", "indices_k16", "labels"]
    with pytest.raises(ValueError, match=r"holds no K=32 tokens; available K: \[4, 16\]"):
        TokenDataset(token_path, num_tokens=[16, 32])
    with pytest.raises(ValueError, match="1-D index array"):
        dataset.batch(torch.zeros(2, 2, dtype=torch.long), num_tokens=4)


def test_items_and_dataloader_collate(token_path: Path) -> None:
    dataset = TokenDataset(token_path)
    item = dataset[3]
    assert item["labels"].dtype == torch.int64 and item["labels"].ndim == 0 and int(item["labels"]) == 3
    assert item["indices_k4"].shape == (4,) and item["assignment_k16"].shape == (NUM_POSITIONS,)
    loader = DataLoader(dataset, batch_size=4, collate_fn=functools.partial(TokenDataset.collate, num_tokens=16))
    batches = list(loader)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert torch.equal(batches[0].indices, dataset.batch(torch.arange(4), num_tokens=16).indices)
    with pytest.raises(ValueError, match=r"no K=8 tokens; available K: \[4, 16\]"):
        TokenDataset.collate([item], num_tokens=8)


def test_memory_stays_compact_and_batches_are_int64(token_path: Path) -> None:
    wide = load_tokens(token_path)  # int64, as the file's values are compared against
    compact = load_tokens(token_path, compact=True)
    assert {t.dtype for k in KS for t in compact.get(num_tokens=k)} == {torch.int32, torch.int16}
    per_image = sum(k * 4 + NUM_POSITIONS * 2 for k in KS) + 8  # int32 codes, int16 assignments, int64 label
    for dataset in (TokenDataset(token_path), TokenDataset(wide), TokenDataset(compact)):  # int64 sources narrowed
        assert dataset.nbytes == NUM_IMAGES * per_image
        rows = torch.tensor([9, 2, 2, 5])
        for k in KS:
            batch = dataset.batch(rows, num_tokens=k)
            assert batch.indices.dtype == batch.assignment.dtype == batch.labels.dtype == torch.int64
            indices, assignment = wide.get(num_tokens=k)
            assert torch.equal(batch.indices, indices[rows]) and torch.equal(batch.assignment, assignment[rows])
            assert torch.equal(batch.labels, wide.labels[rows])
        item = dataset[4]
        assert item["indices_k16"].dtype == item["assignment_k4"].dtype == torch.int64
    # Codes too wide for int32 stay int64.
    wide_codes = save_tokens(
        token_path.with_name("wide.safetensors"),
        indices=torch.full((2, 4), 2**40),
        assignment=torch.arange(8).expand(2, 8) // 2,
        labels=torch.zeros(2, dtype=torch.long),
        meta={},
    )
    held = TokenDataset(wide_codes)
    assert held.batch([1], num_tokens=4).indices.tolist() == [[2**40] * 4] and held.nbytes == 2 * (4 * 8 + 8 * 2 + 8)
