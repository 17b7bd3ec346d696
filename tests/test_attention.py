"""Attention with proportional (log-size) bias: exactness against hand-written references and duplicated keys."""

from __future__ import annotations

import math

import pytest
import torch

from mergevq.nn.attention import Attention, CrossAttention

# Exactness checks run in float64 so that a 1e-12 tolerance can tell right from nearly right.
_DTYPE = torch.float64


def _reference(q, k, v, *, num_heads, key_size=None):
    """softmax(QKᵀ/√d + log s) V per head, written out with einsum. q [B,Tq,C], k/v [B,Tk,C] (projected)."""
    b, tq, c = q.shape
    tk = k.shape[1]
    d = c // num_heads
    qh = q.reshape(b, tq, num_heads, d)
    kh = k.reshape(b, tk, num_heads, d)
    vh = v.reshape(b, tk, num_heads, d)
    logits = torch.einsum("bqhd,bkhd->bhqk", qh, kh) / math.sqrt(d)
    if key_size is not None:
        logits = logits + key_size.log()[:, None, None, :]
    return torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), vh).reshape(b, tq, c)


def _self_reference(attn: Attention, x, size=None):
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    return attn.proj(_reference(q, k, v, num_heads=attn.num_heads, key_size=size))


def _make(cls, *args, **kwargs):
    torch.manual_seed(0)
    return cls(*args, **kwargs).to(_DTYPE)


def test_unit_sizes_equal_plain_attention_and_reference():
    attn = _make(Attention, 32, num_heads=4)
    x = torch.randn(3, 7, 32, dtype=_DTYPE)
    plain, _ = attn(x)
    ones, _ = attn(x, size=torch.ones(3, 7, dtype=_DTYPE))
    torch.testing.assert_close(ones, plain, rtol=0, atol=1e-12)
    torch.testing.assert_close(plain, _self_reference(attn, x), rtol=0, atol=1e-12)


def test_proportional_attention_matches_reference():
    attn = _make(Attention, 24, num_heads=3)
    x = torch.randn(2, 6, 24, dtype=_DTYPE)
    size = torch.rand(2, 6, dtype=_DTYPE) * 5 + 0.5
    out, _ = attn(x, size=size)
    torch.testing.assert_close(out, _self_reference(attn, x, size), rtol=0, atol=1e-12)
    # The bias matters: sizes that are not all equal change the result.
    assert not torch.allclose(out, attn(x)[0], atol=1e-6)


@pytest.mark.parametrize("num_heads", [1, 4])
def test_token_of_size_n_acts_like_n_identical_copies(num_heads):
    attn = _make(Attention, 16, num_heads=num_heads)
    torch.manual_seed(1)
    for counts in ([1, 3, 2, 1, 4], [2, 1, 1, 5, 1]):
        x = torch.randn(1, len(counts), 16, dtype=_DTYPE)
        repeats = torch.tensor(counts)
        merged, metric = attn(x, size=repeats.to(_DTYPE)[None], return_metric=True)
        expanded, metric_exp = attn(x.repeat_interleave(repeats, dim=1), return_metric=True)
        first_copy = torch.cumsum(repeats, 0) - repeats
        torch.testing.assert_close(merged, expanded[:, first_copy], rtol=0, atol=1e-12)
        torch.testing.assert_close(metric, metric_exp[:, first_copy], rtol=0, atol=1e-12)
        # Every copy of a token gets the same output.
        torch.testing.assert_close(expanded, merged.repeat_interleave(repeats, dim=1), rtol=0, atol=1e-12)


def test_metric_is_keys_averaged_over_heads():
    attn = _make(Attention, 32, num_heads=4)
    x = torch.randn(2, 5, 32, dtype=_DTYPE)
    out, metric = attn(x, return_metric=True)
    assert metric.shape == (2, 5, 8)
    keys = attn.qkv(x)[..., 32:64].reshape(2, 5, 4, 8)
    torch.testing.assert_close(metric, keys.mean(dim=2), rtol=0, atol=1e-12)
    assert attn(x)[1] is None
    assert out.shape == x.shape


def test_attention_rejects_indivisible_width():
    with pytest.raises(ValueError, match="divisible"):
        Attention(10, num_heads=3)
    with pytest.raises(ValueError, match="divisible"):
        CrossAttention(10, num_heads=4)


def test_submodule_names_and_bias_flag():
    attn = Attention(8, num_heads=2, qkv_bias=False)
    assert attn.qkv.bias is None and attn.qkv.out_features == 24
    assert attn.proj.bias is not None and attn.proj.out_features == 8


def test_cross_attention_shapes_and_reference():
    cross = _make(CrossAttention, 24, num_heads=4, kv_dim=10)
    q = torch.randn(2, 9, 24, dtype=_DTYPE)
    kv = torch.randn(2, 5, 10, dtype=_DTYPE)
    out = cross(q, kv)
    assert out.shape == (2, 9, 24)
    k, v = cross.to_kv(kv).chunk(2, dim=-1)
    ref = cross.proj(_reference(cross.to_q(q), k, v, num_heads=4))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    size = torch.rand(2, 5, dtype=_DTYPE) * 3 + 1
    ref_sized = cross.proj(_reference(cross.to_q(q), k, v, num_heads=4, key_size=size))
    torch.testing.assert_close(cross(q, kv, kv_size=size), ref_sized, rtol=0, atol=1e-12)
    torch.testing.assert_close(cross(q, kv, kv_size=torch.ones(2, 5, dtype=_DTYPE)), out, rtol=0, atol=1e-12)


def test_cross_attention_kv_size_equals_duplicated_kv():
    cross = _make(CrossAttention, 16, num_heads=2)
    q = torch.randn(1, 4, 16, dtype=_DTYPE)
    kv = torch.randn(1, 3, 16, dtype=_DTYPE)
    repeats = torch.tensor([3, 1, 2])
    out = cross(q, kv, kv_size=repeats.to(_DTYPE)[None])
    torch.testing.assert_close(out, cross(q, kv.repeat_interleave(repeats, dim=1)), rtol=0, atol=1e-12)


def test_gradients_reach_inputs_through_sized_attention():
    attn = Attention(8, num_heads=2)
    x = torch.randn(2, 4, 8, requires_grad=True)
    out, _ = attn(x, size=torch.tensor([[1.0, 2.0, 3.0, 1.0], [4.0, 1.0, 1.0, 1.0]]))
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
