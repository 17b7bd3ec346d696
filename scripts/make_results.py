"""Build docs/RESULTS.md (tables + PNG plots in docs/figures/) from result JSON files.

    python scripts/make_results.py                                  # docs/results/*.json + benchmarks/results/*.json
    python scripts/make_results.py --inputs results/*.json --output docs/RESULTS.md --notes-file notes.md

Inputs are the files written by ``mergevq evaluate ...`` / ``mergevq benchmark`` (each holds the command that made
it) and by the ``benchmarks/`` scripts. The page is a pure function of the inputs.
"""

from __future__ import annotations

import argparse
import glob
import shlex
import sys
from pathlib import Path

from mergevq.eval.report import load_results, render_results_page

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INPUTS = ("docs/results/*.json", "benchmarks/results/*.json")


def _expand(patterns: list[str], *, base: Path) -> list[Path]:
    """Glob patterns (relative ones against ``base``; shells expand them too, this covers quoted ones)."""
    paths: list[Path] = []
    for pattern in patterns:
        full = pattern if Path(pattern).is_absolute() else str(base / pattern)
        matches = sorted(glob.glob(full))
        if not matches and not glob.has_magic(pattern):
            raise FileNotFoundError(f"no such result file: {pattern}")
        paths += [Path(m) for m in matches]
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--inputs",
        nargs="+",
        metavar="FILE.json",
        default=None,
        help=f"result files or globs (default: {' '.join(DEFAULT_INPUTS)})",
    )
    parser.add_argument("--output", metavar="FILE.md", default="docs/RESULTS.md", help="the page to write")
    parser.add_argument("--figures", metavar="DIR", default=None, help="PNG folder (default: figures/ beside it)")
    parser.add_argument("--title", default="MergeVQ results", help="page title")
    parser.add_argument("--note", action="append", default=[], help="a note shown at the top (repeatable)")
    parser.add_argument(
        "--notes-file", metavar="FILE.md", default=None, help="notes shown at the top, one per paragraph"
    )
    args = parser.parse_args(argv)

    cwd = Path.cwd()
    try:
        paths = _expand(args.inputs or list(DEFAULT_INPUTS), base=cwd if args.inputs else ROOT)
        results = load_results(paths)
    except (FileNotFoundError, ValueError) as exc:
        print(f"make_results: error: {exc}", file=sys.stderr)
        return 2
    notes = list(args.note)
    if args.notes_file:
        text = Path(args.notes_file).read_text()
        notes += [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
    if not results:
        print("make_results: error: no result files found", file=sys.stderr)
        return 2
    output = Path(args.output)
    if not output.is_absolute():
        output = cwd / output
    figures = Path(args.figures) if args.figures else output.parent / "figures"
    command = ["python", "scripts/make_results.py"]
    if args.inputs:
        command += ["--inputs", *args.inputs]
    command += ["--output", args.output]
    if args.figures:
        command += ["--figures", args.figures]
    if args.title != parser.get_default("title"):
        command += ["--title", args.title]
    for note in args.note:
        command += ["--note", note]
    if args.notes_file:
        command += ["--notes-file", args.notes_file]
    page = render_results_page(
        results=results,
        output=output,
        figures_dir=figures,
        base=ROOT,
        title=args.title,
        notes=notes,
        generator_command=shlex.join(command),
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page)
    print(f"wrote {output} from {len(results)} result file(s); figures in {figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
