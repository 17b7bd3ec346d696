"""The stage-2 generator: one model class for every kind (vanilla raster AR, MergeAR).

Public API::

    gen = Generator.from_preset("tiny", kind="mergear", codebook_bits=18, grid=(8, 8), num_classes=10,
                                merge_levels=(16, 32, 64))       # or Generator(config) / Generator.from_pretrained(dir)
    out = gen(indices=idx_BK, assignment=asg_BL, labels=y_B, num_tokens=16)    # GeneratorOutput(loss, losses, logits)
    sample = gen.generate(labels=y_B, num_tokens=16, cfg_scale=2.0, top_k=0)   # GenerationOutput(indices [B, L], ...)
    images = tokenizer.decode(sample.indices, sample.assignment)

Shapes: B batch, L = h·w raster positions, K merged tokens, C width, G bit groups.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mergevq.generator.ar import RasterAR, RasterDecoder, raster_positions
from mergevq.generator.config import GeneratorConfig
from mergevq.generator.gpt import Transformer, init_weights
from mergevq.generator.heads import FactorizedCodes
from mergevq.generator.mergear import MergeAR, groups_from_values
from mergevq.generator.sampling import CFG_SCHEDULES, cfg_weight, guided, per_group, sample_logits

__all__ = ["GenerationOutput", "GenerationStats", "Generator", "GeneratorOutput"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_SCHEMES: dict[str, type[RasterAR]] = {"ar": RasterAR, "mergear": MergeAR}


class GeneratorOutput(NamedTuple):
    loss: Tensor  # scalar: sum over bit groups of the mean cross-entropy
    losses: dict[str, Tensor]  # ce_g0, ce_g1, ... and accuracy (all groups right; detached)
    logits: list[Tensor] | None = None  # [B, L, V_g] per group when requested


class GenerationStats(NamedTuple):
    seconds: float
    tokens_per_s: float  # generated raster tokens (B·L) per second
    images_per_s: float
    forward_passes: int  # transformer forwards (prefill counts as one)
    peak_cache_bytes: int  # largest K/V storage allocated at any time, all layers (0 without a cache)
    distinct_groups: Tensor  # [B] distinct code values per generated grid (compare with the requested K)


class GenerationOutput(NamedTuple):
    indices: Tensor  # [B, L] codes of the raster grid
    assignment: Tensor | None  # [B, L] identity for raster kinds: decode(indices, assignment) decodes the grid
    stats: GenerationStats


class Generator(nn.Module):
    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        self.scheme = _SCHEMES[config.kind](config)
        self.class_embedding = nn.Embedding(config.num_classes + 1, config.width)  # last row: the null class
        self.merge_embedding = (
            nn.Embedding(len(config.merge_levels), config.width) if config.kind == "mergear" else None
        )
        self.codes = FactorizedCodes(config)
        self.trunk = Transformer(config)
        self.register_buffer("grid_positions", raster_positions(config.grid), persistent=False)
        init_weights(self, std=config.init_std)
        self.codes.zero_heads()

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
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = directory / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt", "kind": self.config.kind, "preset": self.config.name})
        tmp.replace(directory / WEIGHTS_NAME)
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
        if not path.is_file():
            raise FileNotFoundError(f"no weights file at {path}")
        try:
            state = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            details = []
            if wrong:
                k = wrong[0]
                details.append(
                    f"{len(wrong)} shape mismatch(es), e.g. {k}: file {tuple(state[k].shape)} vs model "
                    f"{tuple(own[k].shape)}"
                )
            if missing:
                details.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
            if unexpected:
                details.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
            meta = _metadata(path)
            saved = f" (the file was saved from a {meta.get('kind')!r} generator)" if meta.get("kind") else ""
            raise ValueError(f"{path} does not fit generator {self.config.name!r}{saved}: " + "; ".join(details))
        self.load_state_dict(state)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part; ``total`` counts everything."""

        def count(m: nn.Module | None) -> int:
            return sum(p.numel() for p in m.parameters()) if m is not None else 0

        return {
            "trunk": count(self.trunk),
            "code_embeddings": count(self.codes.embeddings),
            "intra_blocks": count(self.codes.intra),
            "heads": count(self.codes.heads) + count(self.codes.norm),
            "class_embedding": count(self.class_embedding),
            "merge_embedding": count(self.merge_embedding),
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
        """Training loss on the K-sparse raster target ``target [B, L] = indices.gather(1, assignment)``.

        ``indices [B, K]`` codes of the merged tokens, ``assignment [B, L]`` group of every position, ``labels [B]``
        classes (dropped to the null class with probability ``class_dropout`` in training), ``num_tokens`` = K (vanilla
        AR: must be L). Every position is supervised; ``losses`` holds ``ce_g{g}`` per bit group and ``accuracy``.
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
        target_BL = indices.long().gather(1, assignment.long())
        x_BSC = torch.cat(
            [self.scheme.prefix(self, self.drop_labels(labels), k), self.codes.embed(target_BL[:, :-1])], dim=1
        )
        p = self.scheme.num_prefix
        none_P2 = torch.full((p, 2), -1, dtype=torch.long, device=self.grid_positions.device)
        positions_1S2 = torch.cat([none_P2, self.grid_positions[:-1]])[None]
        h_BSC = self.trunk(x_BSC, positions_BS2=positions_1S2, mask=self.scheme.attention_mask(target_BL[:, :-1]))
        h_BLC = h_BSC[:, p - 1 :]  # the states predicting x_0 … x_{L−1}
        losses = self.codes.loss(h_BLC, target_BL, label_smoothing=config.label_smoothing)
        loss = losses.pop("loss")
        logits = self.codes.logits(h_BLC, target_BL) if return_logits else None
        return GeneratorOutput(loss, losses, logits)

    # ------------------------------------------------------------------ generation
    def decoder(self, *, labels: Tensor, num_tokens: int | None = None, use_cache: bool = True) -> RasterDecoder:
        """A step-by-step decoder (prefill with :meth:`RasterDecoder.start`, then :meth:`RasterDecoder.feed`)."""
        return RasterDecoder(self, labels=labels, num_tokens=num_tokens, use_cache=use_cache)

    @torch.no_grad()
    def generate(
        self,
        *,
        labels: Tensor,
        num_tokens: int | None = None,
        cfg_scale: float = 1.0,
        cfg_schedule: str = "constant",
        temperature: float | Sequence[float] = 1.0,
        top_k: int | Sequence[int] = 0,
        top_p: float | Sequence[float] = 1.0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        progress: bool = False,
    ) -> GenerationOutput:
        """Sample ``[B, L]`` raster grids for ``labels [B]``.

        ``num_tokens``: K, the merge level to request (MergeAR; vanilla AR: L or None). ``cfg_scale`` w: guidance
        ``u + (c − u)·w`` on every bit group with a doubled batch (null-class rows); 1 disables it. ``cfg_schedule``
        ``"linear"`` ramps w from 1 at the first token to ``cfg_scale`` at the last. ``temperature``, ``top_k``,
        ``top_p``: a scalar or one value per bit group. Runs in eval mode (dropout off); the mode is restored after.
        """
        config, groups = self.config, self.codes.num_groups
        if cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
        temps = per_group(temperature, groups=groups, name="temperature")
        top_ks = per_group(top_k, groups=groups, name="top_k")
        top_ps = per_group(top_p, groups=groups, name="top_p")
        batch, length = labels.shape[0], config.num_positions
        labels = labels.to(self.grid_positions.device)
        self._check_labels(labels, batch)
        guide = cfg_scale != 1.0
        labels_in = torch.cat([labels, torch.full_like(labels, config.null_class)]) if guide else labels

        was_training = self.training
        self.eval()
        try:
            start = time.perf_counter()
            dec = self.decoder(labels=labels_in, num_tokens=num_tokens, use_cache=use_cache)
            tokens_BL = torch.empty(batch, length, dtype=torch.long, device=labels.device)
            h_BC = dec.start()
            steps = range(length)
            if progress:
                from tqdm.auto import tqdm

                steps = tqdm(steps, desc="generate", unit="tok")
            for t in steps:
                weight = cfg_weight(cfg_scale, schedule=cfg_schedule, step=t, total=length)

                def choose(g: int, logits_NV: Tensor, weight: float = weight) -> Tensor:
                    if guide:
                        logits_NV = guided(logits_NV, weight=weight)
                    return sample_logits(
                        logits_NV, temperature=temps[g], top_k=top_ks[g], top_p=top_ps[g], generator=generator
                    )

                token_B = self.codes.sample(h_BC, choose=choose)
                tokens_BL[:, t] = token_B
                if t < length - 1:
                    h_BC = dec.feed(torch.cat([token_B, token_B]) if guide else token_B)
            seconds = time.perf_counter() - start
        finally:
            self.train(was_training)

        stats = GenerationStats(
            seconds=seconds,
            tokens_per_s=batch * length / max(seconds, 1e-9),
            images_per_s=batch / max(seconds, 1e-9),
            forward_passes=dec.forward_passes,
            peak_cache_bytes=dec.peak_cache_bytes,
            distinct_groups=groups_from_values(tokens_BL).counts,
        )
        identity_BL = torch.arange(length, device=tokens_BL.device).expand(batch, length).clone()
        return GenerationOutput(tokens_BL, identity_BL, stats)


def _metadata(path: Path) -> dict[str, str]:
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            return json.loads(f.read(header_len)).get("__metadata__", {})
    except (OSError, ValueError):
        return {}
