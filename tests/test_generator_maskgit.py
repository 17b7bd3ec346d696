"""MaskGIT: the mask schedules, masked-only loss, bidirectional attention, iterative decoding and the ToMe-for-SD
inference option (merge/unmerge inside every block through mergevq.nn.tome)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mergevq.generator import Generator, GeneratorConfig
from mergevq.generator.maskgit import MaskGIT, maskgit_schedule, tome_block
from mergevq.nn.tome import carry_destination, init_merge_state, merge_by_assignment, merge_step, unmerge

GRID = (8, 8)
L = 64


def _model(seed: int = 0, **overrides) -> Generator:
    torch.manual_seed(seed)
    base = dict(
        kind="maskgit",
        depth=2,
        width=64,
        num_heads=4,
        codebook_bits=10,
        factorized_bits=(4, 6),
        grid=GRID,
        num_classes=5,
        class_dropout=0.0,
    )
    model = Generator(GeneratorConfig(**{**base, **overrides})).eval()
    for head in model.codes.heads:  # zero-initialised heads would make every comparison trivially equal
        torch.nn.init.normal_(head.weight, std=0.1)
    return model


def _grid(batch: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 1024, (batch, L), generator=torch.Generator().manual_seed(seed))


def _identity(batch: int) -> torch.Tensor:
    return torch.arange(L).expand(batch, L)


# ---------------------------------------------------------------------------------------------------- schedules
def test_schedule_by_hand_and_invariants():
    # floor(16·cos(π/2·t/4)) for t = 1, 2, 3: 14.78, 11.31, 6.12; the last step unmasks everything.
    assert maskgit_schedule(num_tokens=16, steps=4) == [14, 11, 6, 0]
    # Few tokens, many steps: each step unmasks at least one token until one is left, which waits for the last step.
    assert maskgit_schedule(num_tokens=4, steps=8) == [3, 2, 1, 1, 1, 1, 1, 0]
    assert maskgit_schedule(num_tokens=16, steps=1) == [0]
    for length, steps in [(256, 8), (256, 12), (64, 16), (1024, 10)]:
        left = maskgit_schedule(num_tokens=length, steps=steps)
        remaining = length
        for t, n in enumerate(left[:-1]):
            wanted = math.floor(length * math.cos(math.pi / 2 * (t + 1) / steps))
            assert n == max(1, min(remaining - 1, wanted)) and n < remaining
            remaining = n
        assert left[-1] == 0 and len(left) == steps
    with pytest.raises(ValueError, match="steps >= 1"):
        maskgit_schedule(num_tokens=16, steps=0)


def test_training_mask_counts_follow_the_cosine_ratio():
    torch.manual_seed(0)
    mask = MaskGIT.draw_mask(500, L, device=torch.device("cpu"))
    torch.manual_seed(0)
    u = torch.rand(500)
    expected = torch.ceil(torch.cos(math.pi / 2 * u) * L).long().clamp(min=1)
    assert torch.equal(mask.sum(1), expected) and mask.sum(1).min() >= 1
    assert 0.55 < mask.float().mean() < 0.72  # E[cos(π/2·u)] = 2/π ≈ 0.64


# ---------------------------------------------------------------------------------------------------- training
def test_loss_covers_the_masked_positions_only():
    model = _model()
    grid, labels = _grid(3, 1), torch.tensor([0, 2, 4])
    torch.manual_seed(11)
    out = model(indices=grid, assignment=_identity(3), labels=labels, num_tokens=L, return_logits=True)
    torch.manual_seed(11)
    mask = MaskGIT.draw_mask(3, L, device=torch.device("cpu"))
    assert 0 < mask.sum() < mask.numel()
    smoothing = model.config.label_smoothing
    assert smoothing == 0.1  # MaskGIT's default
    ces = [
        F.cross_entropy(lg[mask], part[mask], label_smoothing=smoothing)
        for lg, part in zip(out.logits, (grid % 16, grid // 16))
    ]
    assert torch.allclose(out.losses["ce_g0"], ces[0], atol=1e-6) and torch.allclose(out.loss, sum(ces), atol=1e-6)
    # Masked inputs are [MASK]: changing the targets there changes neither the states nor group 0's logits.
    other = torch.where(mask, (grid + 5) % 1024, grid)
    torch.manual_seed(11)
    out2 = model(indices=other, assignment=_identity(3), labels=labels, num_tokens=L, return_logits=True)
    assert torch.equal(out.logits[0], out2.logits[0])
    # Merged (K-sparse) grids are accepted as targets through the assignment, with K = L.
    assignment = torch.randint(0, L, (3, L))
    model(indices=grid, assignment=assignment, labels=labels, num_tokens=L)


def test_attention_is_bidirectional():
    model = _model()
    scheme = model.scheme
    grid = _grid(1, 2)
    masked = torch.zeros(1, L, dtype=torch.bool)
    labels = torch.tensor([1])
    with torch.no_grad():
        h = scheme.states(model, scheme.embed(model, labels, grid, masked))
        changed = grid.clone()
        changed[0, -1] = (grid[0, -1] + 1) % 1024
        h2 = scheme.states(model, scheme.embed(model, labels, changed, masked))
    assert not torch.allclose(h[:, 0], h2[:, 0])  # the first position sees the last one


# ---------------------------------------------------------------------------------------------------- decoding
def test_decoding_follows_the_schedule_and_keeps_decided_tokens(monkeypatch):
    model = _model()
    scheme = model.scheme
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    embed = scheme.embed

    def spy(model_, labels, tokens, masked):
        seen.append((tokens.clone(), masked.clone()))
        return embed(model_, labels, tokens, masked)

    monkeypatch.setattr(scheme, "embed", spy)
    out = model.generate(labels=torch.tensor([0, 1]), steps=6, generator=torch.Generator().manual_seed(0))
    left = maskgit_schedule(num_tokens=L, steps=6)
    assert [int(m[0].sum()) for _, m in seen] == [L] + left[:-1]
    assert all(int(m[1].sum()) == int(m[0].sum()) for _, m in seen)
    for (_, m_a), (_, m_b) in zip(seen, seen[1:]):
        assert not (m_b & ~m_a).any()  # a decided token is never masked again
    for tokens, masked in seen[1:]:
        assert torch.equal(out.indices[~masked], tokens[~masked])  # decided tokens never change
    assert out.stats.forward_passes == 6 and out.stats.peak_cache_bytes == 0
    assert torch.equal(out.assignment, _identity(2))


def test_generate_defaults_cfg_and_reproducibility():
    model = _model(maskgit_steps=5)
    kw = dict(labels=torch.tensor([0, 3]), cfg_scale=2.5, temperature=(1.0, 0.9), top_k=(0, 40), top_p=0.95)
    a = model.generate(**kw, generator=torch.Generator().manual_seed(7))
    b = model.generate(**kw, generator=torch.Generator().manual_seed(7), use_cache=False)  # no cache to switch off
    c = model.generate(**kw, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.indices, b.indices) and not torch.equal(a.indices, c.indices)
    assert a.indices.shape == (2, L) and a.stats.forward_passes == 5  # config.maskgit_steps
    assert torch.equal(a.stats.distinct_groups, torch.tensor([len(r.unique()) for r in a.indices]))


def test_tiny_maskgit_overfits_and_decodes():
    torch.manual_seed(0)
    config = GeneratorConfig(
        kind="maskgit",
        depth=2,
        width=64,
        num_heads=4,
        codebook_bits=8,
        factorized_bits=(3, 5),
        factorized_depth=1,
        grid=(4, 4),
        num_classes=4,
        class_dropout=0.0,
        token_dropout=0.0,
        resid_dropout=0.0,
        ffn_dropout=0.0,
        label_smoothing=0.0,
    )
    model = Generator(config)
    grid = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # Each grid four times per batch: only masked positions are supervised, so more masks per step.
    batch = dict(indices=grid.repeat(4, 1), assignment=torch.arange(16).expand(16, 16), labels=labels.repeat(4))
    for _ in range(100):
        out = model(**batch, num_tokens=16)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    sample = model.generate(labels=labels, steps=4, top_k=1, generator=torch.Generator().manual_seed(0))
    assert (sample.indices == grid).float().mean() > 0.9


# ---------------------------------------------------------------------------------------------------- ToMe
def test_tome_with_no_merge_is_exactly_the_block():
    model = _model()
    x = torch.randn(2, 1 + L, 64)
    positions = torch.cat([torch.full((1, 2), -1), model.grid_positions])[None]
    from mergevq.nn.rope import rotary_2d

    with torch.no_grad():
        for block in model.trunk.blocks:
            plain = block(x, rotary=rotary_2d(positions, head_dim=16), mask=None, causal=False)
            assert torch.equal(tome_block(block, x, positions_BS2=positions, num_merge=0, rope_base=1e4), plain)
    kw = dict(labels=torch.tensor([1, 2]), steps=4, cfg_scale=2.0)
    a = model.generate(**kw, generator=torch.Generator().manual_seed(3))
    b = model.generate(**kw, tome_ratio=0.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.indices, b.indices)


@pytest.mark.parametrize("ratio", [0.3, 0.75])
def test_tome_reduces_the_tokens_attention_sees(ratio):
    model = _model()
    seen: list[int] = []
    hooks = [
        b.attn.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1])) for b in model.trunk.blocks
    ]
    out = model.generate(
        labels=torch.tensor([0, 4]), steps=3, tome_ratio=ratio, generator=torch.Generator().manual_seed(0)
    )
    for h in hooks:
        h.remove()
    assert out.indices.shape == (2, L) and out.stats.forward_passes == 3
    assert seen == [1 + L - int(ratio * L)] * (3 * 2)  # every block of every step
    x = torch.randn(2, 1 + L, 64)
    with torch.no_grad():
        h_plain = model.scheme.states(model, x)
        h_tome = model.scheme.states(model, x, tome_ratio=ratio)
    assert h_tome.shape == h_plain.shape == (2, L, 64) and not torch.allclose(h_tome, h_plain)
    with pytest.raises(ValueError, match="tome_ratio"):
        model.generate(labels=torch.tensor([0]), tome_ratio=1.0)


def test_carry_destination_and_merge_by_assignment():
    torch.manual_seed(0)
    tokens = torch.randn(3, 1 + 20, 8)
    state = init_merge_state(tokens, has_cls=True)
    positions = torch.randint(0, 100, (3, 20, 2))
    for r in (7, 5, 3):  # several rounds
        merged = merge_step(state, metric=state.tokens, r=r)
        carried = carry_destination(positions, before=state, after=merged)
        new_of_old = merged.assignment.gather(1, state.first_position)
        for b in range(3):
            for g in range(merged.num_groups):
                members = (new_of_old[b] == g).nonzero().flatten().tolist()
                dest = [m for m in members if m % 2 == 1] if len(members) > 1 else members
                assert len(dest) == 1 and carried[b, g].tolist() == positions[b, dest[0]].tolist()
        state, positions = merged, carried
    # The group average of the original tokens is merge_step's size-weighted merge; unmerge spreads it back.
    averaged = merge_by_assignment(tokens, state.assignment, num_groups=state.num_groups, has_cls=True)
    assert torch.allclose(averaged, state.tokens, atol=1e-6) and torch.equal(averaged[:, 0], tokens[:, 0])
    assert unmerge(averaged[:, 1:], state.assignment).shape == (3, 20, 8)


# ---------------------------------------------------------------------------------------------------- config
def test_config_and_argument_checks(tmp_path):
    with pytest.raises(ValueError, match="GeneratorConfig.merge_levels"):
        GeneratorConfig(kind="maskgit", grid=(4, 4), merge_levels=(4,))
    with pytest.raises(ValueError, match="GeneratorConfig.maskgit_steps"):
        GeneratorConfig(kind="maskgit", maskgit_steps=0)
    assert GeneratorConfig(kind="maskgit").label_smoothing == 0.1
    assert GeneratorConfig(kind="maskgit", label_smoothing=0.0).label_smoothing == 0.0
    model = _model()
    with pytest.raises(ValueError, match="MaskGIT models all L=64"):
        model.generate(labels=torch.tensor([1]), num_tokens=16)
    with pytest.raises(ValueError, match="MaskGIT models all L=64"):
        model(
            indices=torch.zeros(1, 16, dtype=torch.long),
            assignment=torch.zeros(1, L, dtype=torch.long),
            labels=torch.tensor([0]),
            num_tokens=16,
        )
    with pytest.raises(ValueError, match="steps applies to RandAR and MaskGIT"):
        _model(kind="ar").generate(labels=torch.tensor([1]), steps=4)
    model.save_pretrained(tmp_path / "gen")
    loaded = Generator.from_pretrained(tmp_path / "gen")
    assert loaded.config == model.config and torch.equal(loaded.mask_embedding, model.mask_embedding)
    assert model.parameter_counts()["mask_embedding"] == 64
