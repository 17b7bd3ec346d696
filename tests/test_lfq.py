"""Lookup-free quantizer: index <-> code bijection, straight-through, exact entropy terms in bounded memory."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mergevq.nn.lfq import (
    LFQ,
    codes_to_indices,
    dense_entropy_terms,
    entropy_terms,
    indices_to_codes,
    join_indices,
    split_indices,
)

T = 0.01  # MergeVQ's temperature


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _brute_indices(z: torch.Tensor) -> torch.Tensor:
    """Σ_j 2^j·[z_j > 0] with Python integers, one token at a time."""
    flat = z.reshape(-1, z.shape[-1]).tolist()
    out = [sum(1 << j for j, v in enumerate(row) if v > 0) for row in flat]
    return torch.tensor(out, dtype=torch.long).reshape(z.shape[:-1])


class MaxNumel(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op produces (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


# ---------------------------------------------------------------------------------------------------------------------
# Index <-> code
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 2, 5, 10])
def test_all_indices_round_trip_exhaustively(d):
    idx = torch.arange(2**d)
    codes = indices_to_codes(idx, dim=d)
    assert codes.shape == (2**d, d) and codes.dtype == torch.float32
    assert set(codes.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(codes_to_indices(codes), idx)
    assert codes.unique(dim=0).shape[0] == 2**d  # a bijection onto {±1}^d


def test_little_endian_bit_order():
    codes = indices_to_codes(torch.tensor([0, 1, 2, 4, 2**17, 2**18 - 1]), dim=18)
    assert (codes[0] == -1).all() and (codes[-1] == 1).all()
    for row, channel in zip(codes[1:5], [0, 1, 2, 17]):
        assert row[channel] == 1 and (row.sum() == 2 - 18)  # exactly one +1, on channel `channel`


def test_large_d_round_trip_random():
    idx = torch.randint(0, 2**62, (1000,), generator=_gen(), dtype=torch.long)
    assert torch.equal(codes_to_indices(indices_to_codes(idx, dim=62)), idx)
    idx18 = torch.randint(0, 2**18, (4, 7), generator=_gen(1))
    lfq = LFQ(dim=18)
    assert torch.equal(lfq.codes_to_indices(lfq.indices_to_codes(idx18)), idx18)


def test_forward_codes_and_indices_agree_with_brute_force():
    z = torch.randn(2, 3, 5, 18, generator=_gen())
    z[0, 0, 0, :3] = 0.0  # zero quantizes to -1, bit 0 (q = +1 only if z > 0)
    out = LFQ(dim=18).eval()(z)
    assert out.codes.shape == z.shape and out.indices.shape == z.shape[:-1] and out.indices.dtype == torch.long
    assert torch.equal(out.codes, torch.where(z > 0, 1.0, -1.0))
    assert torch.equal(out.indices, _brute_indices(z))
    assert torch.equal(out.codes, indices_to_codes(out.indices, dim=18))
    assert (out.indices >= 0).all() and (out.indices < 2**18).all()


def test_codes_exactly_pm1_for_huge_inputs():
    # z + (q - z).detach() would round to 0 or 2 here.
    z = torch.randn(10_000, 6, generator=_gen()) * 1e9
    out = LFQ(dim=6).eval()(z)
    assert torch.equal(out.codes, indices_to_codes(out.indices, dim=6))


def test_straight_through_gradient_is_identity():
    z = torch.randn(4, 9, 10, generator=_gen()).requires_grad_()
    g = torch.randn(4, 9, 10, generator=_gen(1))
    LFQ(dim=10).eval()(z).codes.backward(g)
    assert torch.equal(z.grad, g)


def test_commitment_value_and_gradient():
    z = torch.randn(8, 12, generator=_gen()).requires_grad_()
    out = LFQ(dim=12).eval()(z)
    q = torch.where(z.detach() > 0, 1.0, -1.0)
    expected = ((z.detach() - q) ** 2).mean()
    torch.testing.assert_close(out.commitment, expected, rtol=1e-6, atol=0)
    out.commitment.backward()
    torch.testing.assert_close(z.grad, 2 * (z.detach() - q) / z.numel())  # the code side is detached


# ---------------------------------------------------------------------------------------------------------------------
# Entropy: exactness against the dense [N, 2^d] formulation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 4, 5, 6, 8, 10, 12])
@pytest.mark.parametrize("scale", [0.003, 0.03, 0.3, 3.0])
def test_entropy_equals_dense_fp32(d, scale):
    z = torch.randn(96, d, generator=_gen(d)) * scale
    ours = entropy_terms(z, temperature=T)
    dense = dense_entropy_terms(z, temperature=T)
    for a, b in zip(ours, dense):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("d", [2, 4, 7, 10])
@pytest.mark.parametrize("temperature", [T, 0.3])
def test_entropy_values_and_gradients_equal_dense_fp64(d, temperature):
    # A bimodal mix of tiny and large values covers both soft and saturated bits.
    scale = torch.where(torch.rand(150, d, generator=_gen(1)) < 0.5, 0.005, 0.5).double()
    z = (torch.randn(150, d, generator=_gen(d), dtype=torch.float64) * scale).requires_grad_()
    w = torch.tensor([1.0, -0.7], dtype=torch.float64)  # a generic combination, so both terms' gradients count
    results = []
    for fn in (entropy_terms, dense_entropy_terms):
        terms = torch.stack(fn(z, temperature=temperature))
        results.append((terms, torch.autograd.grad(terms @ w, z)[0]))
    (ours, grad_ours), (dense, grad_dense) = results
    torch.testing.assert_close(ours, dense, atol=1e-10, rtol=0)
    torch.testing.assert_close(grad_ours, grad_dense, atol=1e-9, rtol=1e-9)


def test_fp32_gradient_close_to_fp64_truth():
    z64 = torch.randn(200, 8, generator=_gen(3), dtype=torch.float64) * 0.05
    g = []
    for z in (z64.clone(), z64.float()):
        z.requires_grad_()
        hs, hc = entropy_terms(z, temperature=T)
        g.append(torch.autograd.grad(hs - hc, z)[0].double())
    torch.testing.assert_close(g[1], g[0], atol=1e-5, rtol=0)


def test_gradcheck_small():
    # Independent of the dense reference: finite differences (fast mode: random projections of the Jacobian).
    z = (torch.randn(6, 5, generator=_gen(), dtype=torch.float64) * 0.02).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: entropy_terms(x, temperature=T), (z,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x: entropy_terms(x, temperature=T, chunk=4), (z,), fast_mode=True)


def test_chunked_equals_unchunked():
    z = (torch.randn(3, 37, 9, generator=_gen(), dtype=torch.float64) * 0.02).requires_grad_()
    ref = entropy_terms(z, temperature=T)
    g_ref = torch.autograd.grad(ref[0] - ref[1], z)[0]
    for chunk in (5, 64, 111, 1000):  # several chunks, a ragged last one, a single chunk
        out = entropy_terms(z, temperature=T, chunk=chunk)
        g = torch.autograd.grad(out[0] - out[1], z)[0]
        torch.testing.assert_close(torch.stack(out), torch.stack(ref), atol=1e-12, rtol=0)
        torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------------------------------------------------------------
# Entropy: invariants
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e-4, 0.01, 0.1, 10.0])
@pytest.mark.parametrize("temperature", [T, 1.0])
def test_entropy_bounds(scale, temperature):
    d = 10
    z = torch.randn(500, d, generator=_gen()) * scale
    hs, hc = entropy_terms(z, temperature=temperature)
    # Concavity of entropy: the entropy of the mean distribution is at least the mean entropy.
    assert 0 <= hs <= hc + 1e-5 and hc <= d * math.log(2) + 1e-5


def test_uniform_codes_reach_high_codebook_entropy():
    d = 8
    z = torch.randn(8192, d, generator=_gen())  # sign bits are i.i.d. fair coins
    hs, hc = entropy_terms(z, temperature=T)
    assert hc > 0.99 * d * math.log(2)
    assert hs < 0.1  # |z| ~ 1 at T = 0.01: near one-hot per token


def test_collapsed_codes_have_low_codebook_entropy():
    z = torch.randn(1, 8, generator=_gen()).expand(500, 8)
    hs, hc = entropy_terms(z, temperature=T)
    torch.testing.assert_close(hc, hs, atol=1e-5, rtol=0)  # all tokens share one distribution
    assert hc < 0.5


def test_high_temperature_approaches_uniform():
    d = 6
    hs, hc = entropy_terms(torch.randn(100, d, generator=_gen()), temperature=1e4)
    torch.testing.assert_close(hs, torch.tensor(d * math.log(2)), atol=1e-4, rtol=0)
    torch.testing.assert_close(hc, torch.tensor(d * math.log(2)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("groups", [2, 3, 8])
def test_factorised_codebook_entropy_is_an_upper_bound(groups):
    z = torch.randn(400, 8, generator=_gen()) * 0.05
    z[:, 4:] = z[:, :4]  # correlated halves: the joint entropy is well below the sum of marginals
    hs, exact = entropy_terms(z, temperature=T)
    hs_g, bound = entropy_terms(z, temperature=T, groups=groups)
    torch.testing.assert_close(hs_g, hs)  # the per-sample term is always exact
    assert bound > exact + 0.5


def test_factorised_codebook_entropy_exact_for_independent_groups():
    # Tokens = every pairing of a low-half set with a high-half set, so p̄ = p̄_lo ⊗ p̄_hi exactly.
    lo = torch.randn(13, 4, generator=_gen(0), dtype=torch.float64) * 0.02
    hi = torch.randn(11, 4, generator=_gen(1), dtype=torch.float64) * 0.02
    z = torch.cat([lo[:, None].expand(13, 11, 4), hi[None].expand(13, 11, 4)], dim=-1)
    _, exact = entropy_terms(z, temperature=T)
    _, factorised = entropy_terms(z, temperature=T, groups=2)
    torch.testing.assert_close(factorised, exact, atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Memory: no [N, 2^d] tensor
# ---------------------------------------------------------------------------------------------------------------------


def test_max_tensor_detector_sees_the_dense_formulation():
    n, d = 64, 10
    z = torch.randn(n, d, generator=_gen()).requires_grad_()
    with MaxNumel() as probe:
        hs, hc = dense_entropy_terms(z, temperature=T)
        (hs - hc).backward()
    assert probe.max_numel >= n * 2**d


@pytest.mark.parametrize("chunk", [None, 512])
def test_d18_never_allocates_tokens_times_codebook(chunk):
    n, d = 2048, 18
    z = (torch.randn(n, d, generator=_gen()) * 0.1).requires_grad_()
    with MaxNumel() as probe:
        out = LFQ(dim=d, entropy_chunk=chunk).train()(z)
        out.entropy.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    # Largest tensors: p̄ [2^d], or one chunk's factor [chunk, 2^(d/2)] (2^19 elements for the automatic chunk).
    assert probe.max_numel <= (2**19 if chunk is None else 2**d)
    assert probe.max_numel * 500 < n * 2**d


def test_saved_for_backward_grows_with_tokens_not_codebook():
    d = 18

    def saved_elements(n: int) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel()
            return t

        z = (torch.randn(n, d, generator=_gen()) * 0.1).requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            LFQ(dim=d).train()(z)
        return total

    # Both sizes span several automatic chunks (1,024 tokens at d=18), so no factor is kept for backward.
    small, large = saved_elements(1536), saved_elements(3072)
    per_token = (large - small) / 1536
    assert per_token <= 16 * d  # O(d) per token; the [N, 2^(d/2)] factors would be 2·2^9 = 1,024 per token
    assert small - per_token * 1536 <= 2 * 2**d  # plus O(2^d): the mean distribution p̄


# ---------------------------------------------------------------------------------------------------------------------
# Module behaviour
# ---------------------------------------------------------------------------------------------------------------------


def test_module_has_no_parameters_and_reports_codebook_size():
    lfq = LFQ()
    assert lfq.codebook_size == 2**18 and lfq.dim == 18
    assert list(lfq.parameters()) == [] and lfq.state_dict() == {}


def test_entropy_loss_composition_and_training_default():
    z = torch.randn(2, 30, 6, generator=_gen()) * 0.05
    lfq = LFQ(dim=6, sample_weight=0.7, codebook_weight=1.3)
    out = lfq.train()(z)
    hs, hc = entropy_terms(z, temperature=T)
    torch.testing.assert_close(out.per_sample_entropy, hs)
    torch.testing.assert_close(out.codebook_entropy, hc)
    torch.testing.assert_close(out.entropy, 0.7 * hs - 1.3 * hc)
    evaluated = lfq.eval()(z)
    assert evaluated.entropy == 0 and evaluated.per_sample_entropy == 0 and evaluated.codebook_entropy == 0
    torch.testing.assert_close(lfq.eval()(z, compute_entropy=True).entropy, out.entropy)
    assert lfq.train()(z, compute_entropy=False).entropy == 0


def test_groups_and_chunk_are_forwarded():
    z = torch.randn(50, 8, generator=_gen()) * 0.05
    z[:, 4:] = z[:, :4]
    exact = LFQ(dim=8).train()(z).codebook_entropy
    torch.testing.assert_close(LFQ(dim=8, entropy_chunk=7).train()(z).codebook_entropy, exact, atol=1e-5, rtol=0)
    assert LFQ(dim=8, codebook_groups=2).train()(z).codebook_entropy > exact + 0.5


def test_autocast_does_not_change_results():
    z = torch.randn(4, 64, 10, generator=_gen()) * 0.02
    lfq = LFQ(dim=10).train()
    ref = lfq(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lfq(z)
        hs, hc = entropy_terms(z, temperature=T)
    for a, b in zip(out, ref):
        assert a.dtype == b.dtype
        assert torch.equal(a, b) if a.dtype == torch.long else torch.allclose(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.stack([hs, hc]), torch.stack([ref.per_sample_entropy, ref.codebook_entropy]))


def test_bf16_input_is_quantized_in_fp32():
    z32 = torch.randn(256, 8, generator=_gen()) * 0.3
    z32[0, :4] = torch.tensor([1e-41, -1e-41, 3e-39, -3e-39])  # bf16 rounds the first two to ±0
    z16 = z32.bfloat16()
    lfq = LFQ(dim=8).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out32 = lfq(z32)
        out16 = lfq(z16)
    for out in (out32, out16):
        assert out.codes.dtype == out.commitment.dtype == out.entropy.dtype == torch.float32
    assert torch.equal(out32.indices, _brute_indices(z32))  # fp32 input keeps the sign of 1e-41
    assert out32.indices[0] & 1 == 1
    assert torch.equal(out16.indices, _brute_indices(z16.float()))
    assert out16.indices[0] & 1 == 0  # what the bf16 input says: +0 is not > 0
    hs, hc = entropy_terms(z16.float(), temperature=T)
    torch.testing.assert_close(out16.codebook_entropy, hc)


def test_float64_input_stays_float64():
    z = torch.randn(10, 4, dtype=torch.float64, generator=_gen())
    out = LFQ(dim=4).train()(z)
    assert out.codes.dtype == out.entropy.dtype == torch.float64


# ---------------------------------------------------------------------------------------------------------------------
# Stage-2 factorisation helpers
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [[6, 12], [3, 5, 10], [18]])
def test_split_join_round_trip(bits):
    idx = torch.randint(0, 2**18, (5, 300), generator=_gen())
    parts = split_indices(idx, bits=bits)
    assert len(parts) == len(bits)
    offset = 0
    for part, b in zip(parts, bits):
        assert (part >= 0).all() and (part < 2**b).all()
        # Each part is the code of its channel slice.
        assert torch.equal(indices_to_codes(part, dim=b), indices_to_codes(idx, dim=18)[..., offset : offset + b])
        offset += b
    assert torch.equal(join_indices(parts, bits=bits), idx)


def test_asymmetric_split_values():
    idx = torch.tensor([0, 63, 64, 2**18 - 1, 5 + 64 * 77])
    lo, hi = split_indices(idx, bits=[6, 12])
    assert lo.tolist() == [0, 63, 0, 63, 5] and hi.tolist() == [0, 0, 1, 4095, 77]


# ---------------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------------


def test_wrong_last_dimension_names_expected_d_and_shape():
    with pytest.raises(ValueError, match=r"18.*\(2, 16, 8\)"):
        LFQ(dim=18)(torch.randn(2, 16, 8))
    with pytest.raises(ValueError, match=r"\[\.\.\., 18\]"):
        LFQ(dim=18).codes_to_indices(torch.randn(3, 17))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="indices must lie"):
        indices_to_codes(torch.tensor([16]), dim=4)
    with pytest.raises(ValueError, match="indices must lie"):
        indices_to_codes(torch.tensor([-1]), dim=4)
    with pytest.raises(TypeError):
        indices_to_codes(torch.tensor([1.0]), dim=4)
    with pytest.raises(TypeError):
        LFQ(dim=4)(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="groups"):
        LFQ(dim=4, codebook_groups=5)
    with pytest.raises(ValueError, match="temperature"):
        LFQ(dim=4, temperature=0.0)
    with pytest.raises(ValueError, match="chunk"):
        entropy_terms(torch.randn(3, 4), temperature=T, chunk=0)
    with pytest.raises(ValueError, match="bit fields"):
        join_indices([torch.tensor([1])], bits=[6, 12])
