"""``mergevq train-generator CONFIG [key=value ...]``: train (or resume) a stage-2 generator on a token file.

Also runnable on its own, which is what torchrun launches::

    torchrun --nproc_per_node=8 -m mergevq train-generator configs/imagenet/mergear-l.yaml
    python -m mergevq.commands.train_generator configs/cifar10/ar.yaml max_steps=10
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
from mergevq.train.generator import export_latest, train
from mergevq.train.generator_recipe import GeneratorTrainConfig, load_config

__all__ = ["main", "register"]

_OVERRIDES = overrides_help(
    examples=[
        "max_steps=2000 batch_size=32 optim.lr=1e-3 data.val=null model.kind=randar data.num_tokens=[16,32]",
        "model.preset=small model.overrides.window=8 model.overrides.label_smoothing=0.1 ema_decay=null",
    ]
)

_NOTES = """\
tokens (data.train, data.val: files written by `mergevq encode --num-tokens K ...`):
  codebook bits, grid, classes and the tokenizer identity come from the token file. Vanilla AR (model.kind=ar) and
  MaskGIT (maskgit) train on K = L, which the file must store; MergeAR (mergear) and RandAR (randar) draw K per
  optimizer step from their merge levels (data.num_tokens; default: every stored K below L) with
  merge.distribution (default uniform).
  Labels all -1 (a flat folder) train a one-class generator; mixed -1 and class labels are refused.
  A val file or a checkpoint from another tokenizer, or a K the file does not store, is a one-line error (exit 2).

output (output_dir):
  config.yaml       the fully resolved config of the latest launch
  checkpoints/      step_NNNNNNNN/ (model, EMA when ema_decay is set, state.pt); the newest is resumed
  logs/             train.log, train.jsonl, tb/ (TensorBoard)
  export/           the (EMA) generator, loadable with Generator.from_pretrained and `mergevq sample`
"""

_EPILOG = "\n".join([_OVERRIDES, _NOTES, resume_help(name="train-generator", free_keys="validation")])


COMMAND = TrainCommand(
    name="train-generator",
    help="train (or resume) a stage-2 generator (vanilla AR, MergeAR, RandAR or MaskGIT) on a token file",
    description="Train a class-conditional generator over MergeVQ tokens (stage 2): vanilla raster AR, MergeAR with "
    "merge instructions, RandAR over the merged tokens, or MaskGIT; cross-entropy per bit group; optional EMA; "
    "resumable checkpoints; DDP under torchrun.",
    epilog=keys_help(
        GeneratorTrainConfig,
        source="mergevq/train/generator_recipe.py",
        notes={"model": "overrides.<any GeneratorConfig field but the token file's>"},
    )
    + _EPILOG,
    config_help="YAML training config (see configs/cifar10/{ar,mergear,randar,maskgit}.yaml, "
    "configs/imagenet/*-l.yaml)",
    run=command_runner(
        load=load_config, train=train, export_latest=export_latest, what="generator", unit="token grids"
    ),
    flags={"--export-only": "do not train: save the (EMA) generator of the newest checkpoint to output_dir/export"},
)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``train-generator`` to the ``mergevq`` command."""
    return add_train_command(subparsers, COMMAND)


def main(argv: list[str] | None = None) -> int:
    """``python -m mergevq.commands.train_generator`` (the same as ``mergevq train-generator``)."""
    return standalone_main(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
