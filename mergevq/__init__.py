"""MergeVQ: a visual tokenizer that merges ViT tokens, quantizes them lookup-free and recovers the full grid; and the
stage-2 generators that sample its tokens.

>>> from mergevq import Generator, MergeVQ
>>> tok = MergeVQ.from_preset("tiny-32")

The names below are imported on first use, so that ``import mergevq.cli`` (what the ``mergevq`` command runs first)
does not load torch before the command can handle Ctrl-C.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mergevq.generator import GenerationOutput, Generator, GeneratorConfig, GeneratorOutput
    from mergevq.tokenizer.config import PRESETS, TokenizerConfig, get_preset, preset_names
    from mergevq.tokenizer.model import Encoded, MergeVQ, TokenizerOutput

__version__ = "0.1.0"

_EXPORTS = {
    "GenerationOutput": "mergevq.generator",
    "Generator": "mergevq.generator",
    "GeneratorConfig": "mergevq.generator",
    "GeneratorOutput": "mergevq.generator",
    "PRESETS": "mergevq.tokenizer.config",
    "TokenizerConfig": "mergevq.tokenizer.config",
    "get_preset": "mergevq.tokenizer.config",
    "preset_names": "mergevq.tokenizer.config",
    "Encoded": "mergevq.tokenizer.model",
    "MergeVQ": "mergevq.tokenizer.model",
    "TokenizerOutput": "mergevq.tokenizer.model",
}

__all__ = [
    "PRESETS",
    "Encoded",
    "GenerationOutput",
    "Generator",
    "GeneratorConfig",
    "GeneratorOutput",
    "MergeVQ",
    "TokenizerConfig",
    "TokenizerOutput",
    "get_preset",
    "preset_names",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mergevq' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
