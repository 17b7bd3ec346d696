"""Stage 2: class-conditional generators over tokenizer codes (vanilla raster AR, MergeAR, RandAR, MaskGIT).

>>> from mergevq.generator import Generator
>>> gen = Generator.from_preset("tiny", kind="ar", codebook_bits=10, grid=(4, 4), num_classes=10)
"""

from mergevq.generator.config import PRESETS, GeneratorConfig, find_multiple, preset_names
from mergevq.generator.kv_cache import CompactKVCache, StaticKVCache
from mergevq.generator.maskgit import maskgit_schedule
from mergevq.generator.mergear import Groups, first_occurrence, groups_from_values, mergear_mask
from mergevq.generator.model import GenerationOutput, GenerationStats, Generator, GeneratorOutput
from mergevq.generator.randar import randar_schedule, rank_positions

__all__ = [
    "PRESETS",
    "CompactKVCache",
    "GenerationOutput",
    "GenerationStats",
    "Generator",
    "GeneratorConfig",
    "GeneratorOutput",
    "Groups",
    "StaticKVCache",
    "find_multiple",
    "first_occurrence",
    "groups_from_values",
    "maskgit_schedule",
    "mergear_mask",
    "preset_names",
    "randar_schedule",
    "rank_positions",
]
