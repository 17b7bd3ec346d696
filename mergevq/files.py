"""Small file-system helpers shared by the writers of weights, token files and checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_file_mode", "give_default_mode"]


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask (0o644 under the usual umask 022)."""
    return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux shows it without changing it (safe with other threads creating files meanwhile)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)  # elsewhere reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def give_default_mode(path: str | Path) -> None:
    """Reset a file created private (``mkstemp``, safetensors: 0600) to the umask's default mode."""
    os.chmod(path, default_file_mode())
