"""The stage-2 generator: one model class for every kind (vanilla raster AR, MergeAR, RandAR, MaskGIT).

Public API::

    gen = Generator.from_preset("tiny", kind="mergear", codebook_bits=18, grid=(8, 8), num_classes=10,
                                merge_levels=(16, 32, 64))       # or Generator(config) / Generator.from_pretrained(dir)
    out = gen(indices=idx_BK, assignment=asg_BL, labels=y_B, num_tokens=16)    # GeneratorOutput(loss, losses, logits)
    sample = gen.generate(labels=y_B, num_tokens=16, cfg_scale=2.0, top_k=0)   # GenerationOutput(indices, ...)
    images = tokenizer.decode(sample.indices, sample.assignment)   # RandAR: assignment None → Source Recovery

The model holds the shared weights (class and code embeddings, trunk, heads, and the kind's special tokens: merge
instructions for MergeAR/RandAR, RandAR's position query, MaskGIT's [MASK]); each kind's *scheme*
(:mod:`~mergevq.generator.ar`, :mod:`~mergevq.generator.mergear`, :mod:`~mergevq.generator.randar`,
:mod:`~mergevq.generator.maskgit`) owns its training loss and its generation loop.

Shapes: B batch, L = h·w raster positions, K merged tokens, C width, G bit groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from mergevq.generator.ar import RasterAR, RasterDecoder, raster_positions
from mergevq.generator.config import MERGE_LEVEL_KINDS, GeneratorConfig
from mergevq.generator.gpt import Transformer, init_weights
from mergevq.generator.heads import FactorizedCodes
from mergevq.generator.maskgit import MaskGIT
from mergevq.generator.mergear import MergeAR
from mergevq.generator.outputs import GenerationOutput, GenerationStats, GeneratorOutput
from mergevq.generator.randar import RandAR
from mergevq.generator.sampling import Sampler
from mergevq.persistence import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    read_weights,
    safetensors_metadata,
    save_weights,
    weights_mismatch,
)

__all__ = ["GenerationOutput", "GenerationStats", "Generator", "GeneratorOutput", "Scheme"]


class Scheme(Protocol):
    """What a generator kind implements (see :class:`~mergevq.generator.ar.RasterAR` for the reference)."""

    def check_num_tokens(self, num_tokens: int | None) -> int: ...

    def loss(
        self,
        model: Generator,
        *,
        indices: Tensor,
        assignment: Tensor,
        labels: Tensor,
        num_tokens: int,
        return_logits: bool = False,
    ) -> GeneratorOutput: ...

    def generate(
        self,
        model: Generator,
        *,
        labels: Tensor,
        num_tokens: int | None,
        sampler: Sampler,
        steps: int | None = None,
        tome_ratio: float = 0.0,
        use_cache: bool = True,
        progress: bool = False,
    ) -> GenerationOutput: ...


_SCHEMES: dict[str, type[Any]] = {"ar": RasterAR, "mergear": MergeAR, "randar": RandAR, "maskgit": MaskGIT}


class Generator(nn.Module):
    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        self.scheme: Scheme = _SCHEMES[config.kind](config)
        self.class_embedding = nn.Embedding(config.num_classes + 1, config.width)  # last row: the null class
        # One embedding per merge level K: the merge instruction M_K (MergeAR, RandAR).
        self.merge_embedding = (
            nn.Embedding(len(config.merge_levels), config.width) if config.kind in MERGE_LEVEL_KINDS else None
        )
        self.codes = FactorizedCodes(config)
        self.trunk = Transformer(config)
        self.register_buffer("grid_positions", raster_positions(config.grid), persistent=False)
        init_weights(self, std=config.init_std)
        self.codes.zero_heads()
        # RandAR's position instruction: ONE shared vector, rotated by the RoPE of each target position (SPEC §6.3).
        self.position_query = (
            nn.Parameter(torch.randn(config.width) * config.init_std) if config.kind == "randar" else None
        )
        # MaskGIT's [MASK] input embedding.
        self.mask_embedding = (
            nn.Parameter(torch.randn(config.width) * config.init_std) if config.kind == "maskgit" else None
        )

    # ------------------------------------------------------------------ construction and persistence
    @classmethod
    def from_preset(cls, name: str, **task: Any) -> Generator:
        """A freshly initialised model of preset ``name`` with the task settings as keywords."""
        return cls(GeneratorConfig.from_preset(name, **task))

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory / CONFIG_NAME)
        metadata = {"format": "pt", "kind": self.config.kind, "preset": self.config.name}
        save_weights(module=self, path=directory / WEIGHTS_NAME, metadata=metadata)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, map_location: str | torch.device = "cpu") -> Generator:
        """Load a model written by :meth:`save_pretrained` (never unpickles anything)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"no generator directory at {directory}")
        model = cls(GeneratorConfig.load(directory / CONFIG_NAME))
        model.load_weights(directory / WEIGHTS_NAME)
        return model.to(map_location)

    def load_weights(self, path: str | Path) -> None:
        """Load safetensors weights; a bad or mismatched file raises an error naming it."""
        path = Path(path)
        state = read_weights(path=path)
        details = weights_mismatch(own=self.state_dict(), state=state)
        if details:
            meta = safetensors_metadata(path)
            saved = f" (the file was saved from a {meta.get('kind')!r} generator)" if meta.get("kind") else ""
            raise ValueError(f"{path} does not fit generator {self.config.name!r}{saved}: " + "; ".join(details))
        self.load_state_dict(state)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part; ``total`` counts everything."""

        def count(m: nn.Module | nn.Parameter | None) -> int:
            if isinstance(m, nn.Parameter):
                return m.numel()
            return sum(p.numel() for p in m.parameters()) if m is not None else 0

        return {
            "trunk": count(self.trunk),
            "code_embeddings": count(self.codes.embeddings),
            "intra_blocks": count(self.codes.intra),
            "heads": count(self.codes.heads) + count(self.codes.norm),
            "class_embedding": count(self.class_embedding),
            "merge_embedding": count(self.merge_embedding),
            "position_query": count(self.position_query),
            "mask_embedding": count(self.mask_embedding),
            "total": count(self),
        }

    # ------------------------------------------------------------------ training
    def drop_labels(self, labels_B: Tensor) -> Tensor:
        """Replace labels by the null class with probability ``class_dropout``, in training mode only."""
        if not self.training or self.config.class_dropout == 0:
            return labels_B
        drop_B = torch.rand(labels_B.shape, device=labels_B.device) < self.config.class_dropout
        return torch.where(drop_B, torch.full_like(labels_B, self.config.null_class), labels_B)

    def _check_labels(self, labels_B: Tensor, batch: int) -> None:
        if labels_B.shape != (batch,):
            raise ValueError(f"expected labels [B={batch}], got shape {tuple(labels_B.shape)}")
        # Values are checked on CPU only, so an accelerator step never waits for a device sync.
        if (
            labels_B.device.type == "cpu"
            and labels_B.numel()
            and not 0 <= labels_B.min() <= labels_B.max() <= self.config.null_class
        ):
            raise ValueError(f"labels must lie in [0, {self.config.num_classes}] (the last is the null class)")

    def forward(
        self, *, indices: Tensor, assignment: Tensor, labels: Tensor, num_tokens: int, return_logits: bool = False
    ) -> GeneratorOutput:
        """Training loss of one batch of the token file.

        ``indices [B, K]`` codes of the merged tokens (raster order of their first position), ``assignment [B, L]``
        group of every position, ``labels [B]`` classes (dropped to the null class with probability
        ``class_dropout`` in training), ``num_tokens`` = K (vanilla AR and MaskGIT: must be L; MergeAR and RandAR: one
        of ``merge_levels``). What is supervised depends on the kind:

        - ar, mergear: every raster position of ``target [B, L] = indices.gather(1, assignment)``;
        - randar: the K merged tokens in a fresh random order per sample (``assignment`` is not used);
        - maskgit: the randomly masked positions of the target grid.

        RandAR's orders and MaskGIT's masks come from torch's global RNG (reseed it for a reproducible step).
        ``losses`` holds ``ce_g{g}`` per bit group and ``accuracy``.
        """
        config = self.config
        k = self.scheme.check_num_tokens(num_tokens)
        batch, length = assignment.shape[0], config.num_positions
        if indices.shape != (batch, k) or assignment.shape != (batch, length):
            raise ValueError(
                f"expected indices [B, K={k}] and assignment [B, L={length}], got {tuple(indices.shape)} and "
                f"{tuple(assignment.shape)}"
            )
        self._check_labels(labels, batch)
        return self.scheme.loss(
            self,
            indices=indices,
            assignment=assignment,
            labels=self.drop_labels(labels),
            num_tokens=k,
            return_logits=return_logits,
        )

    # ------------------------------------------------------------------ generation
    def decoder(self, *, labels: Tensor, num_tokens: int | None = None, use_cache: bool = True) -> RasterDecoder:
        """A step-by-step raster decoder (ar, mergear): prefill with :meth:`RasterDecoder.start`, then
        :meth:`RasterDecoder.feed`."""
        if not isinstance(self.scheme, RasterAR):
            raise ValueError(f"decoder() is the raster decoder of kinds 'ar' and 'mergear', not {self.config.kind!r}")
        return RasterDecoder(self, labels=labels, num_tokens=num_tokens, use_cache=use_cache)

    @torch.no_grad()
    def generate(
        self,
        *,
        labels: Tensor,
        num_tokens: int | None = None,
        cfg_scale: float = 1.0,
        cfg_schedule: str | None = None,
        cfg_start: float = 1.0,
        temperature: float | Sequence[float] = 1.0,
        top_k: int | Sequence[int] = 0,
        top_p: float | Sequence[float] = 1.0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        steps: int | None = None,
        tome_ratio: float = 0.0,
        progress: bool = False,
    ) -> GenerationOutput:
        """Sample codes for ``labels [B]``; see :class:`GenerationOutput` for what each kind returns.

        ``num_tokens``: K, the merge level to request (MergeAR, RandAR: one of ``merge_levels``; vanilla AR and
        MaskGIT: L or None). ``cfg_scale`` w1: guidance ``u + (c − u)·w`` on every bit group with a doubled batch
        (null-class rows); 1 disables it. ``cfg_schedule``: ``"constant"`` (w1 throughout) or ``"linear"``
        (``w = w0 + (w1 − w0)·f``, ``w0 = cfg_start``, f the fraction decoded: ``t/(L − 1)`` for raster kinds, ``k/N``
        with k tokens known before the step for RandAR and MaskGIT); None picks the kind's default, ``"linear"`` for
        RandAR (its published schedule) and ``"constant"`` otherwise. ``temperature``, ``top_k``, ``top_p``: a scalar or
        one value per bit group. ``steps``: forward passes of RandAR (default K, one token per pass) or MaskGIT
        (default ``config.maskgit_steps``); raster kinds always take L. ``tome_ratio``: MaskGIT only, the fraction of
        tokens merged inside every block (ToMe for SD). ``use_cache``: the KV cache of the AR kinds (MaskGIT has none).
        Runs in eval mode (dropout off); the mode is restored after.
        """
        if cfg_schedule is None:
            cfg_schedule = "linear" if self.config.kind == "randar" else "constant"
        sampler = Sampler.build(
            groups=self.codes.num_groups,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            cfg_scale=cfg_scale,
            cfg_start=cfg_start,
            cfg_schedule=cfg_schedule,
            generator=generator,
        )
        labels = labels.to(self.grid_positions.device)
        self._check_labels(labels, labels.shape[0])
        was_training = self.training
        self.eval()
        try:
            return self.scheme.generate(
                self,
                labels=labels,
                num_tokens=num_tokens,
                sampler=sampler,
                steps=steps,
                tome_ratio=tome_ratio,
                use_cache=use_cache,
                progress=progress,
            )
        finally:
            self.train(was_training)
