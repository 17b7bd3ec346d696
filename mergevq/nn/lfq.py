"""Lookup-free quantization (LFQ, MAGVIT-v2) with entropy terms in bounded memory.

Each channel of a token is quantized to its sign, so a ``d``-channel token is one of ``2^d`` codes ``{-1, +1}^d`` and
its index is the little-endian bit pattern ``Σ_j 2^j·[z_j > 0]`` (bit ``j`` is channel ``j``). There are no parameters.

The entropy regulariser (SPEC §2.5) scores every token against all ``2^d`` codes with ``p(c|z) = softmax_c(2·z·cᵀ/T)``.
The direct formulation materialises a ``[tokens, 2^d]`` tensor (2.4 GB at d=18 for 2,304 tokens). Here:

- the per-sample entropy factorises exactly over bits: the logits are a sum over channels, so
  ``p(c|z) = Π_j p_j(c_j|z_j)`` with ``p_j(+1) = sigmoid(4·z_j/T)`` and ``H_sample = Σ_j H(bit_j)``;
- the codebook entropy needs the batch-mean distribution ``p̄(c) = mean_n Π_j p_nj(c_j)``. Splitting the bits into a
  low and a high half gives ``p̄[hi, lo] = P_hiᵀ·P_lo / N`` with ``P_lo [N, 2^d_lo]`` and ``P_hi [N, 2^d_hi]``: one
  matmul, and the value is exact. Tokens are processed in chunks with a hand-written backward that rebuilds each
  chunk's factors, so memory is ``O(N·d + chunk·2^(d/2) + 2^d)``: about 25 MB at d=18 whatever the token count.

Einstein legend:
    N   tokens (all leading dimensions flattened)
    c   tokens in one chunk of N
    d   code bits = channels (18 in MergeVQ)
    C   codebook size, 2^d
    Lo  2^d_lo codes of the low half of the bits, d_lo = d // 2
    Hi  2^d_hi codes of the high half, d_hi = d - d_lo
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = [
    "LFQ",
    "LFQOutput",
    "codes_to_indices",
    "dense_entropy_terms",
    "entropy_terms",
    "indices_to_codes",
    "join_indices",
    "split_indices",
]

# Indices are int64, so one sign bit is kept free.
_MAX_BITS = 62


class LFQOutput(NamedTuple):
    codes: Tensor  # [..., d] in {-1, +1} with a straight-through gradient to z
    indices: Tensor  # [...] int64 in [0, 2^d)
    commitment: Tensor  # scalar MSE(z, sign(z).detach())
    entropy: Tensor  # scalar sample_weight·H_sample − codebook_weight·H_codebook (0 when not computed)
    per_sample_entropy: Tensor  # scalar H_sample, nats (0 when not computed)
    codebook_entropy: Tensor  # scalar H_codebook, nats (0 when not computed)


# ---------------------------------------------------------------------------------------------------------------------
# Index <-> code conversion
# ---------------------------------------------------------------------------------------------------------------------


def _check_bits(dim: int) -> None:
    if not 1 <= dim <= _MAX_BITS:
        raise ValueError(f"the number of bits must be in [1, {_MAX_BITS}], got {dim}")


def indices_to_codes(indices: Tensor, *, dim: int) -> Tensor:
    """Integer indices ``[...]`` in ``[0, 2^dim)`` -> float codes ``[..., dim]`` in ``{-1, +1}`` (bit j = channel j).

    The range is checked on CPU tensors only, so decoding on an accelerator never waits for a device sync.
    """
    _check_bits(dim)
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    indices = indices.long()
    if indices.device.type == "cpu" and indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= 2**dim:
            raise ValueError(f"indices must lie in [0, 2^{dim}) = [0, {2**dim}), got values in [{lo}, {hi}]")
    shifts = torch.arange(dim, device=indices.device)
    bits_Nd = (indices.unsqueeze(-1) >> shifts) & 1
    return bits_Nd.float() * 2 - 1


def codes_to_indices(codes: Tensor) -> Tensor:
    """Codes ``[..., d]`` -> int64 indices ``[...]``: ``Σ_j 2^j·[codes_j > 0]`` (any real input is read by its sign)."""
    dim = codes.shape[-1]
    _check_bits(dim)
    weights = torch.ones((), dtype=torch.long, device=codes.device) << torch.arange(dim, device=codes.device)
    return ((codes > 0).long() * weights).sum(-1)


def split_indices(indices: Tensor, *, bits: Sequence[int]) -> tuple[Tensor, ...]:
    """Split indices into sub-indices over consecutive bit fields, lowest bits first.

    ``bits=[6, 12]`` gives the stage-2 asymmetric factorisation of a 2^18 codebook: bits 0-5 (64 classes) and bits
    6-17 (4,096 classes). ``join_indices`` is the inverse.
    """
    _check_bits(sum(bits))
    if any(b < 1 for b in bits):
        raise ValueError(f"every bit field needs at least one bit, got {list(bits)}")
    parts, offset = [], 0
    for b in bits:
        parts.append((indices >> offset) & ((1 << b) - 1))
        offset += b
    return tuple(parts)


def join_indices(parts: Sequence[Tensor], *, bits: Sequence[int]) -> Tensor:
    """Inverse of :func:`split_indices`: ``Σ_i parts[i] << (bits[0] + ... + bits[i-1])``."""
    if len(parts) != len(bits):
        raise ValueError(f"got {len(parts)} index parts for {len(bits)} bit fields {list(bits)}")
    _check_bits(sum(bits))
    out, offset = torch.zeros_like(parts[0], dtype=torch.long), 0
    for part, b in zip(parts, bits):
        out = out | (part.long() << offset)
        offset += b
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Entropy terms
# ---------------------------------------------------------------------------------------------------------------------


def _entropy_of(p: Tensor) -> Tensor:
    """``−Σ p log p`` over all entries; empty cells contribute 0 with a finite gradient (xlogy(p, p) is NaN there)."""
    return -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum()


def _code_log_probs(logp_N2b: Tensor) -> Tensor:
    """Log-probability of every code over b bits, ``[N, 2^b]``, little-endian: ``Σ_j log p_j(bit_j(code))``.

    ``logp_N2b[:, 0, j]`` / ``[:, 1, j]`` are ``log p_j(−1)`` / ``log p_j(+1)``. Built by doubling, one bit at a time,
    rather than as a matmul with the bit patterns: the additions stay accurate for small log-probabilities and are
    immune to reduced-precision matmul modes (TF32).
    """
    n, _, b = logp_N2b.shape
    out_NC = logp_N2b.new_zeros(n, 1)
    for j in range(b):
        # New index = old index + 2^j·bit_j: the "bit j = 0" block of 2^j codes comes first.
        out_NC = (logp_N2b[:, :, j : j + 1] + out_NC.unsqueeze(1)).reshape(n, -1)
    return out_NC


def _code_log_probs_backward(grad_NC: Tensor, b: int) -> Tensor:
    """Adjoint of :func:`_code_log_probs`: ``[N, 2^b]`` -> ``[N, 2, b]`` gradient, undoing one bit at a time."""
    n = grad_NC.shape[0]
    grad_N2b = grad_NC.new_empty(n, 2, b)
    for j in reversed(range(b)):
        grad_N2C = grad_NC.reshape(n, 2, -1)
        grad_N2b[:, :, j] = grad_N2C.sum(2)
        grad_NC = grad_N2C.sum(1)
    return grad_N2b


def _code_probs(logp_N2b: Tensor) -> Tensor:
    """Probability of every code over b bits, ``[N, 2^b]``, with values below tiny^(1/3) flushed to zero.

    Keeps every product formed from two factors and a gradient (matmuls, backward) out of the denormal range, where
    CPU arithmetic is ~100x slower. The mass dropped per token is below 2^(d/2+1)·tiny^(1/3), ~1e-10 at d=18 in
    float32, and its share of the entropy below 1e-8 nats.
    """
    logp_NC = _code_log_probs(logp_N2b)
    cut = math.log(torch.finfo(logp_NC.dtype).tiny) / 3
    return logp_NC.masked_fill_(logp_NC < cut, -math.inf).exp_()


def _bit_log_probs(logits_Nd: Tensor) -> Tensor:
    """``[N, 2, d]``: ``log p_j(−1)`` and ``log p_j(+1)`` from the per-bit logits ``s = 4·z/T``."""
    return torch.stack([F.logsigmoid(-logits_Nd), F.logsigmoid(logits_Nd)], dim=1)


def _auto_chunk(d: int) -> int:
    """Tokens per chunk such that each ``[chunk, 2^d_hi]`` factor has max(2^19, 2^d) elements (≥ 2 MB in fp32)."""
    return max(1, max(2**19, 2**d) >> (d - d // 2))


def _chunk_factors(logits_cd: Tensor) -> tuple[Tensor, Tensor]:
    """``P_lo [c, 2^d_lo]`` and ``P_hi [c, 2^d_hi]``: probabilities of the low-half and high-half bit patterns."""
    d_lo = logits_cd.shape[1] // 2
    logp_c2d = _bit_log_probs(logits_cd)
    return _code_probs(logp_c2d[:, :, :d_lo]), _code_probs(logp_c2d[:, :, d_lo:])


class _CodebookEntropy(torch.autograd.Function):
    """``H(p̄)`` with ``p̄[hi, lo] = mean_n P_hi[n, hi]·P_lo[n, lo]``, token chunk by token chunk.

    Backward needs the ``[N, d]`` logits and ``p̄ [2^d]``; the ``[chunk, 2^(d/2)]`` factors are rebuilt there (kept
    from forward when there is a single chunk), so memory is ``O(chunk·2^(d/2) + 2^d)`` whatever N is.
    """

    @staticmethod
    def forward(ctx, logits_Nd: Tensor, chunk: int) -> Tensor:
        n, d = logits_Nd.shape
        mass_HiLo = logits_Nd.new_zeros(2 ** (d - d // 2), 2 ** (d // 2))
        for start in range(0, n, chunk):
            p_lo_cLo, p_hi_cHi = _chunk_factors(logits_Nd[start : start + chunk])
            mass_HiLo.addmm_(p_hi_cHi.t(), p_lo_cLo)
        p_mean_HiLo = mass_HiLo.div_(n)
        ctx.chunk = chunk
        if n <= chunk:
            ctx.save_for_backward(logits_Nd, p_mean_HiLo, p_lo_cLo, p_hi_cHi)
        else:
            ctx.save_for_backward(logits_Nd, p_mean_HiLo)
        return _entropy_of(p_mean_HiLo)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:
        logits_Nd, p_mean_HiLo, *factors = ctx.saved_tensors
        n, d = logits_Nd.shape
        # dH/dp̄ = −(log p̄ + 1) and p̄ = mass / N.
        tiny = torch.finfo(p_mean_HiLo.dtype).tiny
        grad_mass_HiLo = (p_mean_HiLo.clamp_min(tiny).log() + 1).mul_(-grad_out / n)
        grad_logits_Nd = torch.empty_like(logits_Nd)
        for start in range(0, n, ctx.chunk):
            logits_cd = logits_Nd[start : start + ctx.chunk]
            p_lo_cLo, p_hi_cHi = factors or _chunk_factors(logits_cd)
            # mass = P_hiᵀ·P_lo and P = exp(log P); flushed entries are 0 and get no gradient.
            grad_logp_lo_cLo = (p_hi_cHi @ grad_mass_HiLo).mul_(p_lo_cLo)
            grad_logp_hi_cHi = (p_lo_cLo @ grad_mass_HiLo.t()).mul_(p_hi_cHi)
            grad_lo_c2b = _code_log_probs_backward(grad_logp_lo_cLo, d // 2)
            grad_c2d = torch.cat([grad_lo_c2b, _code_log_probs_backward(grad_logp_hi_cHi, d - d // 2)], dim=2)
            # Through log p_j(±1) = logsigmoid(±s), whose derivatives are ±sigmoid(∓s).
            grad_minus_cd, grad_plus_cd = grad_c2d.unbind(1)
            dplus_cd, dminus_cd = torch.sigmoid(-logits_cd), torch.sigmoid(logits_cd)
            grad_logits_Nd[start : start + ctx.chunk] = grad_plus_cd * dplus_cd - grad_minus_cd * dminus_cd
        return grad_logits_Nd, None


def entropy_terms(z: Tensor, *, temperature: float, groups: int = 1, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-sample and codebook entropy (nats) of ``p(c|z) = softmax_c(2·z·cᵀ / temperature)`` over ``c ∈ {±1}^d``.

    Args:
        z: ``[..., d]`` pre-quantization values; leading dimensions are flattened into N tokens. Computed in z's
            dtype (float32 or float64); lower precisions are upcast to float32.
        temperature: softmax temperature (0.01 in MergeVQ).
        groups: 1 gives the exact codebook entropy. ``g > 1`` splits the d bits into g contiguous groups and returns
            the sum of the groups' marginal codebook entropies, an upper bound of the joint entropy (subadditivity)
            that is cheaper for large d; equal to it when the groups are independent across the batch.
        chunk: tokens per chunk of the codebook term; memory is ``O(N·d + chunk·2^(d/2) + 2^d)``. ``None`` picks
            a chunk whose ``[chunk, 2^(d/2)]`` factors hold about ``max(2^19, 2^d)`` elements (1,024 tokens at d=18).

    Returns:
        ``(H_sample, H_codebook)``: the mean over tokens of the entropy of ``p(·|z_n)`` and the entropy of the
        batch-mean distribution ``mean_n p(·|z_n)``. No ``[N, 2^d]`` tensor is ever formed.

    The codebook term has a hand-written backward (it recomputes the chunks) and supports first-order gradients only.
    """
    d = z.shape[-1]
    _check_bits(d)
    if not 1 <= groups <= d:
        raise ValueError(f"groups must be in [1, d={d}], got {groups}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be a positive token count or None, got {chunk}")
    if z.numel() == 0:
        raise ValueError(f"entropy terms need at least one token, got an empty tensor of shape {tuple(z.shape)}")
    # A bf16 matmul under autocast would put ~1e-3 relative error on the code masses.
    with torch.autocast(device_type=z.device.type, enabled=False):
        if z.dtype not in (torch.float32, torch.float64):
            z = z.float()
        # Two codes differing in bit j differ by 4·z_j in the logit 2·z·c, hence p_j(+1) = sigmoid(4·z_j / T).
        logits_Nd = z.reshape(-1, d) * (4.0 / temperature)
        p_plus_Nd, p_minus_Nd = torch.sigmoid(logits_Nd), torch.sigmoid(-logits_Nd)
        # Two non-negative terms per bit; the shorter softplus(s) − p·s cancels catastrophically for large |s|.
        bit_entropy_Nd = -(p_plus_Nd * F.logsigmoid(logits_Nd) + p_minus_Nd * F.logsigmoid(-logits_Nd))
        per_sample = bit_entropy_Nd.sum(-1).mean()
        groups_Nb = torch.tensor_split(logits_Nd, groups, dim=1)
        codebook = torch.stack(
            [_CodebookEntropy.apply(g_Nb.contiguous(), chunk or _auto_chunk(g_Nb.shape[1])) for g_Nb in groups_Nb]
        ).sum()
    return per_sample, codebook


def dense_entropy_terms(z: Tensor, *, temperature: float) -> tuple[Tensor, Tensor]:
    """Brute-force reference for :func:`entropy_terms`: materialises the ``[N, 2^d]`` logits as the authors' code does.

    For tests and the benchmark baseline only; memory grows as ``N·2^d`` (4.3 GB fp32 for 4,096 tokens at d=18).
    """
    d = z.shape[-1]
    with torch.autocast(device_type=z.device.type, enabled=False):
        if z.dtype not in (torch.float32, torch.float64):
            z = z.float()
        z_Nd = z.reshape(-1, d)
        codes_Cd = indices_to_codes(torch.arange(2**d, device=z.device), dim=d).to(z_Nd.dtype)
        logits_NC = 2 * z_Nd @ codes_Cd.t() / temperature
        logp_NC = torch.log_softmax(logits_NC, dim=-1)
        p_NC = logp_NC.exp()
        per_sample = -(p_NC * logp_NC).sum(-1).mean()
        return per_sample, _entropy_of(p_NC.mean(0))


# ---------------------------------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------------------------------


class LFQ(nn.Module):
    """Lookup-free quantizer: ``q = sign(z)`` per channel, index = little-endian bits, entropy + commitment losses.

    Input is channels-last ``z [..., d]``. Quantization and entropy run in float32 (or float64 if given) with autocast
    disabled: a bf16 matmul in the entropy terms would be inaccurate, and rounding z to bf16 can flip signs of tiny
    values, i.e. change codes. The entropy terms support first-order gradients (no double backward).
    """

    def __init__(
        self,
        *,
        dim: int = 18,  # bits per token; codebook size 2^dim (MAGVIT-v2 LFQ)
        temperature: float = 0.01,  # softmax temperature of the code distribution p(c|z) (fixed in MergeVQ)
        sample_weight: float = 1.0,  # weight of the per-sample entropy (minimised: confident codes)
        codebook_weight: float = 1.0,  # weight of the codebook entropy (maximised: codebook usage)
        codebook_groups: int = 1,  # >1: factorised upper bound of the codebook entropy (see entropy_terms)
        entropy_chunk: int | None = None,  # token chunk for the codebook entropy, bounds memory; None = all at once
    ) -> None:
        super().__init__()
        _check_bits(dim)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 1 <= codebook_groups <= dim:
            raise ValueError(f"codebook_groups must be in [1, dim={dim}], got {codebook_groups}")
        if entropy_chunk is not None and entropy_chunk < 1:
            raise ValueError(f"entropy_chunk must be a positive token count or None, got {entropy_chunk}")
        self.dim = dim
        self.temperature = temperature
        self.sample_weight = sample_weight
        self.codebook_weight = codebook_weight
        self.codebook_groups = codebook_groups
        self.entropy_chunk = entropy_chunk

    @property
    def codebook_size(self) -> int:
        return 2**self.dim

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, temperature={self.temperature}, "
            f"sample_weight={self.sample_weight}, codebook_weight={self.codebook_weight}, "
            f"codebook_groups={self.codebook_groups}, entropy_chunk={self.entropy_chunk}"
        )

    def forward(self, z: Tensor, *, compute_entropy: bool | None = None) -> LFQOutput:
        """Quantize ``z [..., d]``; the entropy terms default to being computed in training mode only."""
        if z.ndim == 0 or z.shape[-1] != self.dim:
            raise ValueError(
                f"LFQ expects channels-last input [..., {self.dim}] (d={self.dim}), got shape {tuple(z.shape)}"
            )
        if not z.is_floating_point():
            raise TypeError(f"LFQ expects a floating-point input, got {z.dtype}")
        if compute_entropy is None:
            compute_entropy = self.training
        with torch.autocast(device_type=z.device.type, enabled=False):
            if z.dtype != torch.float64:
                z = z.float()
            q = torch.where(z > 0, 1.0, -1.0).to(z.dtype)
            # Straight-through estimator. Written as q + (z − z.detach()) rather than z + (q − z).detach(): same
            # gradient, but the value is exactly ±1 (the latter rounds to 0 or 2 for |z| ≳ 1e8 in float32).
            codes = q + (z - z.detach())
            indices = codes_to_indices(q)
            commitment = F.mse_loss(z, q)
            if compute_entropy:
                per_sample, codebook = entropy_terms(
                    z, temperature=self.temperature, groups=self.codebook_groups, chunk=self.entropy_chunk
                )
                entropy = self.sample_weight * per_sample - self.codebook_weight * codebook
            else:
                per_sample = codebook = entropy = z.new_zeros(())
        return LFQOutput(codes, indices, commitment, entropy, per_sample, codebook)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """``[...]`` int indices -> ``[..., d]`` float codes in ``{-1, +1}``."""
        return indices_to_codes(indices, dim=self.dim)

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """``[..., d]`` codes -> ``[...]`` int64 indices."""
        if codes.ndim == 0 or codes.shape[-1] != self.dim:
            raise ValueError(f"expected codes of shape [..., {self.dim}] (d={self.dim}), got {tuple(codes.shape)}")
        return codes_to_indices(codes)
