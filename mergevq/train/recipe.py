"""The stage-1 training recipe (``TrainConfig``): nested dataclasses, per-variant and per-recipe defaults.

The architecture lives elsewhere: :mod:`mergevq.tokenizer.config` holds the tokenizer presets; this recipe only names
a preset (``model.preset``) and optional field overrides.

Values are resolved in layers, later ones winning:

1. the dataclass defaults below;
2. the **variant** layer (G / G+R / R; ``variant: auto`` reads it from the model preset): the paper's per-variant
   weights (Table A1: source recovery 0.5 / 0.5 / 1.0, alignment 0.1 / 1.0 / 1.0), its merge-count distributions
   (SPEC §2.4) and R's gradient clipping at 5.0;
3. the **recipe** layer: ``code`` (default) keeps the authors' released settings where the paper differs (SPEC §12:
   L1 reconstruction, perceptual 1.0, fixed adversarial weight 0.1, Adam); ``paper`` switches to Table A1
   (L2 reconstruction, perceptual 0.7, adaptive adversarial weight × 0.8, AdamW, step / cosine LR) and the paper's
   square-decreasing merge schedule (App. A.1; ``model.overrides.merge_schedule: square``);
4. the YAML file;
5. command-line overrides ``section.key=value`` (values parsed as YAML scalars, e.g. ``optim.lr=2e-4``,
   ``optim.betas=[0.5,0.9]``, ``data.val=null``).

Loading is strict (:mod:`mergevq.train.config_io`): an unknown key or a value of the wrong type is a
:class:`~mergevq.train.config_io.ConfigError` with a one-line message that names the key and where it came from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mergevq.nn.tome import merge_schedule
from mergevq.tokenizer.config import PRESETS, TokenizerConfig, get_preset
from mergevq.tokenizer.merge_policy import grid_block_side
from mergevq.train.config_io import (
    ConfigError,
    NonFiniteSection,
    ResumeSection,
    build_dataclass,
    check_section,
    deep_merge,
    nest,
    read_user_values,
)
from mergevq.train.merge_sampling import MergeCountSampler, MergeSamplingConfig
from mergevq.train.schedule import ScheduleConfig

__all__ = [
    "AlignmentSection",
    "DataSection",
    "LossSection",
    "ModelSection",
    "OptimSection",
    "TrainConfig",
    "load_config",
]


# ----------------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelSection:
    preset: str = "tiny-32"  # a name from mergevq.tokenizer.config.PRESETS
    overrides: dict[str, Any] = field(default_factory=dict)  # TokenizerConfig fields to change
    # Initialisation of the encoder transformer (E2) before training (mergevq.tokenizer.initialization): "none" keeps
    # the model's own init (TokenizerConfig.weight_init); "dinov2" = weight selection from DINOv2 (paper App. A.1,
    # SPEC §2.1 "E2 init"; first-N layers, uniformly selected channels). A resumed run's checkpoint replaces it.
    init_from: Literal["none", "dinov2"] = "none"
    init_from_source: str = "facebook/dinov2-base"  # hub id (cached; honours HF_HUB_OFFLINE) or local HF directory


@dataclass
class DataSection:
    train: str = "../shared/data/cifar10/train"  # an image folder (recursively scanned)
    val: str | None = None  # held-out folder for the validation batch; None: skip validation
    image_size: int | None = None  # None: the model's image_size
    resize: int | None = None  # shorter side before the random crop; None: image_size
    hflip: bool = False  # random flip of the reconstruction view (authors: none)
    num_workers: int = 2
    max_images: int | None = None  # use only the first N training images (quick runs)
    val_images: int = 16  # size of the fixed validation batch
    val_num_tokens: list[int] | None = None  # K values validated (PSNR of the EMA model); None: default K and L


@dataclass
class LossSection:
    reconstruction: Literal["l1", "l2"] = "l1"  # authors' code asserts L1; Table A1 says "L2 reconstruction"
    reconstruction_weight: float = 1.0
    perceptual: Literal["shift_tolerant", "vanilla", "none"] = "shift_tolerant"
    perceptual_weight: float = 1.0  # code 1.0; paper 0.7
    perceptual_heads: str | None = None  # LPIPS file: ST-LPIPS weights, or the vanilla linear heads (vgg.pth)
    perceptual_backbone: str | None = None  # "vanilla" only: local torchvision-format VGG16 weights file
    # LPIPS on the first N images of each micro-batch only (None: all); an unbiased, cheaper estimate of the term
    perceptual_images: int | None = None
    adversarial_loss: Literal["non_saturating", "hinge"] = "non_saturating"  # code: non-saturating
    adversarial_mode: Literal["fixed", "adaptive"] = "fixed"  # code: fixed; paper: VQGAN adaptive weight
    adversarial_weight: float = 0.1  # fixed: the weight (code 0.1); adaptive: multiplies it (paper 0.8)
    # non_saturating only: "image" = softplus(−mean_hw D(x̂)) per image, the authors' code (SPEC §2.9); "patch" =
    # softplus per patch logit, then the mean (standard PatchGAN). The paper does not say; both recipes use "image".
    adversarial_reduction: Literal["image", "patch"] = "image"
    adaptive_max_weight: float = 1.0e4
    disc_start: int = 0  # optimizer step at which the GAN terms switch on (code: 0)
    disc_channels: int = 64
    disc_layers: int = 3
    lecam_weight: float = 0.01
    lecam_decay: float = 0.999
    entropy_weight: float = 0.1  # on H_sample − H_codebook
    commitment_weight: float = 0.25
    source_recovery_weight: float = 0.5  # paper: G 0.5, G+R 0.5, R 1.0 (absent from the code)
    alignment_weight: float = 1.0  # paper and code: G 0.1, G+R 1.0, R 1.0


@dataclass
class AlignmentSection:
    kind: Literal["dinov2", "ema", "labels", "none"] = "dinov2"
    source: str | None = "facebook/dinov2-base"  # dinov2: hub id or local directory in Hugging Face format
    temperature: float = 4.0  # KL distillation temperature τ (SPEC §2.6)
    view: Literal["augment", "same"] = "augment"  # student view: random resized crop + flip, or the input itself
    crop_scale: tuple[float, float] = (0.35, 1.0)  # "augment": area fraction of the student crop
    teacher_momentum: float = 0.996  # "ema": teacher ← m·teacher + (1 − m)·student after every optimizer step
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for build_alignment


@dataclass
class OptimSection:
    optimizer: Literal["adam", "adamw"] = "adam"  # code: Adam; paper: AdamW (both with weight decay 0)
    lr: float = 1.0e-4
    disc_lr: float | None = None  # None: same as lr (as the authors)
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    eps: float = 1.0e-8


@dataclass
class TrainConfig:
    variant: Literal["auto", "g", "gr", "r"] = "auto"  # picks the per-variant defaults; auto: the preset's
    recipe: Literal["code", "paper"] = "code"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    alignment: AlignmentSection = field(default_factory=AlignmentSection)
    # Default: the G+R layer on the default tiny-32 grid (K = (6 + T)², T in [-1, 2]), so TrainConfig() is valid too.
    merge: MergeSamplingConfig = field(default_factory=lambda: MergeSamplingConfig(t_min=-1, t_max=2))
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    resume: ResumeSection = field(default_factory=ResumeSection)  # allow_changes: resume with a changed recipe
    nonfinite: NonFiniteSection = field(default_factory=NonFiniteSection)  # max_skips: NaN/inf steps skipped
    batch_size: int = 8  # per process and micro-batch; effective batch = batch_size · grad_accum · world size
    grad_accum: int = 1  # micro-batches per optimizer step; "steps" everywhere are optimizer steps
    grad_clip: float | None = None  # max global grad norm (paper: R only, 5.0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16 uses a GradScaler per optimizer
    ema_decay: float = 0.999  # per optimizer step, generator only (the authors: per micro-batch, incl. D)
    max_steps: int = 1000
    log_every: int = 10
    val_every: int = 250
    checkpoint_every: int = 250
    keep_last: int = 3
    seed: int = 0
    output_dir: str = "runs/tokenizer"
    deterministic: bool = False  # deterministic kernels (and fixed CPU thread count, see threads)
    threads: int | None = None  # torch intra-op threads; None: leave torch's default
    device: Literal["auto", "cpu", "cuda"] = "auto"
    export: bool = True  # save_pretrained of the EMA model into output_dir/export at the end
    find_unused_parameters: bool = False  # DDP: set when some tokenizer parameters get no gradient
    notes: str = ""  # free text kept with the run

    def __post_init__(self) -> None:
        positive = ("batch_size", "grad_accum", "max_steps", "log_every", "val_every", "checkpoint_every")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.keep_last < 1:
            raise ValueError(f"keep_last: must be >= 1, got {self.keep_last}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: must be in [0, 1), got {self.ema_decay}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip: must be > 0 or null, got {self.grad_clip}")


# ----------------------------------------------------------------------------------------------------------------------
# Variant and recipe layers (dotted keys)
# ----------------------------------------------------------------------------------------------------------------------

_VARIANT_LAYERS: dict[str, dict[str, Any]] = {
    # G: the authors' 'gaussian-9' list (SPEC §2.4): K = (√K0 + i)² for i in [-1, 7] with their fixed weights, i.e.
    # {225, 256, ..., 529} with 61% at 256 for K0 = 256 (cut to the grid on small models). The paper's formula
    # K = (16 − T)² only reaches K <= 256, below both that list and its own Fig. 5 range [225, 400]; the Fig. 5 range
    # is available as merge.distribution=exponential, merge.root=15, merge.direction=1, merge.t_min=0, merge.t_max=5.
    "g": {
        "loss.source_recovery_weight": 0.5,
        "loss.alignment_weight": 0.1,
        "merge.distribution": "authors_gaussian",
        "merge.num_candidates": 9,
    },
    # G+R: discrete Gaussian over K = (12 + T)² for T in [-1, 3] → [121, 225] (paper Fig. 5 stage-1 range).
    "gr": {
        "loss.source_recovery_weight": 0.5,
        "loss.alignment_weight": 1.0,
        "merge.distribution": "gaussian",
        "merge.direction": 1,
        "merge.t_min": -1,
        "merge.t_max": 3,
    },
    # R: exponential over K = (6 + T)², T in [0, 4] → [36, 100]; clipping 5.0 (paper and code agree).
    "r": {
        "loss.source_recovery_weight": 1.0,
        "loss.alignment_weight": 1.0,
        "merge.distribution": "exponential",
        "merge.direction": 1,
        "merge.t_min": 0,
        "merge.t_max": 4,
        "grad_clip": 5.0,
    },
}

_RECIPE_LAYERS: dict[str, dict[str, Any]] = {
    "code": {},
    "paper": {
        # App. A.1: "we choose the square decreasing schedule" (SPEC §2.3, §12 #3; code: linear 1.5r -> 0.5r).
        "model.overrides.merge_schedule": "square",
        "loss.reconstruction": "l2",
        "loss.perceptual_weight": 0.7,
        "loss.adversarial_mode": "adaptive",
        "loss.adversarial_weight": 0.8,
        "optim.optimizer": "adamw",
        "schedule.kind": "step",
    },
}
_PAPER_SCHEDULE = {"g": "step", "gr": "step", "r": "cosine"}


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


def _preset_variant(preset: str, overrides: dict[str, Any]) -> str | None:
    """The variant of a model preset, read from the tokenizer's preset registry (None: unknown preset)."""
    try:
        return str(overrides.get("variant") or get_preset(preset).variant)
    except ValueError:
        return None


def _check_model_overrides(section: dict[str, Any], source: str) -> None:
    """Type-check ``model.overrides`` against the tokenizer's config fields, and the preset name."""
    model = section.get("model", {})
    if "preset" in model and model["preset"] not in PRESETS:
        raise ConfigError(f"{source}: model.preset: unknown preset {model['preset']!r}; available: {sorted(PRESETS)}")
    if "overrides" in model:
        model["overrides"] = check_section(model["overrides"], TokenizerConfig, prefix="model.overrides", source=source)


def load_config(path: str | Path | None = None, *, overrides: list[str] | None = None) -> TrainConfig:
    """Build a :class:`TrainConfig` from defaults, variant and recipe layers, a YAML file and dotted overrides."""
    user = read_user_values(TrainConfig, path, overrides=overrides, check=_check_model_overrides)
    values, source = user.values, user.source
    preset = values.get("model", {}).get("preset", ModelSection.preset)
    variant = values.get("variant", "auto")
    if variant == "auto":
        variant = _preset_variant(preset, values.get("model", {}).get("overrides", {}))
        if variant is None:
            raise ConfigError(f"{source}: variant: cannot infer it from model.preset {preset!r}; set g, gr or r")
    recipe = values.get("recipe", "code")

    layer = dict(_VARIANT_LAYERS[variant])
    layer.update(_RECIPE_LAYERS[recipe])
    if recipe == "paper":
        layer["schedule.kind"] = _PAPER_SCHEDULE[variant]
    _fit_merge_range(layer, values)
    layer_checked = check_section(nest(layer), TrainConfig, prefix="", source=f"{variant}/{recipe} defaults")

    merged = deep_merge(layer_checked, values)
    merged["variant"] = variant
    config = build_dataclass(TrainConfig, merged, source=source)
    _check_model_and_merge(config, source)
    return config


def _fit_merge_range(layer: dict[str, Any], values: dict[str, Any]) -> None:
    """Cut the variant layer's T range to the token counts the model's grid has (in place).

    The layers carry the paper's ranges, meant for 256+ tokens: ``K = (6 + T)², T in [-1, 3]`` reaches K = 81 on the
    64-token grid of the default tiny-32, which would make the defaults themselves invalid. A range set by the user
    (``merge.t_min``, ``merge.t_max``, ``merge.candidates``) is left alone and checked as given. For the authors'
    lists (``authors_*``, e.g. the G layer's ``gaussian-9``) the candidate count is cut instead, unless
    ``merge.num_candidates`` is set.
    """
    merge = values.get("merge", {})
    if any(key in merge for key in ("t_min", "t_max", "candidates", "num_candidates")):
        return
    model = values.get("model", {})
    try:
        model_config = get_preset(model.get("preset", ModelSection.preset), **model.get("overrides", {}))
    except (TypeError, ValueError):
        return  # reported with its source by _check_model_and_merge
    if str(merge.get("distribution", layer.get("merge.distribution", ""))).startswith("authors_"):
        # The authors' list [(√K0 + i)² for i in range(-bias, n - bias)] only grows with n: keep the n that fit.
        bias = 1 if merge.get("distribution", layer.get("merge.distribution")) == "authors_gaussian" else 0
        root0 = math.sqrt(model_config.default_num_tokens)
        n = layer.get("merge.num_candidates", MergeSamplingConfig.num_candidates)
        while n > 1 + bias and int((root0 + n - 1 - bias) ** 2) > model_config.num_tokens_full:
            n -= 1
        layer["merge.num_candidates"] = n
        return
    root = merge.get("root") or round(math.sqrt(model_config.default_num_tokens))
    direction = merge.get("direction", layer.get("merge.direction", 1))
    t_min, t_max = layer.get("merge.t_min", 0), layer.get("merge.t_max", 0)
    inside = [t for t in range(t_min, t_max + 1) if 1 <= (root + direction * t) ** 2 <= model_config.num_tokens_full]
    if inside:
        layer["merge.t_min"], layer["merge.t_max"] = inside[0], inside[-1]


def _check_model_and_merge(config: TrainConfig, source: str) -> None:
    """Build the tokenizer config and the merge-count sampler once, so bad combinations fail at load time."""
    try:
        model_config = get_preset(config.model.preset, **config.model.overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: model: {e}") from None
    if config.data.image_size is not None and config.data.image_size != model_config.image_size:
        raise ConfigError(
            f"{source}: data.image_size: {config.data.image_size} differs from the model's image_size "
            f"{model_config.image_size} (set model.overrides.image_size instead)"
        )
    try:
        sampler = MergeCountSampler(
            config=config.merge,
            num_tokens_full=model_config.num_tokens_full,
            default_num_tokens=model_config.default_num_tokens,
            seed=config.seed,
        )
    except ValueError as e:
        raise ConfigError(f"{source}: merge: {e}") from None
    for k in sampler.candidates:
        # The encoder merges at most half of the tokens per block: small K may be out of reach for a shallow model.
        try:
            merge_schedule(
                num_tokens=model_config.num_tokens_full,
                target=k,
                num_layers=model_config.depth,
                kind=model_config.merge_schedule,
            )
        except ValueError as e:
            raise ConfigError(f"{source}: merge: candidate K={k}: {e}") from None
        if model_config.merge_policy == "grid":  # fixed blocks: every K must tile the grid
            try:
                grid_block_side(grid=(model_config.grid_size,) * 2, num_tokens=k)
            except ValueError as e:
                raise ConfigError(f"{source}: merge: candidate K={k}: {e}") from None
