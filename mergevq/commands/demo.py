"""``mergevq demo``: train a tiny MergeVQ on real photographs and write an HTML report, offline, in minutes."""

from __future__ import annotations

import argparse
import os
import sys

from mergevq.commands.common import CommandError, HelpFormatter, guarded, positive_int, resolve_device
from mergevq.demo.settings import DemoSettings

__all__ = ["register", "run"]

COMMAND = "demo"

_DESCRIPTION = """\
MergeVQ end to end on real photographs, on the CPU, without a network connection:

  1. random crops of the photographs bundled in the scikit-image wheel (or of --data DIR); whole photos are
     held out for evaluation
  2. a tiny tokenizer (preset tiny-32: 32x32 images, L = 64 tokens) trained with the project's training loop
  3. held-out crops and whole photos (tiled) reconstructed at K = L, L/2, L/4, with PSNR and LPIPS
  4. merge maps: every merged token as a coloured region over the image
  5. a small MergeAR generator trained on the tokenizer's codes (class = source photo), and its samples

It writes OUTPUT/report.html (self-contained), summary.json and the PNGs beside it; the training runs, their
recipes and the token file stay in OUTPUT/work/. It takes 5 to 8 minutes on 2 CPU cores, depending on what else runs."""

_EPILOG = """\
examples:
  mergevq demo                                  # the built-in photographs -> demo_out/report.html
  mergevq demo --data ~/Pictures/trip --output demo_trip
  mergevq demo --quick --output /tmp/demo       # every stage at a token budget (well under a minute)
  mergevq demo --tokenizer-steps 2000 --generator-steps 1000    # longer training, better pictures

The built-in photographs need the scikit-image wheel's data files only: pip install --no-deps scikit-image
(`make demo` installs it). With --data, up to 16 images are used, two of them held out; every training image is one
class of the generator. A folder written by an earlier demo is cleared and reused; any other non-empty folder is
refused. Everything is seeded: the same command gives the same report on the same machine.
On a machine busy with other work, set OMP_WAIT_POLICY=PASSIVE (as `make demo` does): waiting OpenMP threads then
sleep instead of spinning, which otherwise slows every training step several-fold.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        COMMAND,
        help="train a tiny MergeVQ on real photographs and write an HTML report with merge maps (minutes, CPU)",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--output", metavar="DIR", default="demo_out", help="folder for the report and its files")
    parser.add_argument(
        "--data",
        metavar="DIR",
        default=None,
        help="an image folder to use instead of the built-in photographs (flat or with sub-folders)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: every stage with a few steps (the pictures stay noisy)"
    )
    full, quick = DemoSettings(), DemoSettings.quick()
    parser.add_argument(
        "--tokenizer-steps",
        metavar="N",
        type=positive_int,
        default=None,
        help=f"tokenizer optimizer steps (default: {full.tokenizer_steps}; --quick: {quick.tokenizer_steps})",
    )
    parser.add_argument(
        "--generator-steps",
        metavar="N",
        type=positive_int,
        default=None,
        help=f"generator optimizer steps (default: {full.generator_steps}; --quick: {quick.generator_steps})",
    )
    parser.add_argument("--no-lpips", action="store_true", help="skip LPIPS (PSNR only)")
    parser.add_argument(
        "--seed", type=int, default=None, help=f"seed of every random choice (default: {DemoSettings().seed})"
    )
    parser.add_argument(
        "--threads",
        metavar="N",
        type=positive_int,
        default=None,
        help=f"torch threads (default: all cores, at most 8; here {max(1, min(8, os.cpu_count() or 1))})",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="cpu",
        help="where to train; the demo is sized for a CPU",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars during training")
    parser.set_defaults(func=guarded(COMMAND, run))


def run(args: argparse.Namespace) -> int:
    from mergevq.demo import run_demo
    from mergevq.demo.photos import DemoDataError
    from mergevq.demo.run import DemoOutputError
    from mergevq.demo.steps import StageFailed

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    settings = settings.replace(
        tokenizer_steps=args.tokenizer_steps,
        generator_steps=args.generator_steps,
        seed=args.seed,
        lpips=False if args.no_lpips else None,
    )
    device = resolve_device(args.device).type
    try:
        run_demo(
            output=args.output,
            data=args.data,
            settings=settings,
            threads=args.threads,
            device=device,
            progress=not args.no_progress,
        )
    except (DemoDataError, DemoOutputError) as error:
        raise CommandError(str(error)) from error
    except StageFailed as error:
        raise CommandError(str(error), code=1) from error
    except KeyboardInterrupt:
        print("mergevq demo: interrupted", file=sys.stderr)
        return 130
    return 0
