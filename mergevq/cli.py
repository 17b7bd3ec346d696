"""The ``mergevq`` command: one sub-command per module, each registering its own parser.

A command module exposes ``register(subparsers)``, which adds its parser and sets ``func`` (called with the parsed
namespace, returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that register sub-commands, in the order they appear in ``mergevq --help``.
_COMMAND_MODULES: tuple[str, ...] = (
    "mergevq.commands.train_tokenizer",
    "mergevq.commands.train_generator",
    "mergevq.commands.reconstruct",
    "mergevq.commands.encode",
    "mergevq.commands.sample",
    "mergevq.commands.finetune_recovery",
    "mergevq.commands.evaluate",
    "mergevq.commands.benchmark",
    "mergevq.commands.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mergevq",
        description=(
            "MergeVQ: token-merging visual tokenizer and its generators "
            "(train, reconstruct, encode, sample, evaluate, benchmark, demo)."
        ),
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        # Importing the commands loads torch, seconds during which Ctrl-C would break an import half-way.
        from mergevq.commands.signals import exit_on_signal

        with exit_on_signal("while starting"):
            parser = build_parser()
            args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C in a command without its own handling
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
