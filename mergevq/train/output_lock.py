"""One run per output directory: an exclusive OS lock on ``output_dir/.lock``, holding the owner's pid.

The lock is a POSIX record lock (``fcntl.lockf``): the kernel drops it when the process dies, SIGKILL included, so
there are no stale locks to clean up; and, unlike ``flock``, it is not shared with forked DataLoader workers, which
outlive a killed parent by seconds. The one rule that comes with POSIX locks: this process must not open and close
``.lock`` elsewhere (closing any descriptor of the file drops the lock), so only this module touches it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mergevq.train.errors import OutputDirBusy, RunError

__all__ = ["LOCK_NAME", "locks_released_on_exit", "release_output_dir", "take_output_lock"]

LOCK_NAME = ".lock"
# Resolved output directory -> [open lock file, holders in this process]. Re-entrant within a process, so a run
# started from inside another one's process (tests, notebooks) does not refuse itself.
_LOCKS: dict[Path, list[Any]] = {}


def take_output_lock(path: Path) -> None:
    """Lock ``path/.lock`` for this process (re-entrant), writing the pid into it; :class:`OutputDirBusy` if taken."""
    key = path.resolve()
    if key in _LOCKS:
        _LOCKS[key][1] += 1
        return
    lock_path = path / LOCK_NAME
    try:
        handle = open(lock_path, "a+")  # noqa: SIM115 - held open for the whole run
    except OSError as e:
        raise RunError(f"output_dir {path}: cannot write there ({e.strerror or e})") from None
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        if e.errno in (errno.EACCES, errno.EAGAIN):
            raise OutputDirBusy(
                f"output_dir {path} is in use by another run (pid {holder}); wait for it to end or use another "
                "output_dir"
            ) from None
        raise RunError(f"output_dir {path}: cannot lock {lock_path} ({e.strerror or e})") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _LOCKS[key] = [handle, 1]


def release_output_dir(output_dir: str | Path | None = None) -> None:
    """Give up this process's lock on ``output_dir`` (every lock it holds when None); the file stays."""
    keys = list(_LOCKS) if output_dir is None else [Path(output_dir).resolve()]
    for key in keys:
        entry = _LOCKS.get(key)
        if entry is None:
            continue
        entry[1] -= 1
        if entry[1] <= 0 or output_dir is None:
            entry[0].close()  # closing the file releases the lock
            del _LOCKS[key]


@contextlib.contextmanager
def locks_released_on_exit() -> Iterator[None]:
    """Release, on leaving the block, the output-dir locks taken inside it (and only those)."""
    before = {key: entry[1] for key, entry in _LOCKS.items()}
    try:
        yield
    finally:
        for key, entry in list(_LOCKS.items()):
            for _ in range(entry[1] - before.get(key, 0)):
                release_output_dir(key)
