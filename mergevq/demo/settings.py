"""How much the demo does: one set of numbers for the full run (minutes on 2 CPU cores) and one for a smoke run.

Everything is counted in steps and images, never in seconds, so a demo run is reproducible: the same settings and
seed give the same models and pictures on the same machine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["DemoSettings"]


@dataclass(frozen=True)
class DemoSettings:
    # Data: random crops of the training photos, resized to several shorter sides (pixels).
    crops_per_photo: int = 400
    crop_scales: tuple[int, ...] = (96, 128, 160)
    eval_crops_per_photo: int = 8  # held-out crops per held-out photo, at photo_side
    photo_side: int = 128  # whole held-out photos are shown at this shorter side, tiled into the tokenizer's size
    panels_per_photo: int = 2  # reconstruction panels (with merge maps) per held-out photo
    # Stage 1: the tokenizer (preset tiny-32: 32x32 images, L = 64 tokens).
    tokenizer_preset: str = "tiny-32"
    tokenizer_steps: int = 400
    tokenizer_batch: int = 16
    tokenizer_lr: float = 1.0e-3
    # Stage 2: a MergeAR generator on the tokens of the training crops, the source photo as the class.
    generator_kind: str = "mergear"
    generator_preset: str = "tiny"
    generator_depth: int = 2
    generator_steps: int = 120
    generator_batch: int = 16
    generator_lr: float = 2.0e-3
    samples_per_class: int = 8
    lpips: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("crops_per_photo", "eval_crops_per_photo", "photo_side", "tokenizer_steps", "tokenizer_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"demo setting {name} must be >= 1, got {getattr(self, name)}")
        for name in ("generator_steps", "generator_batch", "samples_per_class", "generator_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"demo setting {name} must be >= 1, got {getattr(self, name)}")
        if not self.crop_scales:
            raise ValueError("demo setting crop_scales must name at least one size")

    @classmethod
    def quick(cls) -> DemoSettings:
        """A smoke run of every stage in well under a minute: the models stay close to their initialisation."""
        return cls(
            crops_per_photo=16,
            eval_crops_per_photo=2,
            photo_side=64,
            panels_per_photo=1,
            tokenizer_steps=4,
            tokenizer_batch=8,
            generator_depth=1,
            generator_steps=4,
            generator_batch=8,
            samples_per_class=2,
        )

    def replace(self, **changes: object) -> DemoSettings:
        """A copy with ``changes`` (None values are ignored, so unset command-line options keep the defaults)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})
