"""Ctrl-C and SIGTERM where there is nothing to save: leave at once, in one line, with 128 + the signal number.

While modules are being imported, data scanned or models built, a ``KeyboardInterrupt`` raised at an arbitrary point
can land inside a half-done import and then fail later with an unrelated traceback (a module missing attributes).
Inside :func:`exit_on_signal` such a signal ends the process directly instead. Training loops replace these handlers
with their own while they step (save a checkpoint, then exit) and put them back afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["exit_on_signal"]


@contextlib.contextmanager
def exit_on_signal(message: str) -> Iterator[None]:
    """Inside the block, SIGINT/SIGTERM print ``interrupted by SIG...: <message>`` and exit 130/143 at once."""

    def leave(signum: int, frame: Any) -> None:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os.write(2, f"interrupted by {signal.Signals(signum).name} {message}\n".encode())
        os._exit(128 + signum)  # the output_dir lock, held by the process, goes with it

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, leave)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
