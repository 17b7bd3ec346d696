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
    keys_help,
    load_or_report,
    run_export,
    run_training,
    standalone_main,
)
from mergevq.train.recipe import TrainConfig, load_config
from mergevq.train.tokenizer import export_latest, train

__all__ = ["main", "register"]

_EPILOG = """\
overrides:
  Any config key as section.key=value, parsed as YAML, e.g.
    max_steps=2000 batch_size=16 optim.lr=2e-4 optim.betas=[0.5,0.9] data.val=null
    model.preset=tiny-64 model.overrides.codebook_bits=12 loss.reconstruction=l2 recipe=paper
  An unknown key or a wrongly typed value stops with a one-line error (exit code 2).

output (output_dir):
  config.yaml       the fully resolved config of the latest launch
  checkpoints/      step_NNNNNNNN/ (model, EMA, discriminator safetensors + state.pt); the newest is resumed
  logs/             train.log, train.jsonl, tb/ (TensorBoard), images/ (validation grids)
  export/           the EMA tokenizer, loadable with MergeVQ.from_pretrained

Running the same command again resumes from the newest intact checkpoint ("Resuming from step N (...)"); a
damaged one is reported and the next older one used. Changing the recipe on resume (batch size, learning rate, seed,
data, ...) is refused unless resume.allow_changes=true; max_steps, logging, checkpointing, workers and threads may
change freely. One run per output_dir at a time (output_dir/.lock).
A step with a NaN/inf loss or gradient is skipped with a warning; after nonfinite.max_skips of them the run stops
(exit code 1), its checkpoints all finite.
Multi-GPU / multi-node: torchrun --nproc_per_node=N -m mergevq train-tokenizer CONFIG [key=value ...]
SIGTERM/SIGINT save a checkpoint after the current step, then exit with code 143/130 ("interrupted at step N").
"""


def _run(args: argparse.Namespace) -> int:
    config = load_or_report(load_config, args)
    if isinstance(config, int):
        return config
    if args.export_only:
        return run_export(lambda: export_latest(config.output_dir), what="EMA tokenizer")
    return run_training(lambda: train(config, progress=not args.no_progress), unit="images")


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
    run=_run,
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
