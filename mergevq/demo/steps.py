"""Running the project's own commands from the demo, so that what it reports is exactly what a user would type."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["StageFailed", "run_cli", "train_recipe"]


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
