"""Factorised code head, sampling filters, guidance, RoPE and the LLaMA block details."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mergevq.generator import Generator, GeneratorConfig
from mergevq.generator.sampling import cfg_weight, filter_logits, guided, per_group, sample_logits
from mergevq.nn.lfq import join_indices, split_indices
from mergevq.nn.rope import apply_rotary, rotary_2d


def _model(**overrides) -> Generator:
    base = dict(
        depth=1,
        width=32,
        num_heads=2,
        codebook_bits=8,
        factorized_bits=(3, 5),
        grid=(4, 4),
        num_classes=3,
        class_dropout=0.0,
        token_dropout=0.0,
        resid_dropout=0.0,
        ffn_dropout=0.0,
    )
    return Generator(GeneratorConfig(**{**base, **overrides}))


def _randomize_heads(model: Generator, std: float = 0.1) -> None:
    for head in model.codes.heads:
        torch.nn.init.normal_(head.weight, std=std)


def test_split_join_round_trip():
    idx = torch.randint(0, 2**18, (1000,))
    parts = split_indices(idx, bits=(6, 12))
    assert int(parts[0].max()) < 64 and int(parts[1].max()) < 4096
    assert torch.equal(join_indices(parts, bits=(6, 12)), idx)
    assert torch.equal(parts[0], idx % 64)  # lowest bits first


def test_embedding_is_sum_of_group_embeddings():
    model = _model()
    idx = torch.tensor([0, 7, 8, 255])
    lo, hi = idx % 8, idx // 8
    expected = model.codes.embeddings[0].weight[lo] + model.codes.embeddings[1].weight[hi]
    assert torch.allclose(model.codes.embed(idx), expected)


def test_loss_is_sum_of_group_cross_entropies_by_hand():
    torch.manual_seed(0)
    model = _model().eval()
    _randomize_heads(model)
    b, length, k = 3, 16, 16
    indices = torch.randint(0, 256, (b, k))
    assignment = torch.arange(length).expand(b, length)
    labels = torch.tensor([0, 1, 2])
    out = model(indices=indices, assignment=assignment, labels=labels, num_tokens=k, return_logits=True)
    lo, hi = indices % 8, indices // 8
    ce0 = F.cross_entropy(out.logits[0].reshape(-1, 8), lo.reshape(-1))
    ce1 = F.cross_entropy(out.logits[1].reshape(-1, 32), hi.reshape(-1))
    assert torch.allclose(out.losses["ce_g0"], ce0) and torch.allclose(out.losses["ce_g1"], ce1)
    assert torch.allclose(out.loss, ce0 + ce1)
    right = (out.logits[0].argmax(-1) == lo) & (out.logits[1].argmax(-1) == hi)
    assert torch.allclose(out.losses["accuracy"], right.float().mean())
    # Group 1's logits depend on the true group 0 (the intra stack), group 0's do not depend on group 1.
    h = torch.randn(5, 1, 32)
    a = model.codes.logits(h, torch.tensor([[3], [3], [3], [3], [3]]))
    c = model.codes.logits(h, torch.tensor([[3 + 8], [3 + 8], [3 + 8], [3 + 8], [3 + 8]]))
    d = model.codes.logits(h, torch.tensor([[4], [4], [4], [4], [4]]))
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]) and not torch.allclose(a[1], d[1])


def test_zero_init_head_gives_uniform_logits():
    model = _model(codebook_bits=18, factorized_bits=(6, 12))
    out = model(
        indices=torch.randint(0, 2**18, (2, 16)),
        assignment=torch.arange(16).expand(2, 16),
        labels=torch.tensor([0, 1]),
        num_tokens=16,
        return_logits=True,
    )
    assert all(torch.equal(lg, torch.zeros_like(lg)) for lg in out.logits)
    assert torch.allclose(out.loss, torch.tensor(math.log(64) + math.log(4096)))


def test_label_dropout_only_in_training():
    model = _model(class_dropout=1.0)
    labels = torch.tensor([0, 1, 2, 1])
    model.train()
    assert torch.equal(model.drop_labels(labels), torch.full_like(labels, 3))  # null class = num_classes
    model.eval()
    assert torch.equal(model.drop_labels(labels), labels)
    half = _model(class_dropout=0.5).train()
    torch.manual_seed(0)
    dropped = half.drop_labels(torch.zeros(2000, dtype=torch.long))
    assert set(dropped.unique().tolist()) == {0, 3} and 0.4 < (dropped == 3).float().mean() < 0.6


def test_top_k_one_is_argmax_per_group():
    torch.manual_seed(0)
    model = _model().eval()
    _randomize_heads(model, std=0.5)
    h = torch.randn(6, 32)
    seen: list[torch.Tensor] = []

    def choose(g, logits):
        seen.append(logits.argmax(-1))
        return sample_logits(logits, top_k=1, temperature=1.7, generator=torch.Generator().manual_seed(g))

    codes = model.codes.sample(h, choose=choose)
    assert torch.equal(codes, seen[0] + 8 * seen[1])
    # The argmax of group 1 is taken given the drawn group 0 (the teacher-forced logits with that group).
    teacher = model.codes.logits(h[:, None], codes[:, None])
    assert torch.equal(teacher[0][:, 0].argmax(-1), seen[0]) and torch.equal(teacher[1][:, 0].argmax(-1), seen[1])


def _top_p_reference(logits: torch.Tensor, p: float) -> torch.Tensor:
    out = torch.full_like(logits, -float("inf"))
    for r in range(logits.shape[0]):
        probs = logits[r].softmax(-1)
        mass = 0.0
        for c in probs.argsort(descending=True).tolist():
            out[r, c] = logits[r, c]
            mass += float(probs[c])
            if mass >= p:
                break
    return out


@pytest.mark.parametrize("p", [0.05, 0.3, 0.7, 0.95])
def test_top_p_against_brute_force(p):
    torch.manual_seed(1)
    logits = torch.randn(8, 50, dtype=torch.float64) * 2
    assert torch.equal(filter_logits(logits, top_p=p), _top_p_reference(logits, p))


def test_top_k_keeps_k_largest_and_sampling_respects_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept.tolist() == [[False, True, False, True, False]]
    gen = torch.Generator().manual_seed(0)
    draws = sample_logits(logits.expand(500, 5), top_k=2, generator=gen)
    assert set(draws.tolist()) == {1, 3}
    with pytest.raises(ValueError, match="temperature"):
        sample_logits(logits, temperature=0.0)


def test_guidance_and_schedules():
    cond, uncond = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    assert torch.equal(guided(torch.cat([cond, uncond]), weight=3.0), torch.tensor([[4.0, -2.0]]))
    assert cfg_weight(4.0, schedule="constant", step=5, total=10) == 4.0
    assert [cfg_weight(4.0, schedule="linear", step=s, total=4) for s in range(4)] == [1.0, 2.0, 3.0, 4.0]
    assert per_group(0.5, groups=2, name="top_p") == (0.5, 0.5)
    with pytest.raises(ValueError, match="top_k has 3 values for 2 bit groups"):
        per_group([1, 2, 3], groups=2, name="top_k")


def test_rope_2d_rows_columns_and_identity():
    d = 16
    positions = torch.tensor([[[-1, -1], [0, 0], [2, 0], [0, 3]]])
    rot = rotary_2d(positions, head_dim=d)
    x = torch.randn(1, 1, 4, d)
    y = apply_rotary(x, rot)
    assert torch.equal(y[:, :, :2], x[:, :, :2])  # no position and (0, 0): identity
    # Row moves only the first half of the channels, column only the second half; norms are preserved.
    assert torch.equal(y[..., 2, d // 2 :], x[..., 2, d // 2 :]) and not torch.allclose(y[..., 2, :8], x[..., 2, :8])
    assert torch.equal(y[..., 3, : d // 2], x[..., 3, : d // 2])
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    # Relative property: <R(p) q, R(p') k> depends on p − p' only.
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)

    def score(pq, pk):
        rq, rk = rotary_2d(torch.tensor([[pq]]), head_dim=d), rotary_2d(torch.tensor([[pk]]), head_dim=d)
        return (apply_rotary(q, rq) * apply_rotary(k, rk)).sum()

    assert torch.allclose(score([3, 5], [1, 2]), score([4, 7], [2, 4]), atol=1e-5)


def test_blocks_have_no_biases_and_llama_shapes():
    model = _model(width=64, num_heads=4)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.endswith(".bias") for n in names)
    block = model.trunk.blocks[0]
    assert block.attn.qkv.weight.shape == (192, 64)
    assert block.ffn.w1.weight.shape == (256, 64)  # find_multiple(int(8·64/3), 256)
    assert model.class_embedding.weight.shape == (4, 64)  # 3 classes + null
