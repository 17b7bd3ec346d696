"""Generator configuration and the size presets.

A preset fixes the transformer size only; the task (kind, codebook bits, grid, classes, merge levels) is given by the
caller. Kinds: ``ar`` (vanilla raster LlamaGen), ``mergear`` (SPEC §4), ``randar`` (random-order AR over the K merged
tokens, SPEC §5) and ``maskgit`` (bidirectional masked prediction over the L grid tokens, SPEC §6.3)::

    cfg = GeneratorConfig.from_preset("tiny", kind="mergear", codebook_bits=18, grid=(8, 8), num_classes=10,
                                      merge_levels=(16, 32, 64))

=======  =====  =====  =====  =================================================================
preset   depth  width  heads  notes
=======  =====  =====  =====  =================================================================
B        12     768    12     LlamaGen-B, 111M with a single head over 2^14 codes (SPEC §6.3)
L        24     1024   16     LlamaGen-L, 343M; with bits (6, 12) + 2 intra layers it is the official
                              MergeVQ stage-2 model, 343.6M (SPEC §6.2)
XL       36     1280   20     LlamaGen-XL, 775M
small    8      256    8      CPU size, ~11M parameters at d=18 (6.8M in the trunk)
tiny     6      192    6      CPU size, ~5M at d=18 (2.7M in the trunk)
=======  =====  =====  =====  =================================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergevq.persistence import check_config_keys, load_config_json, save_config_json

__all__ = [
    "KINDS",
    "PLAIN_HEAD_MAX_BITS",
    "PRESETS",
    "RANK_LAYOUTS",
    "GeneratorConfig",
    "find_multiple",
    "preset_names",
]

KINDS = ("ar", "mergear", "randar", "maskgit")
RANK_LAYOUTS = ("1d", "2d")
# Kinds whose prefix carries a merge-instruction embedding per K.
MERGE_LEVEL_KINDS = ("mergear", "randar")
# A plain output head has 2^d rows; above this the head and the embedding table would dominate the model (2^18 rows
# at width 1024 are 268M parameters each), so larger codebooks must be factorised.
PLAIN_HEAD_MAX_BITS = 14
_MAX_BITS = 18


def find_multiple(n: int, k: int) -> int:
    """The smallest multiple of ``k`` that is ``>= n``."""
    return n if n % k == 0 else n + k - n % k


@dataclass
class GeneratorConfig:
    """Everything needed to build a :class:`mergevq.generator.Generator`; saved as ``config.json`` with its weights."""

    name: str = "custom"
    # "ar" (raster LlamaGen) | "mergear" (merge instruction + sparse mask + compact KV cache) | "randar" (random order
    # over the K merged tokens, position instructions, parallel decoding) | "maskgit" (bidirectional, [MASK] tokens)
    kind: str = "ar"
    # ---- transformer size (LlamaGen: RMSNorm, SwiGLU, 2-D RoPE, no biases)
    depth: int = 12
    width: int = 768
    num_heads: int = 12
    ffn_hidden: int | None = None  # None: find_multiple(int(2·4·width/3), 256), LlamaGen's SwiGLU hidden size
    # ---- tokens
    codebook_bits: int = 14  # d; codes are integers in [0, 2^d)
    factorized_bits: tuple[int, ...] | None = None  # bit groups, lowest first; None: (d,) if d <= 14 else (d//3, rest)
    factorized_depth: int = 2  # causal intra-position blocks over [h_t, emb_0(i_0), ...] (factorised heads only)
    grid: tuple[int, int] = (16, 16)  # token grid (h, w); L = h·w raster positions
    num_classes: int = 1000  # a null class (index num_classes) is added for classifier-free guidance
    # ---- MergeAR / RandAR
    merge_levels: tuple[int, ...] = ()  # K values with a merge-instruction embedding (MergeAR and RandAR)
    window: int = 0  # MergeAR: the previous `window` positions are always visible, duplicates or not
    # RandAR: RoPE position of merged token of rank r. "2d": cell (r // c, r % c) of a c×c grid, c = ceil(√K);
    # "1d": (r, r), both halves of every head rotated by the rank.
    rank_layout: str = "2d"
    # ---- MaskGIT
    maskgit_steps: int = 12  # default decoding steps (MaskGIT: 8–16)
    # ---- regularisation and init
    class_dropout: float = 0.1  # labels replaced by the null class during training (enables CFG)
    token_dropout: float = 0.1  # dropout on the input embeddings
    resid_dropout: float = 0.1  # dropout on the attention output
    ffn_dropout: float = 0.1  # dropout on the SwiGLU output
    label_smoothing: float | None = None  # None: 0.1 for randar and maskgit (SPEC Table A2, MaskGIT), else 0
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # ---- provenance: the tokenizer whose token file trained this model (``mergevq.data.tokens.tokenizer_identity``:
    # preset, codebook bits, L, grid, image size); ``mergevq sample`` refuses a tokenizer that does not match it.
    tokenizer: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.grid = tuple(self.grid)  # type: ignore[assignment]
        self.merge_levels = tuple(self.merge_levels)
        if self.label_smoothing is None:
            self.label_smoothing = 0.1 if self.kind in ("randar", "maskgit") else 0.0
        if self.factorized_bits is None and isinstance(self.codebook_bits, int):
            d = self.codebook_bits
            self.factorized_bits = (d,) if d <= PLAIN_HEAD_MAX_BITS else (d // 3, d - d // 3)
        if self.factorized_bits is not None:
            self.factorized_bits = tuple(self.factorized_bits)
        self.validate()

    # ---- derived quantities
    @property
    def num_positions(self) -> int:
        """L, the number of raster positions."""
        return self.grid[0] * self.grid[1]

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden size."""
        return self.ffn_hidden if self.ffn_hidden is not None else find_multiple(int(2 * 4 * self.width / 3), 256)

    @property
    def bit_groups(self) -> tuple[int, ...]:
        """The resolved bit groups (one group = a plain head)."""
        assert self.factorized_bits is not None
        return self.factorized_bits

    @property
    def null_class(self) -> int:
        return self.num_classes

    def validate(self) -> None:
        def bad(key: str, msg: str) -> ValueError:
            return ValueError(f"GeneratorConfig.{key}: {msg}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if self.kind not in KINDS:
            raise bad("kind", f"{self.kind!r} is not one of {KINDS}")
        for key in ("depth", "width", "num_heads", "num_classes"):
            if not is_int(getattr(self, key)) or getattr(self, key) < 1:
                raise bad(key, f"must be a positive integer, got {getattr(self, key)!r}")
        if self.width % self.num_heads:
            raise bad("width", f"{self.width} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 4:
            raise bad("num_heads", f"head dim {self.head_dim} must be divisible by 4 (2-D RoPE rotates pairs per axis)")
        if self.ffn_hidden is not None and (not is_int(self.ffn_hidden) or self.ffn_hidden < 1):
            raise bad("ffn_hidden", f"must be a positive integer or None, got {self.ffn_hidden!r}")
        if not is_int(self.codebook_bits) or not 1 <= self.codebook_bits <= _MAX_BITS:
            raise bad("codebook_bits", f"must be an integer in [1, {_MAX_BITS}], got {self.codebook_bits!r}")
        bits = self.bit_groups
        if not bits or any(not is_int(b) or b < 1 for b in bits):
            raise bad("factorized_bits", f"must be positive integers, got {bits!r}")
        if sum(bits) != self.codebook_bits:
            raise bad("factorized_bits", f"{bits} sums to {sum(bits)}, not codebook_bits={self.codebook_bits}")
        if len(bits) == 1 and self.codebook_bits > PLAIN_HEAD_MAX_BITS:
            raise bad(
                "factorized_bits",
                f"a plain head over 2^{self.codebook_bits} codes is too large; split the bits, e.g. "
                f"({self.codebook_bits // 3}, {self.codebook_bits - self.codebook_bits // 3})",
            )
        if not is_int(self.factorized_depth) or self.factorized_depth < (1 if len(bits) > 1 else 0):
            raise bad("factorized_depth", f"must be >= 1 with factorised heads, got {self.factorized_depth!r}")
        if len(self.grid) != 2 or any(not is_int(g) or g < 1 for g in self.grid):
            raise bad("grid", f"must be two positive integers (h, w), got {self.grid!r}")
        length = self.num_positions
        if self.kind in MERGE_LEVEL_KINDS:
            if not self.merge_levels:
                raise bad("merge_levels", f"{self.kind!r} needs at least one merge level K")
            for k in self.merge_levels:
                if not is_int(k) or not 1 <= k <= length:
                    raise bad("merge_levels", f"{k!r} is outside [1, L={length}]")
            if len(set(self.merge_levels)) != len(self.merge_levels):
                raise bad("merge_levels", f"{self.merge_levels} has repeated values")
        elif self.merge_levels:
            raise bad(
                "merge_levels",
                f"only MergeAR and RandAR use merge levels, got {self.merge_levels} for kind={self.kind!r}",
            )
        if not is_int(self.window) or not 0 <= self.window < length:
            raise bad("window", f"must be an integer in [0, L={length}), got {self.window!r}")
        if self.rank_layout not in RANK_LAYOUTS:
            raise bad("rank_layout", f"must be one of {RANK_LAYOUTS}, got {self.rank_layout!r}")
        if not is_int(self.maskgit_steps) or self.maskgit_steps < 1:
            raise bad("maskgit_steps", f"must be a positive integer, got {self.maskgit_steps!r}")
        for key in ("class_dropout", "token_dropout", "resid_dropout", "ffn_dropout"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise bad(key, f"must be a probability in [0, 1], got {getattr(self, key)!r}")
        if not isinstance(self.label_smoothing, (int, float)) or not 0.0 <= self.label_smoothing < 1.0:
            raise bad("label_smoothing", f"must be in [0, 1), got {self.label_smoothing!r}")
        for key in ("rope_base", "norm_eps", "init_std"):
            if not getattr(self, key) > 0:
                raise bad(key, f"must be positive, got {getattr(self, key)!r}")
        if not isinstance(self.tokenizer, dict):
            raise bad("tokenizer", f"must be a mapping of tokenizer identity fields, got {self.tokenizer!r}")

    # ---- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> GeneratorConfig:
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object of generator settings, got {type(data).__name__}")
        check_config_keys(cls=cls, data=data, source=source, what="generator config")
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    def save(self, path: str | Path) -> None:
        save_config_json(path=path, data=self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> GeneratorConfig:
        return cls.from_dict(load_config_json(path=path, what="generator"), source=str(Path(path)))

    def replace(self, **overrides: Any) -> GeneratorConfig:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown generator config key(s) {unknown}")
        if "codebook_bits" in overrides and "factorized_bits" not in overrides:
            overrides["factorized_bits"] = None  # re-derive the groups for the new bit count
        if "kind" in overrides and "label_smoothing" not in overrides:
            overrides["label_smoothing"] = None  # re-derive the kind's default
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_preset(cls, name: str, **task: Any) -> GeneratorConfig:
        """A preset's size with the task settings (and any other field) given as keywords."""
        if name not in PRESETS:
            raise ValueError(f"unknown generator preset {name!r}; choose one of {preset_names()}")
        return PRESETS[name](**task)


def _size(name: str, depth: int, width: int, num_heads: int) -> Callable[..., GeneratorConfig]:
    def build(**task: Any) -> GeneratorConfig:
        return GeneratorConfig(**{"name": name, "depth": depth, "width": width, "num_heads": num_heads, **task})

    return build


PRESETS: dict[str, Callable[..., GeneratorConfig]] = {
    "B": _size("B", 12, 768, 12),
    "L": _size("L", 24, 1024, 16),
    "XL": _size("XL", 36, 1280, 20),
    "small": _size("small", 8, 256, 8),
    "tiny": _size("tiny", 6, 192, 6),
}


def preset_names() -> list[str]:
    return list(PRESETS)
