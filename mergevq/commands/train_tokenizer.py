"""``mergevq train-tokenizer CONFIG [key=value ...]``: train (or resume) a MergeVQ tokenizer.

Also runnable on its own, which is what torchrun launches::

    torchrun --nproc_per_node=8 -m mergevq train-tokenizer configs/imagenet/gr-d64.yaml
    python -m mergevq.commands.train_tokenizer configs/cifar10/gr.yaml max_steps=10
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mergevq.commands.train_common import (
    TrainCommand,
    add_train_command,
    command_runner,
    keys_help,
    overrides_help,
    resume_help,
    standalone_main,
)
from mergevq.train.recipe import TrainConfig, load_config
from mergevq.train.tokenizer import export_latest, train

__all__ = ["main", "register"]

_OVERRIDES = overrides_help(
    examples=[
        "max_steps=2000 batch_size=16 optim.lr=2e-4 optim.betas=[0.5,0.9] data.val=null",
        "model.preset=tiny-64 model.overrides.codebook_bits=12 loss.reconstruction=l2 recipe=paper",
    ]
)

_OUTPUT = """\
output (output_dir):
  config.yaml       the fully resolved config of the latest launch
  checkpoints/      step_NNNNNNNN/ (model, EMA, discriminator safetensors + state.pt); the newest is resumed
  logs/             train.log, train.jsonl, tb/ (TensorBoard), images/ (validation grids)
  export/           the EMA tokenizer, loadable with MergeVQ.from_pretrained
"""

_EPILOG = "\n".join([_OVERRIDES, _OUTPUT, resume_help(name="train-tokenizer", free_keys="workers")])


COMMAND = TrainCommand(
    name="train-tokenizer",
    help="train (or resume) a MergeVQ tokenizer",
    description="Train a MergeVQ tokenizer (stage 1): reconstruction, perceptual, adversarial, LFQ, source "
    "recovery and alignment losses; EMA weights; resumable checkpoints; DDP under torchrun.",
    epilog=keys_help(
        TrainConfig,
        source="mergevq/train/recipe.py",
        notes={"model": "overrides.<any TokenizerConfig field>"},
    )
    + _EPILOG,
    config_help="YAML training config (see configs/cifar10/*.yaml, configs/imagenet/*.yaml)",
    run=command_runner(load=load_config, train=train, export_latest=export_latest, what="EMA tokenizer", unit="images"),
    flags={
        "--export-only": "do not train: save the EMA tokenizer of the newest checkpoint to output_dir/export and exit"
    },
)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``train-tokenizer`` to the ``mergevq`` command."""
    return add_train_command(subparsers, COMMAND)


def main(argv: list[str] | None = None) -> int:
    """``python -m mergevq.commands.train_tokenizer`` (the same as ``mergevq train-tokenizer``)."""
    return standalone_main(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
