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
    keys_help,
    load_or_report,
    run_export,
    run_training,
    standalone_main,
)
from mergevq.train.generator import export_latest, train
from mergevq.train.generator_recipe import GeneratorTrainConfig, load_config

__all__ = ["main", "register"]

_EPILOG = """\
overrides:
  Any config key as section.key=value, parsed as YAML, e.g.
    max_steps=2000 batch_size=32 optim.lr=1e-3 data.val=null model.kind=randar data.num_tokens=[16,32]
    model.preset=small model.overrides.window=8 model.overrides.label_smoothing=0.1 ema_decay=null
  An unknown key or a wrongly typed value stops with a one-line error (exit code 2).

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

Running the same command again resumes from the newest intact checkpoint ("Resuming from step N (...)"); a
damaged one is reported and the next older one used. Changing the recipe on resume (batch size, learning rate, seed,
data, ...) is refused unless resume.allow_changes=true; max_steps, logging, checkpointing, validation and threads may
change freely. One run per output_dir at a time (output_dir/.lock).
A step with a NaN/inf loss or gradient is skipped with a warning; after nonfinite.max_skips of them the run stops
(exit code 1), its checkpoints all finite.
Multi-GPU / multi-node: torchrun --nproc_per_node=N -m mergevq train-generator CONFIG [key=value ...]
SIGTERM/SIGINT save a checkpoint after the current step, then exit with code 143/130 ("interrupted at step N").
"""


def _run(args: argparse.Namespace) -> int:
    config = load_or_report(load_config, args)
    if isinstance(config, int):
        return config
    if args.export_only:
        return run_export(lambda: export_latest(config.output_dir), what="generator")
    return run_training(lambda: train(config, progress=not args.no_progress), unit="token grids")


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
    run=_run,
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
