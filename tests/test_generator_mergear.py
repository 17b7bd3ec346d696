"""MergeAR: the sparsity-inducing mask by value, the merge map of a grid, and a tiny overfit run."""

from __future__ import annotations

import pytest
import torch

from mergevq.generator import Generator, GeneratorConfig, first_occurrence, groups_from_values, mergear_mask


def _brute_mask(values: list[int], *, num_prefix: int, window: int) -> torch.Tensor:
    s = num_prefix + len(values)
    mask = torch.zeros(s, s, dtype=torch.bool)
    for i in range(s):
        for j in range(i + 1):
            if j < num_prefix:
                mask[i, j] = True
                continue
            v = values[j - num_prefix]
            first = v not in values[: j - num_prefix]
            mask[i, j] = first or i - j <= window
    return mask


@pytest.mark.parametrize("window", [0, 1, 3])
def test_mask_matches_brute_force(window):
    gen = torch.Generator().manual_seed(window)
    values = torch.randint(0, 6, (3, 20), generator=gen)  # small alphabet: many duplicates
    mask = mergear_mask(values, num_prefix=2, window=window)
    assert mask.shape == (3, 1, 22, 22)
    for b in range(3):
        assert torch.equal(mask[b, 0], _brute_mask(values[b].tolist(), num_prefix=2, window=window))


def test_mask_semantics_by_value():
    # Groups 0 and 1 share code 7; positions 0..5 hold groups [0, 0, 1, 2, 1, 2] -> values [7, 7, 7, 9, 7, 9].
    values = torch.tensor([[7, 7, 7, 9, 7, 9]])
    assert first_occurrence(values).tolist() == [[True, False, False, True, False, False]]
    mask = mergear_mask(values, num_prefix=2, window=0)[0, 0]
    last = mask[-1].tolist()
    # Prefix always visible; only first occurrences (slots 2 and 5) and itself otherwise.
    assert last == [True, True, True, False, False, True, False, True]
    # A window of 2 also shows the two previous positions.
    last_w2 = mergear_mask(values, num_prefix=2, window=2)[0, 0, -1].tolist()
    assert last_w2 == [True, True, True, False, False, True, True, True]
    # Every query sees itself and the prefix, never the future.
    full = mergear_mask(torch.randint(0, 3, (1, 10)), num_prefix=2, window=0)[0, 0]
    assert full.diagonal().all() and full[:, :2].tril().equal(torch.ones(12, 2, dtype=torch.bool).tril())
    assert not full.triu(1).any()


def test_groups_from_values_is_the_tokenizer_merge_map():
    grid = torch.tensor([[5, 5, 3, 5, 9, 3], [1, 1, 1, 1, 1, 1]])
    groups = groups_from_values(grid)
    assert groups.assignment.tolist() == [[0, 0, 1, 0, 2, 1], [0, 0, 0, 0, 0, 0]]
    assert groups.counts.tolist() == [3, 1]
    assert groups.indices.tolist() == [[5, 3, 9], [1, 0, 0]]
    assert torch.equal(groups.indices.gather(1, groups.assignment), grid)
    # Random merge structures: the grid is rebuilt exactly and groups are ordered by first raster position.
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 50, (4, 16), generator=gen)
    grid = codes.gather(1, torch.randint(0, 16, (4, 64), generator=gen))
    groups = groups_from_values(grid)
    assert torch.equal(groups.indices.gather(1, groups.assignment), grid)
    for b in range(4):
        firsts = [groups.assignment[b, : p + 1].max().item() for p in range(64)]
        assert firsts == sorted(firsts) and firsts[0] == 0


def test_groups_decode_like_the_grid():
    from mergevq.tokenizer.model import MergeVQ

    torch.manual_seed(0)
    tok = MergeVQ.from_preset("tiny-32").eval()
    length = tok.num_tokens_full
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 2**18, (2, 12), generator=gen)
    grid = codes.gather(1, torch.randint(0, 12, (2, length), generator=gen))
    groups = groups_from_values(grid)
    with torch.no_grad():
        direct = tok.decode(grid, torch.arange(length).expand(2, length))
        merged = tok.decode(groups.indices, groups.assignment)
    assert torch.equal(direct, merged)


def test_tiny_mergear_overfits_fixed_sequences():
    torch.manual_seed(0)
    config = GeneratorConfig(
        kind="mergear",
        depth=2,
        width=64,
        num_heads=4,
        codebook_bits=8,
        factorized_bits=(3, 5),
        factorized_depth=1,
        grid=(4, 4),
        num_classes=4,
        merge_levels=(4, 8),
        class_dropout=0.0,
        token_dropout=0.0,
        resid_dropout=0.0,
        ffn_dropout=0.0,
    )
    model = Generator(config)
    gen = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 256, (4, 4), generator=gen)
    assignment = torch.randint(0, 4, (4, 16), generator=gen)
    assignment[:, :4] = torch.arange(4)
    labels = torch.arange(4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        out = model(indices=indices, assignment=assignment, labels=labels, num_tokens=4)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[0] > 5.0 and losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])
    assert out.losses["accuracy"] > 0.9
    # Greedy decoding reproduces the training grids.
    sample = model.generate(labels=labels, num_tokens=4, top_k=1)
    assert (sample.indices == indices.gather(1, assignment)).float().mean() > 0.9
