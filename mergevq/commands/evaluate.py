"""``mergevq evaluate tokenizer|generator|probe``: dataset-level metrics written to one JSON file each.

Every JSON holds ``"kind"``, the ``"command"`` line that reproduces it (all options spelled out), the inputs, the
metric definitions, timings and the machine; ``scripts/make_results.py`` turns them into docs/RESULTS.md.
"""

from __future__ import annotations

import argparse

from mergevq.commands.common import HelpFormatter
from mergevq.commands.evaluate_generator import _register_generator, strided_subset
from mergevq.commands.evaluate_probe import _register_probe
from mergevq.commands.evaluate_shared import _EXAMPLES, COMMAND, command_line
from mergevq.commands.evaluate_tokenizer import _register_tokenizer

__all__ = ["command_line", "register", "strided_subset"]

# ----------------------------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        COMMAND,
        help="evaluate a tokenizer (reconstruction, probe) or generated samples (FID), writing JSON",
        description="Dataset-level evaluation; each sub-command writes one JSON file and prints a markdown table.",
        epilog=_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    inner = parser.add_subparsers(dest="evaluate_command", metavar="WHAT")
    _register_tokenizer(inner)
    _register_generator(inner)
    _register_probe(inner)

    def usage(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=usage)
