"""RandAR over merged tokens: the decoding schedule, the interleaved sequence and its loss slots, cached parallel
decoding against the full forward (with CFG), generation and configuration."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mergevq.generator import Generator, GeneratorConfig
from mergevq.generator.randar import RandAR, RandARDecoder, randar_schedule, rank_positions
from mergevq.generator.sampling import Sampler
from mergevq.nn.rope import apply_rotary, rotary_2d

GRID = (8, 8)
K = 16


def _model(*, layout: str = "2d", seed: int = 0, **overrides) -> Generator:
    torch.manual_seed(seed)
    base = dict(
        kind="randar",
        depth=2,
        width=64,
        num_heads=4,
        codebook_bits=10,
        factorized_bits=(4, 6),
        grid=GRID,
        num_classes=5,
        merge_levels=(K, 32),
        rank_layout=layout,
        class_dropout=0.0,
    )
    model = Generator(GeneratorConfig(**{**base, **overrides})).eval()
    for head in model.codes.heads:  # zero-initialised heads would make every comparison trivially equal
        torch.nn.init.normal_(head.weight, std=0.1)
    return model


# ---------------------------------------------------------------------------------------------------- schedule
# Tokens per forward pass, Table 3's settings (N = 144 tokens in 64 passes, N = 256 in 88).
EXPECTED_144_64 = [1] * 23 + [2] * 6 + [3, 2, 3, 2, 3, 2, 3, 3, 3, 3, 2, 3, 3, 4, 3, 3, 3, 3, 3, 4, 3, 3, 4, 3, 4]
EXPECTED_144_64 += [3, 3, 4, 3, 4, 3, 4, 3, 4, 3]
EXPECTED_256_88 = [1] * 24 + [2] * 6 + [3, 2, 3, 2, 3, 3, 2] + [3] * 7 + [4, 3, 3, 4, 3, 4, 3, 4, 4, 3, 4, 4]
EXPECTED_256_88 += [4] * 9 + [5, 4, 4, 4, 5, 4, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4]


@pytest.mark.parametrize(("n", "t", "expected", "most"), [(144, 64, EXPECTED_144_64, 4), (256, 88, EXPECTED_256_88, 5)])
def test_schedule_matches_the_published_step_counts(n, t, expected, most):
    counts = randar_schedule(num_tokens=n, steps=t)
    assert counts == expected
    assert len(counts) == t and sum(counts) == n and max(counts) == most and min(counts) == 1
    # Wherever the cosine curve is ahead of "one more token", the cumulative count is exactly the formula.
    done = 0
    for s, c in enumerate(counts):
        formula = min(n, int((1 - math.cos(math.pi / 2 * (s + 1) / t)) * n + 1))
        done += c
        assert done == max(formula, done - c + 1)


def test_schedule_edges():
    assert randar_schedule(num_tokens=16, steps=16) == [1] * 16  # one token per pass: sequential RandAR
    assert randar_schedule(num_tokens=16, steps=1) == [16]
    for n in (1, 7, 64, 100):
        for t in range(1, n + 1):
            counts = randar_schedule(num_tokens=n, steps=t)
            assert len(counts) == t and sum(counts) == n and min(counts) >= 1
    with pytest.raises(ValueError, match="steps must lie in"):
        randar_schedule(num_tokens=16, steps=17)


def test_rank_positions_layouts():
    two = rank_positions(10, layout="2d")  # ceil(√10) = 4 columns
    assert two.tolist() == [[r // 4, r % 4] for r in range(10)]
    assert rank_positions(16, layout="2d").tolist() == [[r // 4, r % 4] for r in range(16)]
    assert rank_positions(5, layout="1d").tolist() == [[r, r] for r in range(5)]
    with pytest.raises(ValueError, match="rank layout"):
        rank_positions(4, layout="3d")


# ---------------------------------------------------------------------------------------------------- training
def _rotated_query(model: Generator, row: int, col: int) -> torch.Tensor:
    """The position instruction for one cell, rotated by hand, ``[C]``."""
    heads, d = model.config.num_heads, model.config.head_dim
    rot = rotary_2d(torch.tensor([[[row, col]]]), head_dim=d)
    return apply_rotary(model.position_query.view(1, heads, 1, d), rot).reshape(-1)


@pytest.mark.parametrize("layout", ["2d", "1d"])
def test_loss_is_cross_entropy_at_the_position_slots(layout):
    """Brute force: build [cls, M_K, P_π1, x_π1, …] per sample, read the states at slots 2, 4, …, 2K."""
    model = _model(layout=layout)
    batch = 3
    gen = torch.Generator().manual_seed(1)
    indices = torch.randint(0, 1024, (batch, K), generator=gen)
    assignment = torch.randint(0, K, (batch, 64), generator=gen)
    labels = torch.tensor([0, 2, 4])
    torch.manual_seed(123)
    out = model(indices=indices, assignment=assignment, labels=labels, num_tokens=K, return_logits=True)
    torch.manual_seed(123)
    order = RandAR.draw_order(batch, K, device=torch.device("cpu"))
    assert all(sorted(o.tolist()) == list(range(K)) for o in order) and not torch.equal(order[0], order[1])
    cells = rank_positions(K, layout=layout).tolist()
    merge = model.merge_embedding.weight[0]  # K = 16 is the first merge level
    states, targets = [], []
    with torch.no_grad():
        for b in range(batch):
            seq = [model.class_embedding.weight[labels[b]], merge]
            pos = [[-1, -1], [-1, -1]]
            for n, r in enumerate(order[b].tolist()):
                seq.append(_rotated_query(model, *cells[r]))
                pos.append(cells[r])
                if n < K - 1:
                    seq.append(model.codes.embed(indices[b, r]))
                    pos.append(cells[r])
            h = model.trunk(torch.stack(seq)[None], positions_BS2=torch.tensor([pos]))
            assert h.shape[1] == 2 + 2 * K - 1
            states.append(h[0, 2::2])
            targets.append(indices[b, order[b]])
        h_P = torch.stack(states)
        target = torch.stack(targets)
        logits = model.codes.logits(h_P, target)
    smoothing = model.config.label_smoothing
    assert smoothing == 0.1  # RandAR's default (SPEC Table A2)
    ces = [
        F.cross_entropy(lg.reshape(-1, lg.shape[-1]), part.reshape(-1), label_smoothing=smoothing)
        for lg, part in zip(logits, (target % 16, target // 16))
    ]
    assert torch.allclose(out.loss, ces[0] + ces[1], atol=1e-5)
    assert torch.allclose(out.losses["ce_g0"], ces[0], atol=1e-5)
    # Returned logits are in rank order: the π-ordered brute-force logits scattered back.
    for lg_out, lg in zip(out.logits, logits):
        rank_order = torch.empty_like(lg).scatter_(1, order[:, :, None].expand_as(lg), lg)
        assert torch.allclose(lg_out, rank_order, atol=1e-5)


def test_each_step_draws_a_new_order_and_reseeding_reproduces_it():
    model = _model()
    gen = torch.Generator().manual_seed(2)
    batch = dict(
        indices=torch.randint(0, 1024, (2, K), generator=gen),
        assignment=torch.randint(0, K, (2, 64), generator=gen),
        labels=torch.tensor([1, 2]),
        num_tokens=K,
    )
    torch.manual_seed(5)
    a = model(**batch).loss
    b = model(**batch).loss
    torch.manual_seed(5)
    c = model(**batch).loss
    assert not torch.allclose(a, b) and torch.equal(a, c)


def test_gradients_reach_the_position_query_and_the_merge_instruction():
    model = _model().train()
    gen = torch.Generator().manual_seed(3)
    out = model(
        indices=torch.randint(0, 1024, (2, K), generator=gen),
        assignment=torch.randint(0, K, (2, 64), generator=gen),
        labels=torch.tensor([1, 2]),
        num_tokens=K,
    )
    out.loss.backward()
    assert model.position_query.grad.abs().sum() > 0
    assert model.merge_embedding.weight.grad[0].abs().sum() > 0 and model.merge_embedding.weight.grad[1].eq(0).all()


# ---------------------------------------------------------------------------------------------------- decoding
def _decode_logits(model, labels, order, tokens_pi, counts, *, use_cache):
    """Teacher-forced parallel decoding: per step the logits of the step's queries given the true tokens."""
    dec = RandARDecoder(model, labels=labels, num_tokens=K, order=order, use_cache=use_cache)
    out, done, fed = [], 0, None
    with torch.no_grad():
        for m in counts:
            h = dec.step(fed, count=m)
            assert h.shape == (labels.shape[0], m, model.config.width)
            out.append(model.codes.logits(h, tokens_pi[:, done : done + m]))
            fed = tokens_pi[:, done : done + m]
            done += m
    return out, dec


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for step_a, step_b in zip(a, b) for x, y in zip(step_a, step_b))


@pytest.mark.parametrize(("cfg", "layout"), [(False, "2d"), (True, "2d"), (False, "1d")])
def test_cached_parallel_decoding_equals_full_forward(cfg, layout):
    model = _model(layout=layout)
    gen = torch.Generator().manual_seed(4)
    labels = torch.tensor([1, 3])
    order = torch.rand(2, K, generator=gen).argsort(1)
    tokens = torch.randint(0, 1024, (2, K), generator=gen)  # in decoding order
    if cfg:  # doubled batch: conditional rows, then null-class rows with the same order and tokens
        labels, order, tokens = torch.cat([labels, torch.full_like(labels, 5)]), order.repeat(2, 1), tokens.repeat(2, 1)
    counts = randar_schedule(num_tokens=K, steps=6)
    assert max(counts) > 1  # several queries per pass
    cached, dec = _decode_logits(model, labels, order, tokens, counts, use_cache=True)
    reference, ref = _decode_logits(model, labels, order, tokens, counts, use_cache=False)
    assert _max_diff(cached, reference) <= 1e-5
    assert dec.forward_passes == ref.forward_passes == 6
    assert dec.cache.length == 2 + K + (K - counts[-1])  # prefix, every query, all tokens but the last step's
    assert dec.cache.capacity == 40 and dec.peak_cache_bytes > 0 and ref.peak_cache_bytes == 0  # find_multiple(33, 8)


def test_one_token_per_step_reproduces_the_training_forward():
    """With T = K the decoding sequence is the training sequence, so the logits match the training forward's."""
    model = _model()
    gen = torch.Generator().manual_seed(6)
    indices = torch.randint(0, 1024, (2, K), generator=gen)
    labels = torch.tensor([0, 4])
    torch.manual_seed(9)
    out = model(
        indices=indices,
        assignment=torch.zeros(2, 64, dtype=torch.long),
        labels=labels,
        num_tokens=K,
        return_logits=True,
    )
    torch.manual_seed(9)
    order = RandAR.draw_order(2, K, device=torch.device("cpu"))
    steps, _ = _decode_logits(model, labels, order, indices.gather(1, order), [1] * K, use_cache=True)
    for g, lg in enumerate(out.logits):
        decoded = torch.cat([step[g] for step in steps], dim=1)  # π order
        assert torch.allclose(lg.gather(1, order[:, :, None].expand_as(decoded)), decoded, atol=1e-5)


@pytest.mark.parametrize(("cfg_scale", "steps"), [(1.0, None), (3.0, 5)])
def test_generate_with_cache_equals_without(cfg_scale, steps):
    model = _model()
    kw = dict(
        labels=torch.tensor([0, 3, 4]),
        num_tokens=K,
        cfg_scale=cfg_scale,
        steps=steps,
        temperature=(1.0, 0.9),
        top_k=(0, 40),
        top_p=0.95,
    )
    a = model.generate(**kw, generator=torch.Generator().manual_seed(7))
    b = model.generate(**kw, generator=torch.Generator().manual_seed(7), use_cache=False)
    assert torch.equal(a.indices, b.indices)
    assert a.indices.shape == (3, K) and a.assignment is None and b.assignment is None
    s = a.stats
    assert s.forward_passes == (steps or K) and s.peak_cache_bytes > 0 and b.stats.peak_cache_bytes == 0
    assert s.distinct_groups.tolist() == [K, K, K] and s.tokens_per_s > 0 and not model.training
    c = model.generate(**kw, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(a.indices, c.indices)
    # Another trained K: its own merge instruction and length.
    assert model.generate(labels=torch.tensor([1]), num_tokens=32, steps=4).indices.shape == (1, 32)


def test_linear_cfg_schedule_over_decoded_tokens():
    sampler = Sampler.build(groups=2, cfg_scale=4.0, cfg_start=1.0, cfg_schedule="linear")
    assert [sampler.weight(k / 8) for k in (0, 2, 4, 8)] == [1.0, 1.75, 2.5, 4.0]  # w0 + (w1 − w0)·k/N
    assert Sampler.build(groups=1, cfg_scale=1.0, cfg_start=2.0, cfg_schedule="linear").guide
    assert not Sampler.build(groups=1, cfg_scale=1.0, cfg_start=2.0, cfg_schedule="constant").guide


def test_tiny_randar_overfits_and_decodes_in_parallel():
    torch.manual_seed(0)
    config = GeneratorConfig(
        kind="randar",
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
        label_smoothing=0.0,
    )
    model = Generator(config)
    gen = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 256, (4, 8), generator=gen)
    assignment = torch.zeros(4, 16, dtype=torch.long)
    labels = torch.arange(4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        out = model(indices=indices, assignment=assignment, labels=labels, num_tokens=8)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
    sample = model.generate(labels=labels, num_tokens=8, steps=4, top_k=1, generator=torch.Generator().manual_seed(0))
    assert (sample.indices == indices).float().mean() > 0.9


# ---------------------------------------------------------------------------------------------------- config
def test_config_and_argument_checks(tmp_path):
    with pytest.raises(ValueError, match="GeneratorConfig.merge_levels"):
        GeneratorConfig(kind="randar")
    with pytest.raises(ValueError, match="GeneratorConfig.rank_layout"):
        GeneratorConfig(kind="randar", grid=(4, 4), merge_levels=(4,), rank_layout="3d")
    cfg = GeneratorConfig(kind="randar", grid=(4, 4), merge_levels=(4,))
    assert cfg.label_smoothing == 0.1 and cfg.rank_layout == "2d"
    assert cfg.replace(kind="ar", merge_levels=()).label_smoothing == 0.0
    model = _model()
    with pytest.raises(ValueError, match=r"num_tokens=20 has no merge instruction.*\(16, 32\)"):
        model.generate(labels=torch.tensor([1]), num_tokens=20)
    with pytest.raises(ValueError, match="steps must lie in"):
        model.generate(labels=torch.tensor([1]), num_tokens=K, steps=K + 1)
    with pytest.raises(ValueError, match="tome_ratio applies to MaskGIT"):
        model.generate(labels=torch.tensor([1]), num_tokens=K, tome_ratio=0.5)
    with pytest.raises(ValueError, match="raster decoder"):
        model.decoder(labels=torch.tensor([1]), num_tokens=K)
    with pytest.raises(ValueError, match=r"expected indices \[B, K=16\]"):
        model(
            indices=torch.zeros(1, 8, dtype=torch.long),
            assignment=torch.zeros(1, 64, dtype=torch.long),
            labels=torch.tensor([0]),
            num_tokens=K,
        )
    model.save_pretrained(tmp_path / "gen")
    loaded = Generator.from_pretrained(tmp_path / "gen")
    assert loaded.config == model.config and torch.equal(loaded.position_query, model.position_query)
    assert model.parameter_counts()["position_query"] == 64
