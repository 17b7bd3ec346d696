"""The shape every ``mergevq train-*`` command shares: ``CONFIG [key=value ...]`` plus a few flags.

A training command is described once by a :class:`TrainCommand`; :func:`add_train_command` adds it to ``mergevq``
and :func:`standalone_main` runs it on its own (``python -m mergevq.commands.train_<name>``). Options may be written
after the overrides (``... max_steps=10 --no-progress``), which plain argparse would take for overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mergevq.train.config_io import ConfigError, dump_yaml

__all__ = [
    "COMMON_FLAGS",
    "TrainCommand",
    "add_train_command",
    "keys_help",
    "load_or_report",
    "split_overrides",
    "standalone_main",
]

T = TypeVar("T")

# Flags every training command has: option → help. A command adds its own in TrainCommand.flags.
COMMON_FLAGS: dict[str, str] = {
    "--print-config": "print the resolved config as YAML and exit",
    "--no-progress": "no progress bar (logs are still written)",
}


@dataclass(frozen=True)
class TrainCommand:
    name: str  # the sub-command, e.g. "train-tokenizer"
    help: str  # one line for `mergevq --help`
    description: str
    epilog: str  # config keys and notes, pre-formatted
    config_help: str  # help of the CONFIG argument
    run: Callable[[argparse.Namespace], int]
    flags: Mapping[str, str] = field(default_factory=dict)  # extra store_true options → help

    @property
    def all_flags(self) -> dict[str, str]:
        return {**self.flags, **COMMON_FLAGS}

    @property
    def usage(self) -> str:
        extra = " | ".join(self.flags)
        first = f"[{extra} | --print-config]" if extra else "[--print-config]"
        return f"%(prog)s {first} [--no-progress] CONFIG [key=value ...]"


def keys_help(cls: type, *, source: str, notes: Mapping[str, str] | None = None) -> str:
    """Every key of recipe dataclass ``cls``, grouped by section (``notes``: text added after a section's keys)."""
    notes = notes or {}
    lines = [f"config keys (defaults and comments: {source}; examples: configs/):"]
    top = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        default = getattr(defaults, f.name)
        if dataclasses.is_dataclass(default):
            names = ", ".join(g.name for g in dataclasses.fields(default))
            if f.name in notes:
                names += f" ({notes[f.name]})"
            body = textwrap.fill(names, width=100, subsequent_indent=" " * 14)
            lines.append(f"  {f.name + '.':<11} {body}")
        else:
            top.append(f.name)
    lines.append("  " + textwrap.fill(", ".join(top), width=110, subsequent_indent="  "))
    return "\n".join(lines) + "\n\n"


def _add_arguments(parser: argparse.ArgumentParser, command: TrainCommand) -> None:
    parser.add_argument("config", help=command.config_help)
    # REMAINDER so that options may follow the overrides (plain nargs="*" stops at the first option).
    parser.add_argument(
        "overrides", nargs=argparse.REMAINDER, metavar="key=value", help="config overrides, e.g. optim.lr=2e-4"
    )
    for option, text in command.all_flags.items():
        parser.add_argument(option, action="store_true", help=text)
    parser.set_defaults(func=command.run, _parser=parser, _flags=command.all_flags)


def add_train_command(subparsers: Any, command: TrainCommand) -> argparse.ArgumentParser:
    """Add ``command`` to the ``mergevq`` sub-command parsers."""
    parser = subparsers.add_parser(
        command.name,
        help=command.help,
        description=command.description,
        usage=command.usage,
        epilog=command.epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser, command)
    return parser


def standalone_main(command: TrainCommand, argv: list[str] | None = None) -> int:
    """Run ``command`` as its own program (what ``python -m mergevq.commands.<module>`` does)."""
    parser = argparse.ArgumentParser(
        prog=f"mergevq {command.name}",
        description=command.description,
        usage=command.usage,
        epilog=command.epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser, command)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def split_overrides(args: argparse.Namespace) -> list[str] | int:
    """Move options written after the overrides onto ``args``; returns the overrides, or an exit code."""
    flags: dict[str, str] = args._flags
    overrides = []
    for token in args.overrides:
        if token in flags:
            setattr(args, token.lstrip("-").replace("-", "_"), True)
        elif token in ("-h", "--help"):
            args._parser.print_help()
            return 0
        elif token.startswith("-"):
            print(f"error: unknown option {token!r} (options: {', '.join(flags)})", file=sys.stderr)
            return 2
        else:
            overrides.append(token)
    return overrides


def load_or_report(load: Callable[..., T], args: argparse.Namespace) -> T | int:
    """Parse the overrides and load the recipe, or report the problem in one line: an exit code (0 after --help).

    With ``--print-config`` the resolved recipe is printed and 0 returned.
    """
    overrides = split_overrides(args)
    if isinstance(overrides, int):
        return overrides
    try:
        config = load(Path(args.config), overrides=overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(config, compact=False), end="")
        return 0
    return config
