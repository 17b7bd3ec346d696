"""Tokenizer configuration and the preset registry.

Paper presets reproduce the verified parameter counts of SPEC §2.1 (encoder, alignment head and decoder within 1%):

============  =========  ============================  =====================  ===========
preset        variant    E1 stem                       E2 width / heads       L (256²)
============  =========  ============================  =====================  ===========
g-d64         G          CNN 64·[1,2,4,8], f=8         512 / 8                1024
gr-d64        G+R        CNN 64·[1,1,2,4,8], f=16      512 / 8                256
r-vitb        R          16×16 patches                 768 / 12               256
g-d32         G          CNN 32·[2,4,8,12], f=8        384 / 8                1024
gr-d32        G+R        CNN 32·[2,2,4,8,12], f=16     384 / 8                256
gr-d96        G+R        CNN 96·[1,1,2,4,8], f=16      768 / 12               256
tiny-32       G+R        CNN 32·[1,2,4], f=4           128 / 4 (6 blocks)     64 (32²)
tiny-64       G+R        CNN 32·[1,2,2,6], f=8         192 / 4 (6 blocks)     64 (64²)
============  =========  ============================  =====================  ===========
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergevq.persistence import check_config_keys, load_config_json, save_config_json
from mergevq.tokenizer.merge_policy import MERGE_POLICIES, MERGE_SPLITS, grid_block_side

VARIANTS = ("g", "gr", "r")
ALIGN_HEADS = ("mlp_ln", "mlp3", "none")
WEIGHT_INITS = ("trunc_normal", "torch")


@dataclass
class TokenizerConfig:
    """Everything needed to build a :class:`mergevq.MergeVQ`; saved as ``config.json`` beside the weights."""

    name: str = "custom"
    variant: str = "gr"  # "g" (generation), "gr" (generation + representation), "r" (representation)
    image_size: int = 256
    # ---- E1: CNN stem (G, G+R) or patch stem (R)
    stem: str = "cnn"  # "cnn" | "patch"
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 1, 2, 4, 8)
    num_res_blocks: int = 4
    patch_size: int = 16
    # ---- E2: transformer with token merging after attention in every block
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    layerscale_init: float = 1e-5
    # Init of new models (mergevq.tokenizer.initialization): "trunc_normal" = the authors' transformer init
    # (TransformerBlock/SourceRecovery.init_weights in their model_mergevq.py, the file of SPEC §2.3/§2.7: Linear/Conv
    # weights trunc-normal std 0.02, biases 0) on the encoder and decoder transformers and the Source Recovery;
    # "torch" = PyTorch's default init everywhere. CNN parts keep PyTorch's init in both; CLS stays N(0, 1e-6).
    weight_init: str = "trunc_normal"
    proportional_attention: bool = True  # paper Eq. 14: + log(size) on attention logits
    merge_schedule: str = "linear"  # "linear" (authors' code, 1.5r -> 0.5r) | "constant" | "square" (SPEC §2.3)
    # Which tokens merge (mergevq.tokenizer.merge_policy): "tome" = bipartite soft matching (SPEC §2.3); "grid" =
    # the same blocks and schedule, restricted to fixed b×b blocks of the grid (K must tile it).
    merge_policy: str = "tome"
    # ToMe's A/B split: "alternate" (even/odd in raster order of first position) | "resplit" (the authors' order
    # [unmerged A, B] re-split at every layer, SPEC §2.3) | "window" (ToMe for Stable Diffusion's 2-D split, SPEC
    # §6.3: one destination per window, random in training, top-left in evaluation).
    merge_split: str = "alternate"
    merge_window: int = 2  # window side of merge_split="window" (tomesd's default stride 2×2)
    default_num_tokens: int = 144  # K used when a call does not name one
    # ---- LFQ
    codebook_bits: int = 18
    entropy_temperature: float = 0.01
    # ---- global alignment head on CLS (the loss lives with the training code)
    align_head: str = "mlp3"  # "mlp_ln" (G) | "mlp3" (G+R, R) | "none"
    align_dim: int = 768  # teacher feature size (DINOv2-B CLS)
    # ---- learned Source Recovery (SPEC §2.7): predicts the assignment from the K codes at generation time
    learned_recovery: bool = True
    recovery_width: int = 384
    recovery_depth: int = 2
    recovery_heads: int = 8
    recovery_mlp_ratio: float = 4.0
    # ---- decoder: transformer part (CPE + MixFFN) then CNN part (AdaGN, ResBlocks, pixel-shuffle up)
    decoder_base_channels: int | None = None  # None: same as the encoder's CNN
    decoder_channel_mult: tuple[int, ...] | None = None
    decoder_depth: int = 12
    decoder_heads: int = 8
    decoder_res_blocks: int = 4
    decoder_extra_res_blocks: int = 1  # one more ResBlock on every level but the finest (authors' num_res_extra)
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_types(self)  # before anything computes with a value: "128" must not reach a format string
        self.channel_mult = tuple(self.channel_mult)
        if self.decoder_channel_mult is not None:
            self.decoder_channel_mult = tuple(self.decoder_channel_mult)
        self.validate()

    # ---- derived quantities
    @property
    def downsample(self) -> int:
        """Encoder downsampling factor f (image side / token-grid side)."""
        return self.patch_size if self.stem == "patch" else 2 ** (len(self.channel_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample

    @property
    def num_tokens_full(self) -> int:
        """L, the token count before merging."""
        return self.grid_size**2

    @property
    def dec_base_channels(self) -> int:
        return self.decoder_base_channels or self.base_channels

    @property
    def dec_channel_mult(self) -> tuple[int, ...]:
        return self.decoder_channel_mult or self.channel_mult

    @property
    def decoder_width(self) -> int:
        return self.dec_base_channels * self.dec_channel_mult[-1]

    def validate(self) -> None:
        def bad(key: str, msg: str) -> ValueError:
            return ValueError(f"TokenizerConfig.{key}: {msg}")

        if self.variant not in VARIANTS:
            raise bad("variant", f"{self.variant!r} is not one of {VARIANTS}")
        if self.stem not in ("cnn", "patch"):
            raise bad("stem", f"{self.stem!r} is not 'cnn' or 'patch'")
        if self.align_head not in ALIGN_HEADS:
            raise bad("align_head", f"{self.align_head!r} is not one of {ALIGN_HEADS}")
        if self.merge_schedule not in ("linear", "constant", "square"):
            raise bad("merge_schedule", f"{self.merge_schedule!r} is not 'linear', 'constant' or 'square'")
        if self.merge_policy not in MERGE_POLICIES:
            raise bad("merge_policy", f"{self.merge_policy!r} is not one of {MERGE_POLICIES}")
        if self.merge_split not in MERGE_SPLITS:
            raise bad("merge_split", f"{self.merge_split!r} is not one of {MERGE_SPLITS}")
        if self.merge_window < 2:
            raise bad("merge_window", f"{self.merge_window} must be >= 2")
        if self.weight_init not in WEIGHT_INITS:
            raise bad("weight_init", f"{self.weight_init!r} is not one of {WEIGHT_INITS}")
        if self.width % self.num_heads:
            raise bad("width", f"{self.width} is not divisible by num_heads={self.num_heads}")
        if self.stem == "cnn" and self.base_channels * self.channel_mult[-1] != self.width:
            raise bad(
                "width",
                f"{self.width} must equal base_channels*channel_mult[-1] = {self.base_channels * self.channel_mult[-1]}"
                " for the CNN stem",
            )
        if self.image_size % self.downsample:
            raise bad("image_size", f"{self.image_size} is not divisible by the downsampling factor {self.downsample}")
        dec_factor = 2 ** (len(self.dec_channel_mult) - 1)
        if dec_factor != self.downsample:
            raise bad(
                "decoder_channel_mult",
                f"upsamples by {dec_factor} but the encoder downsamples by {self.downsample}",
            )
        if self.decoder_width % self.decoder_heads:
            raise bad("decoder_heads", f"decoder width {self.decoder_width} is not divisible by {self.decoder_heads}")
        if self.recovery_width % self.recovery_heads:
            raise bad("recovery_heads", f"recovery_width {self.recovery_width} not divisible by {self.recovery_heads}")
        if not 1 <= self.default_num_tokens <= self.num_tokens_full:
            raise bad("default_num_tokens", f"{self.default_num_tokens} is outside [1, L={self.num_tokens_full}]")
        if self.merge_policy == "grid":
            try:
                grid_block_side(grid=(self.grid_size, self.grid_size), num_tokens=self.default_num_tokens)
            except ValueError as e:
                raise bad("default_num_tokens", str(e)) from None
        if not 1 <= self.codebook_bits <= 30:
            raise bad("codebook_bits", f"{self.codebook_bits} is outside [1, 30]")

    # ---- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> TokenizerConfig:
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a tokenizer config must be a JSON object, got {type(data).__name__}")
        check_config_keys(cls=cls, data=data, source=source, what="tokenizer config")
        try:
            return cls(**data)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def save(self, path: str | Path) -> None:
        save_config_json(path=path, data=self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> TokenizerConfig:
        return cls.from_dict(load_config_json(path=path, what="tokenizer"), source=str(Path(path)))

    def replace(self, **overrides: Any) -> TokenizerConfig:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown tokenizer config key(s) {unknown}")
        return dataclasses.replace(self, **overrides)


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(tp))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_type_ok(v, typing.get_args(tp)[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return True


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return "a list of integers"
    names = {int: "an integer", float: "a number", bool: "true/false", str: "a string", type(None): "null"}
    return names.get(tp, "a mapping")


def _check_types(config: TokenizerConfig) -> None:
    hints = typing.get_type_hints(TokenizerConfig)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _type_ok(value, hints[f.name]):
            raise ValueError(f"TokenizerConfig.{f.name}: expected {_type_name(hints[f.name])}, got {value!r}")


def _g(**kw: Any) -> TokenizerConfig:
    base = dict(variant="g", channel_mult=(1, 2, 4, 8), align_head="mlp_ln", default_num_tokens=256)
    return TokenizerConfig(**{**base, **kw})


def _gr(**kw: Any) -> TokenizerConfig:
    return TokenizerConfig(**{**dict(variant="gr", align_head="mlp3", default_num_tokens=144), **kw})


PRESETS: dict[str, Any] = {
    # Paper (Table A1) settings; K defaults as in the paper (R keeps 36; the authors' config keeps 64).
    "g-d64": lambda: _g(name="g-d64"),
    "gr-d64": lambda: _gr(name="gr-d64"),
    "r-vitb": lambda: TokenizerConfig(
        name="r-vitb",
        variant="r",
        stem="patch",
        patch_size=16,
        width=768,
        num_heads=12,
        align_head="mlp3",
        default_num_tokens=36,
        decoder_base_channels=64,
        decoder_channel_mult=(1, 1, 2, 4, 8),
    ),
    # Released-code-only sizes (SPEC §2.1).
    # d32: 8 heads of 48 channels in the encoder and decoder transformers, as the released d32 configs.
    "g-d32": lambda: _g(name="g-d32", base_channels=32, channel_mult=(2, 4, 8, 12), width=384),
    "gr-d32": lambda: _gr(name="gr-d32", base_channels=32, channel_mult=(2, 2, 4, 8, 12), width=384),
    "gr-d96": lambda: _gr(name="gr-d96", base_channels=96, width=768, num_heads=12, decoder_heads=12),
    # Small CPU presets that train usefully on 2 cores.
    "tiny-32": lambda: _gr(
        name="tiny-32",
        image_size=32,
        base_channels=32,
        channel_mult=(1, 2, 4),
        num_res_blocks=1,
        width=128,
        depth=6,
        num_heads=4,
        default_num_tokens=36,
        align_dim=128,
        recovery_width=128,
        recovery_heads=4,
        decoder_depth=2,
        decoder_heads=4,
        decoder_res_blocks=1,
        decoder_extra_res_blocks=0,
    ),
    "tiny-64": lambda: _gr(
        name="tiny-64",
        image_size=64,
        base_channels=32,
        channel_mult=(1, 2, 2, 6),
        num_res_blocks=1,
        width=192,
        depth=6,
        num_heads=4,
        default_num_tokens=36,
        align_dim=192,
        recovery_width=128,
        recovery_heads=4,
        decoder_depth=2,
        decoder_heads=4,
        decoder_res_blocks=1,
        decoder_extra_res_blocks=1,
    ),
}


def get_preset(name: str, **overrides: Any) -> TokenizerConfig:
    """The named preset's config, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    config = PRESETS[name]()
    return config.replace(**overrides) if overrides else config


def preset_names() -> list[str]:
    return sorted(PRESETS)
