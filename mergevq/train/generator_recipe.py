"""The stage-2 training recipe (``GeneratorTrainConfig``): nested dataclasses, loaded strictly.

The architecture lives in :mod:`mergevq.generator.config`; this recipe names a size preset (``model.preset``), the
scheme (``model.kind``) and optional :class:`~mergevq.generator.config.GeneratorConfig` field overrides. What
describes the *tokens* (``codebook_bits``, ``grid``, ``num_classes``, the tokenizer identity, and the
``merge_levels`` of MergeAR and RandAR) is read from the token file at the start of training, never from the recipe.

Values are resolved in layers, later ones winning: the dataclass defaults below; the generator defaults
(:data:`_DEFAULTS`: cosine schedule, uniform merge-level sampling); the YAML file; command-line overrides
``section.key=value`` (values parsed as YAML). An unknown key or a wrongly typed value is a one-line
:class:`~mergevq.train.config_io.ConfigError` naming the key and where it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mergevq.generator.config import PRESETS, GeneratorConfig, preset_names
from mergevq.train.config_io import ConfigError, NonFiniteSection, ResumeSection, check_section, load_dataclass
from mergevq.train.merge_sampling import MergeSamplingConfig
from mergevq.train.schedule import ScheduleConfig

__all__ = [
    "FROM_TOKEN_FILE",
    "DataSection",
    "GeneratorTrainConfig",
    "ModelSection",
    "OptimSection",
    "load_config",
]

# GeneratorConfig fields the token file decides (or that have their own recipe key); model.overrides may not set them.
FROM_TOKEN_FILE: dict[str, str] = {
    "name": "it is the preset's name (model.preset)",
    "kind": "use model.kind",
    "codebook_bits": "it comes from the token file",
    "grid": "it comes from the token file",
    "tokenizer": "it comes from the token file",
    "merge_levels": "use data.num_tokens",
}


@dataclass
class ModelSection:
    preset: str = "tiny"  # a size from mergevq.generator.config.PRESETS: tiny, small, B, L, XL
    # ar: vanilla raster AR (K = L); mergear: K-sparse raster target behind a merge instruction; randar: random-order
    # AR over the K merged tokens; maskgit: bidirectional masked prediction of the L grid tokens (K = L).
    kind: Literal["ar", "mergear", "randar", "maskgit"] = "ar"
    overrides: dict[str, Any] = field(default_factory=dict)  # GeneratorConfig fields (window, dropouts, bits, ...)


@dataclass
class DataSection:
    train: str = "runs/tokens/cifar10_train.safetensors"  # token file written by `mergevq encode`
    val: str | None = None  # token file of held-out images (same tokenizer); None: no validation
    # MergeAR/RandAR merge levels (K with a merge instruction, drawn per step); None: every K stored in the file
    # below L. Vanilla AR and MaskGIT always train on K = L, which the file must store.
    num_tokens: list[int] | None = None
    val_images: int = 256  # size of the fixed validation subset (rows evenly spread over the val file)

    def __post_init__(self) -> None:
        if self.val_images < 1:
            raise ValueError(f"val_images: must be >= 1, got {self.val_images}")
        if self.num_tokens is not None and not self.num_tokens:
            raise ValueError("num_tokens: an empty list; use null for every stored K below L")


@dataclass
class OptimSection:
    optimizer: Literal["adam", "adamw"] = "adamw"
    lr: float = 3.0e-4  # code 3e-4; paper Table A2 4e-4
    betas: tuple[float, float] = (0.9, 0.95)  # code (0.9, 0.95); paper Table A2 (0.9, 0.99)
    weight_decay: float = 0.05  # on >= 2-D weights only (linear layers, embeddings), none on norm gains
    eps: float = 1.0e-8


@dataclass
class GeneratorTrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    merge: MergeSamplingConfig = field(default_factory=MergeSamplingConfig)  # K per step (MergeAR, RandAR)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    resume: ResumeSection = field(default_factory=ResumeSection)  # allow_changes: resume with a changed recipe
    nonfinite: NonFiniteSection = field(default_factory=NonFiniteSection)  # max_skips: NaN/inf steps skipped
    batch_size: int = 64  # per process and micro-batch; effective batch = batch_size · grad_accum · world size
    grad_accum: int = 1  # micro-batches per optimizer step (all at the same K); "steps" are optimizer steps
    grad_clip: float | None = 1.0  # max global grad norm
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16 adds a GradScaler
    ema_decay: float | None = None  # per optimizer step; None: no EMA (export then holds the trained weights)
    max_steps: int = 1000
    log_every: int = 10
    val_every: int = 250
    checkpoint_every: int = 250
    keep_last: int = 3
    seed: int = 0
    output_dir: str = "runs/generator"
    deterministic: bool = False  # deterministic kernels (and a fixed CPU thread count, see threads)
    threads: int | None = None  # torch intra-op threads; None: leave torch's default
    device: Literal["auto", "cpu", "cuda"] = "auto"
    export: bool = True  # save_pretrained of the (EMA) generator into output_dir/export at the end
    find_unused_parameters: bool = False  # DDP: set when some parameters get no gradient
    notes: str = ""  # free text kept with the run

    def __post_init__(self) -> None:
        positive = ("batch_size", "grad_accum", "max_steps", "log_every", "val_every", "checkpoint_every", "keep_last")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: must be in [0, 1) or null, got {self.ema_decay}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip: must be > 0 or null, got {self.grad_clip}")


# Generator defaults that differ from the shared sections' own defaults (dotted keys, below the YAML file).
_DEFAULTS: dict[str, Any] = {
    "schedule.kind": "cosine",
    "merge.distribution": "uniform",
}


def _check_model(values: dict[str, Any], source: str) -> None:
    """The preset name, and ``model.overrides`` type-checked against GeneratorConfig's fields."""
    model = values.get("model", {})
    if "preset" in model and model["preset"] not in PRESETS:
        raise ConfigError(
            f"{source}: model.preset: unknown generator preset {model['preset']!r}; available: {preset_names()}"
        )
    if "overrides" in model:
        for key in model["overrides"]:
            if key in FROM_TOKEN_FILE:
                raise ConfigError(f"{source}: model.overrides.{key}: cannot be set here, {FROM_TOKEN_FILE[key]}")
        model["overrides"] = check_section(model["overrides"], GeneratorConfig, prefix="model.overrides", source=source)


def load_config(path: str | Path | None = None, *, overrides: list[str] | None = None) -> GeneratorTrainConfig:
    """Build a :class:`GeneratorTrainConfig` from defaults, a YAML file and dotted overrides (strict)."""
    return load_dataclass(GeneratorTrainConfig, path, overrides=overrides, defaults=_DEFAULTS, check=_check_model)
