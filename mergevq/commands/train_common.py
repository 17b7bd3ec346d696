"""The shape every ``mergevq train-*`` command shares: ``CONFIG [key=value ...]`` plus a few flags.

A training command is described once by a :class:`TrainCommand`; :func:`add_train_command` adds it to ``mergevq``
and :func:`standalone_main` runs it on its own (``python -m mergevq.commands.train_<name>``). Options may be written
after the overrides (``... max_steps=10 --no-progress``), which plain argparse would take for overrides.

Exit codes, the same for every training command (:func:`run_training` and the wrapper around ``TrainCommand.run``):
0 finished; 2 a configuration problem; 1 a run problem (diverged, output directory busy or not writable, disk full,
no intact checkpoint), each reported in one line; 130 / 143 stopped by SIGINT / SIGTERM (after saving a checkpoint
when the loop was running: "interrupted at step N; run the same command to resume").
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mergevq.commands.signals import exit_on_signal
from mergevq.train.checkpoint import CheckpointDamaged
from mergevq.train.config_io import ConfigError, dump_yaml
from mergevq.train.output_lock import locks_released_on_exit
from mergevq.train.runtime import RunError

__all__ = [
    "COMMON_FLAGS",
    "TrainCommand",
    "add_train_command",
    "command_runner",
    "keys_help",
    "load_or_report",
    "overrides_help",
    "resume_help",
    "run_export",
    "run_training",
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


def overrides_help(*, examples: Sequence[str]) -> str:
    """The epilog's ``overrides:`` paragraph (``examples``: lines of sample overrides)."""
    lines = ["overrides:", "  Any config key as section.key=value, parsed as YAML, e.g."]
    lines += [f"    {line}" for line in examples]
    lines.append("  An unknown key or a wrongly typed value stops with a one-line error (exit code 2).")
    return "\n".join(lines) + "\n"


def resume_help(*, name: str, free_keys: str) -> str:
    """The epilog's closing paragraph: resuming, one run per directory, non-finite steps, torchrun and signals
    (``free_keys``: the command's own keys that may change on resume, besides max_steps, logging, checkpointing and
    threads)."""
    return f"""\
Running the same command again resumes from the newest intact checkpoint ("Resuming from step N (...)"); a
damaged one is reported and the next older one used. Changing the recipe on resume (batch size, learning rate, seed,
data, ...) is refused unless resume.allow_changes=true; max_steps, logging, checkpointing, {free_keys} and threads may
change freely. One run per output_dir at a time (output_dir/.lock).
A step with a NaN/inf loss or gradient is skipped with a warning; after nonfinite.max_skips of them the run stops
(exit code 1), its checkpoints all finite.
Multi-GPU / multi-node: torchrun --nproc_per_node=N -m mergevq {name} CONFIG [key=value ...]
SIGTERM/SIGINT save a checkpoint after the current step, then exit with code 143/130 ("interrupted at step N").
"""


def command_runner(
    *,
    load: Callable[..., Any],
    train: Callable[..., Any],
    export_latest: Callable[[str], Path],
    what: str,
    unit: str,
) -> Callable[[argparse.Namespace], int]:
    """``TrainCommand.run`` of a training command: load the recipe, then train it, or with ``--export-only`` export
    the newest checkpoint (``what``: the exported model in the message; ``unit``: what the throughput counts)."""

    def run(args: argparse.Namespace) -> int:
        config = load_or_report(load, args)
        if isinstance(config, int):
            return config
        if args.export_only:
            return run_export(lambda: export_latest(config.output_dir), what=what)
        return run_training(lambda: train(config, progress=not args.no_progress), unit=unit)

    return run


def _add_arguments(parser: argparse.ArgumentParser, command: TrainCommand) -> None:
    parser.add_argument("config", help=command.config_help)
    # REMAINDER so that options may follow the overrides (plain nargs="*" stops at the first option).
    parser.add_argument(
        "overrides", nargs=argparse.REMAINDER, metavar="key=value", help="config overrides, e.g. optim.lr=2e-4"
    )
    for option, text in command.all_flags.items():
        parser.add_argument(option, action="store_true", help=text)
    parser.set_defaults(func=_reported(command.run), _parser=parser, _flags=command.all_flags)


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
    args._loaded_config = config  # lets an error without a file name name the output directory
    return config


# ----------------------------------------------------------------------------------------------------------------------
# Running: outcomes and failures as exit codes and one-line messages
# ----------------------------------------------------------------------------------------------------------------------


def _error(message: str) -> None:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


def _os_error_text(e: OSError, args: argparse.Namespace) -> str:
    if e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    output_dir = getattr(getattr(args, "_loaded_config", None), "output_dir", None)
    if e.strerror and output_dir is not None:  # a failed write() names no file; say where the run writes
        return f"{e.strerror} while writing under output_dir {output_dir}"
    return str(e)


def _reported(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``run`` with the failures every training command shares turned into exit codes and one-line messages."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            # Outside the loop's steps (start-up, export) there is nothing to save: a signal ends the process at
            # once. Whatever the loop did, the output_dir lock it took ends with the command.
            outside = "outside the training steps; run the same command to resume"
            with exit_on_signal(outside), locks_released_on_exit():
                return int(run(args) or 0)
        except KeyboardInterrupt:  # a second Ctrl-C during the steps aborts at once
            print("interrupted; run the same command to resume from the newest checkpoint", file=sys.stderr)
            return 128 + signal.SIGINT
        except ConfigError as e:
            _error(str(e))
            return 2
        except (RunError, CheckpointDamaged) as e:
            _error(str(e))
            return 1
        except OSError as e:  # disk full, read-only or vanished paths: the checkpoint writer keeps older ones intact
            _error(_os_error_text(e, args))
            return 1

    return wrapped


def run_training(train: Callable[[], Any], *, unit: str = "images") -> int:
    """Run ``train()`` (a loop returning a result with ``step``, ``rank``, ``interrupted_by`` and a throughput
    ``images_per_second``) and turn its outcome into the exit code.

    Finished: ``done: N steps, R <unit>/s`` and 0. Stopped by a signal (the loop saved a checkpoint first):
    ``interrupted at step N; run the same command to resume`` and 128 + the signal (130 SIGINT, 143 SIGTERM).
    Exceptions are left to the command wrapper (one-line messages, exit codes 1 and 2).
    """
    result = train()
    signum = getattr(result, "interrupted_by", None)
    main = getattr(result, "rank", 0) == 0
    if signum is not None:
        if main:
            print(f"interrupted at step {result.step}; run the same command to resume", file=sys.stderr, flush=True)
        return 128 + int(signum)
    rate = getattr(result, "images_per_second", None)
    if main and rate is not None:
        print(f"done: {result.step} steps, {rate:.1f} {unit}/s (training only)", flush=True)
    return 0


def run_export(export: Callable[[], Path], *, what: str) -> int:
    """``--export-only``: export the newest intact checkpoint (a damaged newer one is reported and skipped)."""
    try:
        path = export()
    except FileNotFoundError as e:
        _error(str(e))
        return 1
    print(f"exported the {what} to {path}")
    return 0
