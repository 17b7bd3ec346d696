"""MergeVQ: a visual tokenizer that merges ViT tokens, quantizes them lookup-free and recovers the full grid; and the
stage-2 generators that sample its tokens.

>>> from mergevq import Generator, MergeVQ
>>> tok = MergeVQ.from_preset("tiny-32")
"""

from mergevq.generator import GenerationOutput, Generator, GeneratorConfig, GeneratorOutput
from mergevq.tokenizer.config import PRESETS, TokenizerConfig, get_preset, preset_names
from mergevq.tokenizer.model import Encoded, MergeVQ, TokenizerOutput

__version__ = "0.1.0"

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
