"""Running the project's own commands from the demo, so that what it reports is exactly what a user would type."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["StageFailed", "run_cli", "train_from_recipe", "train_recipe"]


class StageFailed(RuntimeError):
    """A command run by the demo failed; it has already printed why."""


def run_cli(argv: Sequence[object]) -> str:
    """Run ``mergevq ARGV`` in this process (arguments as text); returns the command line; a non-zero exit raises
    :class:`StageFailed`."""
    import mergevq.cli  # not at the top: mergevq.cli imports the demo command, which imports this module

    words = [str(a) for a in argv]
    command = "mergevq " + shlex.join(words)
    code = mergevq.cli.main(words)
    if code != 0:
        raise StageFailed(f"`{command}` exited with code {code}")
    return command


def train_recipe(*, path: Path, values: dict[str, Any], command: str) -> Path:
    """Write a training recipe (YAML) that the demo runs, headed by the command that reruns it."""
    import yaml

    header = f"# Written by `mergevq demo`. Rerun this stage with:\n#   {command}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(values, sort_keys=False, default_flow_style=None, width=110))
    return path


def train_from_recipe(
    *, path: Path, values: dict[str, Any], command: str, load_config: Any, train: Any, progress: bool
) -> Any:
    """Write the recipe, run the stage's training loop on it, and return its result (which has an export).

    ``load_config`` / ``train`` are the stage's own (tokenizer or generator). An interrupted run raises
    KeyboardInterrupt: the loop saved a checkpoint, and the command reports the interruption.
    """
    train_recipe(path=path, values=values, command=command)
    result = train(load_config(path), progress=progress)
    if result.interrupted_by is not None:
        raise KeyboardInterrupt
    assert result.export is not None
    return result
