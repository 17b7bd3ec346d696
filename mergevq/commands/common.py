"""Helpers shared by the sub-commands: errors, device choice, model loading, progress bars and K validation."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from mergevq.data.images import SkippedImageWarning
from mergevq.tokenizer.config import preset_names
from mergevq.tokenizer.model import CONFIG_NAME, WEIGHTS_NAME, MergeVQ

__all__ = [
    "DEVICE_CHOICES",
    "CommandError",
    "HelpFormatter",
    "add_device_argument",
    "check_output_dir",
    "check_output_file",
    "one_line_skip_warnings",
    "positive_int",
    "check_num_tokens",
    "load_model",
    "progress",
    "report_error",
    "resolve_device",
]

T = TypeVar("T")

DEVICE_CHOICES = ("auto", "cpu", "cuda")


class CommandError(Exception):
    """A problem the user can fix (bad argument, missing file); reported as one line with exit code ``code``."""

    def __init__(self, message: str, *, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the hand-wrapped description and examples; appends a default only where there is a real one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS)
        if action.option_strings and shown and "%(default)" not in text and "(default:" not in text:
            text += " (default: %(default)s)"
        return text


def report_error(command: str, error: CommandError) -> int:
    """Print ``mergevq COMMAND: error: MESSAGE`` on one line to stderr and return the exit code."""
    message = " ".join(str(error).split())  # one line, whatever the underlying exception put in it
    print(f"mergevq {command}: error: {message}", file=sys.stderr)
    return error.code


def guarded(command: str, body: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command body so that a :class:`CommandError` becomes a one-line message and its exit code."""

    def run(args: argparse.Namespace) -> int:
        try:
            return body(args)
        except CommandError as error:
            return report_error(command, error)

    return run


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=DEVICE_CHOICES,
        default="auto",
        help="where to run the model: 'auto' picks cuda when available, else cpu",
    )


def resolve_device(name: str) -> torch.device:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; asking for ``cuda`` without one is an error."""
    if name not in DEVICE_CHOICES:
        raise CommandError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda was requested but no CUDA device is available (use --device cpu)")
    return torch.device(name)


def _model_dir_hint(directory: Path) -> str:
    # Training runs keep the exported EMA model in export/; pointing at the run folder is the usual mistake.
    if (directory / "export" / CONFIG_NAME).is_file():
        return f"; this looks like a training run, try --model {directory / 'export'}"
    if (directory / "checkpoints").is_dir():
        return "; this looks like a training run without an export (run the export step first)"
    return f" (a model directory holds {CONFIG_NAME} and {WEIGHTS_NAME}, as written by MergeVQ.save_pretrained)"


def load_model(
    *, model_dir: str | Path | None = None, preset: str | None = None, device: torch.device, seed: int = 0
) -> MergeVQ:
    """Load ``model_dir`` (``from_pretrained``) or build a randomly initialised ``preset``, in eval mode on ``device``.

    Every failure is a :class:`CommandError` naming the directory and what is missing or wrong.
    """
    if (model_dir is None) == (preset is None):
        raise CommandError("give exactly one of --model DIR or --preset NAME")
    if preset is not None:
        if preset not in preset_names():
            raise CommandError(f"unknown preset {preset!r}; available: {', '.join(preset_names())}")
        torch.manual_seed(seed)  # the same untrained weights on every run, so outputs are comparable
        model = MergeVQ.from_preset(preset)
    else:
        directory = Path(model_dir).expanduser()  # type: ignore[arg-type]
        if not directory.is_dir():
            raise CommandError(f"model directory not found: {directory}")
        missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / name).is_file()]
        if missing:
            raise CommandError(
                f"{directory} is not a model directory: missing {', '.join(missing)}" + _model_dir_hint(directory)
            )
        try:
            # from_pretrained checks the config's types and that every weight is finite (a diverged run's export).
            model = MergeVQ.from_pretrained(directory)
        except (OSError, ValueError, TypeError) as exc:
            raise CommandError(f"cannot load the model in {directory}: {exc}") from exc
    return model.to(device).eval()


def _check_writable_dir(directory: Path, *, option: str, path: Path) -> None:
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the folder that would hold the new ones
    if not existing.is_dir():
        raise CommandError(f"{option} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CommandError(f"{option} {path}: {existing} is not writable")


def check_output_file(path: str | Path, *, option: str = "--output") -> Path:
    """Fail now, before any work, when the file ``path`` could not be written later; creates nothing."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise CommandError(f"{option} {path} is a directory; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise CommandError(f"{option} {path} exists and is not writable")
    _check_writable_dir(path.parent, option=option, path=path)
    return path


def check_output_dir(path: str | Path, *, option: str = "--output") -> Path:
    """Fail now, before any work, when the folder ``path`` could not be created or written; creates nothing."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise CommandError(f"{option} {path} exists and is not a directory")
    _check_writable_dir(path, option=option, path=path)
    return path


def check_num_tokens(values: Iterable[int], *, model: MergeVQ) -> list[int]:
    """Every K must lie in ``[1, L]``; the error names K, L and the preset. Duplicates are dropped, order kept."""
    full = model.config.num_tokens_full
    out: list[int] = []
    for k in values:
        if not 1 <= k <= full:
            grid = model.config.grid_size
            raise CommandError(
                f"--num-tokens K={k} is outside [1, L={full}] for preset {model.config.name!r} ({grid}x{grid} grid)"
            )
        if k not in out:
            out.append(k)
    return out


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str, unit: str = "it") -> tqdm:
    """A tqdm bar on stderr (iterate it, or use it as a context manager and call ``update``).

    It hides itself when stderr is not a terminal (logs, CI, tests), so redirected output stays clean.
    """
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=None, file=sys.stderr, dynamic_ncols=True)


@contextlib.contextmanager
def one_line_skip_warnings(command: str) -> Iterator[None]:
    """Show :class:`SkippedImageWarning` as ``mergevq COMMAND: warning: ...`` (one line, no source location).

    Data-loader workers forked inside the block inherit the formatting; other warnings are shown as usual.
    """
    with warnings.catch_warnings():
        default = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
            if issubclass(category, SkippedImageWarning):
                print(f"mergevq {command}: warning: {message}", file=sys.stderr)
            else:
                default(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield
