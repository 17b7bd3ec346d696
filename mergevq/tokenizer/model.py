"""MergeVQ: encode (merge L → K tokens, LFQ) and decode (recover K → L, transformer + CNN decoder).

Public API::

    tok = MergeVQ.from_preset("tiny-32")          # or MergeVQ(config) / MergeVQ.from_pretrained(dir)
    enc = tok.encode(x, num_tokens=16)            # Encoded(indices [B,K], assignment [B,L], sizes [B,K], ...)
    x_hat = tok.decode(enc)                       # or tok.decode(indices, assignment)
    out = tok(x, num_tokens=16)                   # TokenizerOutput(reconstruction, losses, encoded)

Shapes: B batch, H×W image, h×w token grid, L = h·w positions, K merged tokens, d LFQ bits, D encoder width.
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from mergevq.nn.blocks import tokens_to_map
from mergevq.nn.lfq import LFQ
from mergevq.nn.tome import group_sizes, source_matrix
from mergevq.persistence import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    read_weights,
    safetensors_metadata,
    save_weights,
    weights_mismatch,
)
from mergevq.tokenizer.config import TokenizerConfig, get_preset
from mergevq.tokenizer.decoder import Decoder
from mergevq.tokenizer.encoder import Encoder, build_align_head
from mergevq.tokenizer.initialization import trunc_normal_init
from mergevq.tokenizer.recovery import SourceRecovery, recover

_RANGE_SLACK = 1e-3  # float resampling may overshoot [-1, 1] by rounding; 0-255 pixels are far outside


class Encoded(NamedTuple):
    """Result of :meth:`MergeVQ.encode`. Merged tokens are in raster order of their first source position."""

    indices: Tensor  # [B, K] int64 in [0, 2^d)
    assignment: Tensor  # [B, L] int64 in [0, K): group of every grid position
    sizes: Tensor  # [B, K] positions held by each merged token
    codes: Tensor  # [B, K, d] ±1 (straight-through gradient to the encoder)
    cls: Tensor  # [B, D] CLS token after the last encoder block
    grid: tuple[int, int]  # (h, w), L = h·w

    @property
    def num_tokens(self) -> int:
        return self.indices.shape[1]

    def source_matrix(self) -> Tensor:
        """Dense S ∈ {0,1}^{B×K×L} (computed on demand)."""
        return source_matrix(self.assignment, num_groups=self.num_tokens)


class TokenizerOutput(NamedTuple):
    reconstruction: Tensor  # [B, 3, H, W]
    losses: dict[str, Tensor]  # unweighted scalars: commitment, entropy, per_sample_entropy, codebook_entropy, ...
    encoded: Encoded


class MergeVQ(nn.Module):
    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.align_head = build_align_head(config.align_head, dim=config.width, out_dim=config.align_dim)
        self.quantizer = LFQ(dim=config.codebook_bits, temperature=config.entropy_temperature)
        self.recovery = (
            SourceRecovery(
                num_positions=config.num_tokens_full,
                code_dim=config.codebook_bits,
                width=config.recovery_width,
                depth=config.recovery_depth,
                num_heads=config.recovery_heads,
                mlp_ratio=config.recovery_mlp_ratio,
            )
            if config.learned_recovery
            else None
        )
        self.decoder = Decoder(config)
        if config.weight_init == "trunc_normal":
            # The authors' transformer init (TransformerBlock / SourceRecovery init_weights); CNN parts keep PyTorch's.
            transformers = [self.encoder.blocks, self.decoder.blocks, self.decoder.pos_conv]
            trunc_normal_init(modules=transformers + ([self.recovery] if self.recovery is not None else []))

    # ------------------------------------------------------------------ construction and persistence
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MergeVQ:
        """A freshly initialised model of the named preset (see :mod:`mergevq.tokenizer.config`)."""
        return cls(get_preset(name, **overrides))

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory / CONFIG_NAME)
        save_weights(module=self, path=directory / WEIGHTS_NAME, metadata={"format": "pt", "preset": self.config.name})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, map_location: str | torch.device = "cpu") -> MergeVQ:
        """Load a model written by :meth:`save_pretrained` (never unpickles anything)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"no model directory at {directory}")
        config = TokenizerConfig.load(directory / CONFIG_NAME)
        model = cls(config)
        model.load_weights(directory / WEIGHTS_NAME)
        return model.to(map_location)

    def load_weights(self, path: str | Path, *, strict: bool = True) -> None:
        """Load safetensors weights, with an error that names the file and the mismatch (or the NaN/inf values)."""
        path = Path(path)
        state = read_weights(path=path)
        details = weights_mismatch(own=self.state_dict(), state=state) if strict else []
        if details:
            saved = safetensors_metadata(path).get("preset")
            raise ValueError(
                f"{path} does not fit preset {self.config.name!r}"
                + (f" (the file was saved from preset {saved!r})" if saved else "")
                + ": "
                + "; ".join(details)
            )
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise ValueError(
                f"{path}: {len(bad)} tensor(s) hold NaN/inf values, e.g. {bad[0]} (weights of a diverged run?)"
            )
        self.load_state_dict(state, strict=strict)

    # ------------------------------------------------------------------ encode / decode
    @property
    def num_tokens_full(self) -> int:
        return self.config.num_tokens_full

    @property
    def last_layer(self) -> Tensor:
        """The decoder's final conv weight (for the adaptive GAN weight)."""
        return self.decoder.conv_out.weight

    def _check_images(self, x: Tensor) -> None:
        f = self.config.downsample
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [B,3,H,W], got shape {tuple(x.shape)}")
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the downsampling factor {f}")

    def _check_inputs(self, x: Tensor) -> None:
        """What :meth:`encode` accepts from callers: float images in [-1, 1], finite, at least one (one sync)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a tensor of images [B,3,H,W], got {type(x).__name__}")
        if not x.is_floating_point():
            hint = " (8-bit pixels: pass x.float() / 127.5 - 1)" if x.dtype == torch.uint8 else ""
            raise TypeError(f"expected floating-point images in [-1, 1], got dtype {x.dtype}{hint}")
        weight_dtype = self.decoder.conv_out.weight.dtype
        if x.dtype == torch.float64 and weight_dtype != torch.float64:
            raise TypeError(f"images are float64 but the model is {weight_dtype}: pass x.to({weight_dtype})")
        self._check_images(x)
        if x.shape[0] == 0:
            raise ValueError("empty batch: encode needs at least one image")
        lo, hi, finite = torch.stack([x.min().float(), x.max().float(), torch.isfinite(x).all().float()]).tolist()
        if not finite:
            raise ValueError("images contain NaN or inf values")
        if lo < -1.0 - _RANGE_SLACK or hi > 1.0 + _RANGE_SLACK:
            hint = " (0-255 pixels: pass x / 127.5 - 1)" if hi > 2.0 else ""
            raise ValueError(f"images must lie in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]{hint}")

    def _resolve_num_tokens(self, num_tokens: Any) -> int:
        if num_tokens is None:
            return self.config.default_num_tokens
        if isinstance(num_tokens, bool):  # True is an int to Python, never a token count
            raise TypeError(f"num_tokens must be an integer, got {num_tokens!r}")
        try:
            k = operator.index(num_tokens)  # ints and integer scalars; 2.5 or "16" are refused, not truncated
        except TypeError:
            raise TypeError(f"num_tokens must be an integer, got {num_tokens!r}") from None
        return k  # the encoder checks the range, on the grid actually encoded

    def _quantize(self, x: Tensor, num_tokens: int | None, *, compute_entropy: bool):
        self._check_images(x)
        k = self._resolve_num_tokens(num_tokens)
        if (x.shape[-2], x.shape[-1]) != (self.config.image_size,) * 2:
            # Keep the merge *ratio* on other resolutions (the authors' absolute counts leave e.g. 6 of 196 tokens).
            full = (x.shape[-2] // self.config.downsample) * (x.shape[-1] // self.config.downsample)
            k = max(1, min(full, round(k * full / self.num_tokens_full)))
        out = self.encoder(x, num_tokens=k)
        q = self.quantizer(out.latents, compute_entropy=compute_entropy)
        encoded = Encoded(q.indices, out.assignment, out.sizes, q.codes, out.cls, out.grid)
        return encoded, q

    def encode(self, x: Tensor, *, num_tokens: int | None = None) -> Encoded:
        """Images [B,3,H,W] in [-1,1] → K merged tokens and the assignment of the L positions to them.

        Refuses (TypeError/ValueError) integer or float64 images, empty batches, NaN/inf values and values outside
        [-1, 1] (such as 0-255 pixels), and a ``num_tokens`` that is not an integer in [1, L].
        """
        self._check_inputs(x)
        return self._quantize(x, num_tokens, compute_entropy=False)[0]

    def predict_assignment(self, indices: Tensor) -> Tensor:
        """Learned Source Recovery: [B,K] token indices → predicted assignment [B,L]."""
        if self.recovery is None:
            raise RuntimeError(
                f"preset {self.config.name!r} has no learned Source Recovery (learned_recovery=False); "
                "pass the assignment to decode()"
            )
        return self.recovery(self.quantizer.indices_to_codes(indices)).assignment

    def decode(self, encoded: Encoded | Tensor, assignment: Tensor | None = None) -> Tensor:
        """Decode an :class:`Encoded`, or ``indices [B,K]`` with ``assignment [B,L]`` (predicted when omitted)."""
        if isinstance(encoded, Encoded):
            codes, assignment, grid = encoded.codes, encoded.assignment, encoded.grid
        else:
            indices = encoded
            if indices.dim() != 2:
                raise ValueError(f"expected indices [B,K], got shape {tuple(indices.shape)}")
            if assignment is None:
                assignment = self.predict_assignment(indices)
            if assignment.shape != (indices.shape[0], self.num_tokens_full):
                raise ValueError(
                    f"assignment shape {tuple(assignment.shape)} does not match "
                    f"[B={indices.shape[0]}, L={self.num_tokens_full}] for preset {self.config.name!r}"
                )
            if int(assignment.max()) >= indices.shape[1] or int(assignment.min()) < 0:
                raise ValueError(f"assignment values must lie in [0, K={indices.shape[1]})")
            codes = self.quantizer.indices_to_codes(indices).to(self.decoder.conv_in.weight.dtype)
            grid = (self.config.grid_size, self.config.grid_size)
        z = tokens_to_map(recover(codes, assignment), grid)
        return self.decoder(z)

    def forward(self, x: Tensor, *, num_tokens: int | None = None) -> TokenizerOutput:
        """Reconstruct ``x`` through K merged tokens; ``losses`` holds the quantiser (and recovery) terms."""
        encoded, q = self._quantize(x, num_tokens, compute_entropy=self.training)
        losses = {
            "commitment": q.commitment,
            "entropy": q.entropy,
            "per_sample_entropy": q.per_sample_entropy,
            "codebook_entropy": q.codebook_entropy,
        }
        if self.recovery is not None and encoded.grid == (self.config.grid_size,) * 2:
            rec = self.recovery(encoded.codes)
            losses["source_recovery"] = self.recovery.loss(rec.logits, encoded.assignment)
            losses["source_recovery_accuracy"] = (rec.assignment == encoded.assignment).float().mean().detach()
        reconstruction = self.decode(encoded)
        return TokenizerOutput(reconstruction, losses, encoded)

    def align_features(self, x: Tensor, *, num_tokens: int | None = None) -> Tensor:
        """Second encoder pass on an alignment view: CLS → alignment head → [B, align_dim] (SPEC §2.6)."""
        if self.align_head is None:
            raise RuntimeError(f"preset {self.config.name!r} has no alignment head (align_head='none')")
        encoded, _ = self._quantize(x, num_tokens, compute_entropy=False)
        return self.align_head(encoded.cls)

    def group_sizes(self, encoded: Encoded) -> Tensor:
        return group_sizes(encoded.assignment, num_groups=encoded.num_tokens)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part, as reported in SPEC §2.1 (encoder without the alignment head)."""

        def count(m: nn.Module | None) -> int:
            return sum(p.numel() for p in m.parameters()) if m is not None else 0

        return {
            "encoder": count(self.encoder),
            "align_head": count(self.align_head),
            "recovery": count(self.recovery),
            "decoder": count(self.decoder),
            "total": count(self),
        }
