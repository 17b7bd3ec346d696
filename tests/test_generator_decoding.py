"""Cached decoding reproduces the full forward: vanilla AR (static cache) and MergeAR (compact cache), with CFG."""

from __future__ import annotations

import pytest
import torch

from mergevq.generator import Generator, GeneratorConfig, groups_from_values

GRID = (8, 8)
L = 64
K = 16


def _model(kind: str, *, window: int = 0, seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    config = GeneratorConfig(
        kind=kind,
        depth=2,
        width=64,
        num_heads=4,
        codebook_bits=10,
        factorized_bits=(4, 6),
        grid=GRID,
        num_classes=5,
        merge_levels=(K, 32) if kind == "mergear" else (),
        window=window,
    )
    model = Generator(config).eval()
    for head in model.codes.heads:  # zero-initialised heads would make every comparison trivially equal
        torch.nn.init.normal_(head.weight, std=0.1)
    return model


def _merged_grid(batch: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge-like data: K groups of raster-contiguous runs (plus shuffled pieces), codes shared by some groups."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1024, (batch, K), generator=gen)
    codes[:, 1] = codes[:, 0]  # two groups with one code: they collapse by value
    assignment = torch.randint(0, K, (batch, L), generator=gen)
    assignment[:, :K] = torch.arange(K)  # every group is used
    # Later rows use fewer groups, so samples keep different numbers of cache entries (padding in the kept store).
    for b in range(1, batch):
        used = max(2, K - 5 * b)
        assignment[b] = torch.randint(0, used, (L,), generator=gen)
        assignment[b, :used] = torch.arange(used)
    return codes, assignment


def _step_logits(model: Generator, labels: torch.Tensor, grid_BL: torch.Tensor, *, use_cache: bool, num_tokens):
    """Teacher-forced decoding; per step the logits of every bit group given the true earlier groups."""
    dec = model.decoder(labels=labels, num_tokens=num_tokens, use_cache=use_cache)
    out = []
    with torch.no_grad():
        h = dec.start()
        for t in range(L):
            out.append(model.codes.logits(h[:, None], grid_BL[:, t : t + 1]))
            if t < L - 1:
                h = dec.feed(grid_BL[:, t])
    return out, dec


def _max_diff(a, b) -> float:
    return max(float((x - y).detach().abs().max()) for step_a, step_b in zip(a, b) for x, y in zip(step_a, step_b))


@pytest.mark.parametrize(
    ("kind", "window", "cfg"),
    [("ar", 0, False), ("ar", 0, True), ("mergear", 0, False), ("mergear", 3, False), ("mergear", 2, True)],
)
def test_cached_logits_equal_full_forward(kind, window, cfg):
    model = _model(kind, window=window)
    codes, assignment = _merged_grid(2, seed=1)
    grid = codes.gather(1, assignment) if kind == "mergear" else torch.randint(0, 1024, (2, L))
    labels = torch.tensor([1, 4])
    if cfg:  # doubled batch: conditional rows, then null-class rows with the same tokens
        labels, grid = torch.cat([labels, torch.full_like(labels, 5)]), torch.cat([grid, grid])
    num_tokens = K if kind == "mergear" else None
    cached, dec = _step_logits(model, labels, grid, use_cache=True, num_tokens=num_tokens)
    reference, _ = _step_logits(model, labels, grid, use_cache=False, num_tokens=num_tokens)
    assert _max_diff(cached, reference) <= 1e-5
    assert dec.forward_passes == L
    # The training forward sees the same context as decoding (eval mode: no dropout).
    if not cfg:
        target_k = codes if kind == "mergear" else grid
        target_a = assignment if kind == "mergear" else torch.arange(L).expand(2, L)
        out = model(
            indices=target_k,
            assignment=target_a,
            labels=labels,
            num_tokens=K if kind == "mergear" else L,
            return_logits=True,
        )
        train = [[lg[:, t : t + 1] for lg in out.logits] for t in range(L)]
        assert _max_diff(train, reference) <= 1e-5


def test_compact_cache_is_smaller_by_the_kept_ratio():
    codes, assignment = _merged_grid(2, seed=3)
    grid = codes.gather(1, assignment)
    labels = torch.tensor([0, 2])
    _, vanilla = _step_logits(_model("ar"), labels, grid, use_cache=True, num_tokens=None)
    for window in (0, 4):
        model = _model("mergear", window=window)
        _, dec = _step_logits(model, labels, grid, use_cache=True, num_tokens=K)
        counts = groups_from_values(grid).counts
        distinct = int(counts.max())  # ≤ K − 1: two groups share a code
        assert distinct <= K - 1 and counts[0] != counts[1]
        cache = dec.cache
        # Kept store: prefix (2) + first occurrences, never the duplicates; 2 + K slots allocated up front, and
        # these grids have fewer distinct codes than K, so it never grows.
        assert torch.equal(cache.num_kept, 2 + groups_from_values(grid).counts)
        assert cache.capacity == 2 + K
        ratio = dec.peak_cache_bytes / vanilla.peak_cache_bytes
        expected = (cache.capacity + window + 1) / 64  # ring = window + 1; vanilla: find_multiple(1 + L − 1, 8) = 64
        assert ratio == pytest.approx(expected) and ratio < 0.5, ratio
        assert cache.kept_slots[:, :2].eq(torch.tensor([0, 1])).all()  # the position cache records true slots


@pytest.mark.parametrize(("kind", "cfg_scale", "schedule"), [("ar", 1.0, "constant"), ("mergear", 3.0, "linear")])
def test_generate_with_cache_equals_without(kind, cfg_scale, schedule):
    model = _model(kind, window=2)  # window is ignored by vanilla AR
    labels = torch.tensor([0, 3])
    kw = dict(
        labels=labels,
        num_tokens=K if kind == "mergear" else None,
        cfg_scale=cfg_scale,
        cfg_schedule=schedule,
        temperature=(1.0, 0.9),
        top_k=(0, 40),
        top_p=0.95,
    )
    a = model.generate(**kw, generator=torch.Generator().manual_seed(7))
    b = model.generate(**kw, generator=torch.Generator().manual_seed(7), use_cache=False)
    assert torch.equal(a.indices, b.indices)
    assert a.indices.shape == (2, L) and torch.equal(a.assignment, torch.arange(L).expand(2, L))
    s = a.stats
    assert s.forward_passes == L and s.peak_cache_bytes > 0 and b.stats.peak_cache_bytes == 0
    assert torch.equal(s.distinct_groups, torch.tensor([len(r.unique()) for r in a.indices]))
    assert s.tokens_per_s > 0 and s.images_per_s > 0 and not model.training


def test_generate_restores_training_mode_and_checks_arguments():
    model = _model("mergear").train()
    out = model.generate(labels=torch.tensor([1]), num_tokens=32, generator=torch.Generator().manual_seed(0))
    assert model.training and out.indices.shape == (1, L)
    with pytest.raises(ValueError, match=r"num_tokens=20 has no merge instruction.*\(16, 32\)"):
        model.generate(labels=torch.tensor([1]), num_tokens=20)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\]"):
        model.generate(labels=torch.tensor([6]), num_tokens=16)
    with pytest.raises(ValueError, match="cfg_schedule"):
        model.generate(labels=torch.tensor([1]), num_tokens=16, cfg_schedule="cosine")
    with pytest.raises(ValueError, match="vanilla AR models all L=64"):
        _model("ar")(
            indices=torch.zeros(1, 16, dtype=torch.long),
            assignment=torch.zeros(1, L, dtype=torch.long),
            labels=torch.tensor([0]),
            num_tokens=16,
        )


@pytest.mark.parametrize("kind", ["ar", "mergear"])
def test_multi_token_steps_equal_full_forward(kind):
    """Steps of several tokens at once (the next parallel decoders): each chunk's states equal the full forward's."""
    from mergevq.generator.ar import raster_positions

    model = _model(kind, window=3)
    codes, assignment = _merged_grid(3, seed=5)
    grid = codes.gather(1, assignment)
    labels = torch.tensor([0, 1, 2])
    prefix = model.scheme.prefix(model, labels, K if kind == "mergear" else L)
    p = prefix.shape[1]
    x = torch.cat([prefix, model.codes.embed(grid[:, :-1])], dim=1)
    values = torch.cat([torch.full((3, p), -1), grid[:, :-1]], dim=1)
    positions = torch.cat([torch.full((p, 2), -1), raster_positions(GRID)[:-1]])[None]
    with torch.no_grad():
        full = model.trunk(x, positions_BS2=positions, mask=model.scheme.attention_mask(grid[:, :-1]))
        cache = model.scheme.new_cache(model, batch_size=3, dtype=x.dtype, device=x.device)
        bounds = [0, p, p + 5, p + 6, p + 13, p + 14, p + 30, x.shape[1]]
        for a, b in zip(bounds[:-1], bounds[1:]):
            mask = cache.begin(values[:, a:b])
            h = model.trunk(x[:, a:b], positions_BS2=positions[:, a:b], mask=mask, cache=cache)
            cache.end()
            assert float((h - full[:, a:b]).abs().max()) <= 1e-5, (a, b)


@pytest.mark.parametrize("window", [0, 3])
def test_compact_cache_grows_past_k_and_stays_exact(window):
    """A sample with more distinct codes than its merge instruction asked for grows the kept store in blocks."""
    codes, assignment = _merged_grid(2, seed=5)
    grid = codes.gather(1, assignment)
    grid[0, 40:] = torch.randperm(2**10, generator=torch.Generator().manual_seed(1))[: L - 40]  # mostly new codes
    labels = torch.tensor([1, 4])
    model = _model("mergear", window=window)
    cached, dec = _step_logits(model, labels, grid, use_cache=True, num_tokens=K)
    reference, _ = _step_logits(model, labels, grid, use_cache=False, num_tokens=K)
    assert _max_diff(cached, reference) <= 1e-5
    distinct = groups_from_values(grid[:, :-1]).counts  # the last token is predicted, never fed
    assert int(distinct[0]) > K and torch.equal(dec.cache.num_kept, 2 + distinct)
    assert dec.cache.capacity > 2 + K  # grew past the up-front allocation
