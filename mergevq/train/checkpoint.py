"""Crash-safe training checkpoints.

Layout of ``output_dir/checkpoints``::

    step_00001000/                 one committed checkpoint (the number counts completed optimizer steps)
        model.safetensors          tokenizer weights
        ema.safetensors            EMA tokenizer weights (what validation and export use)
        discriminator.safetensors  PatchGAN weights and BatchNorm statistics
        alignment.safetensors      trainable or EMA alignment state (only when there is any)
        state.pt                   optimizers, GradScalers, data position, per-rank RNG and LeCAM state, configs
        meta.json                  a human-readable summary
    .tmp-step_00001000-<pid>/      being written; never read

Every file is written and fsync'ed inside a temporary directory; renaming that directory to ``step_N`` is the commit
point, so a crash at any moment leaves either the complete new checkpoint or none of it, and the previous one stays
loadable. Pruning renames a directory away before deleting it, so a half-deleted checkpoint is never mistaken for one.
``state.pt`` holds only tensors and plain containers, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "CHECKPOINT_FILES",
    "CheckpointInfo",
    "find_latest",
    "list_checkpoints",
    "load_module",
    "load_state",
    "prune",
    "remove_stale",
    "save_checkpoint",
    "step_dir_name",
]

FORMAT_VERSION = 1
REQUIRED_FILES = ("model.safetensors", "ema.safetensors", "state.pt")
CHECKPOINT_FILES = REQUIRED_FILES + ("discriminator.safetensors", "alignment.safetensors", "meta.json")
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Makes a rename durable; some platforms cannot open directories, which only weakens durability, not atomicity.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tensors_for_file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two entries sharing memory (safetensors refuses aliased tensors)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, value in state.items():
        tensor = value.detach().to("cpu").contiguous()
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if ident in seen and tensor.numel() > 0:
            tensor = tensor.clone()
        seen.add(ident)
        out[key] = tensor
    return out


def _write_safetensors(path: Path, state: dict[str, torch.Tensor], *, metadata: dict[str, str]) -> None:
    save_file(_tensors_for_file(state), str(path), metadata=metadata)
    _fsync_file(path)


def _write_torch(path: Path, obj: Any) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    checkpoint_dir: str | Path,
    *,
    step: int,
    weights: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    meta: dict[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write one checkpoint atomically and return its directory.

    Args:
        checkpoint_dir: ``output_dir/checkpoints`` (created if needed).
        step: completed optimizer steps; names the directory.
        weights: file stem → state dict, e.g. ``{"model": ..., "ema": ..., "discriminator": ...}``; each is written
            as ``<stem>.safetensors``.
        state: tensors and plain containers only (ints, floats, strings, lists, tuples, dicts, None), written to
            ``state.pt``.
        meta: JSON-serialisable summary for ``meta.json``.
        keep_last: if given, prune to the newest ``keep_last`` checkpoints after the commit.
    """
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    tmp = root / f"{_TMP_PREFIX}{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        for stem, tensors in weights.items():
            _write_safetensors(tmp / f"{stem}.safetensors", tensors, metadata={"step": str(step), "part": stem})
        _write_torch(tmp / "state.pt", {"format": FORMAT_VERSION, "step": int(step), **state})
        summary = {"step": int(step), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **(meta or {})}
        _write_text(tmp / "meta.json", json.dumps(summary, indent=2, default=str) + "\n")
        _fsync_dir(tmp)
        final = root / name
        if final.exists():
            # Only reachable when a run re-saves a step it already committed; move the old one out of the way.
            _discard(final)
        os.rename(tmp, final)  # the commit point
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last is not None:
        prune(root, keep_last=keep_last)
    return final


def _is_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in REQUIRED_FILES)


def list_checkpoints(checkpoint_dir: str | Path) -> list[CheckpointInfo]:
    """Committed checkpoints, oldest first; temporary and trashed directories are ignored."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found: list[CheckpointInfo] = []
    for entry in root.iterdir():
        match = _STEP_RE.match(entry.name)
        if match is None or not entry.is_dir():
            continue
        if not _is_complete(entry):
            warnings.warn(f"ignoring incomplete checkpoint directory {entry}", stacklevel=2)
            continue
        found.append(CheckpointInfo(step=int(match.group(1)), path=entry))
    return sorted(found, key=lambda c: c.step)


def find_latest(checkpoint_dir: str | Path) -> CheckpointInfo | None:
    """The committed checkpoint with the most steps, or None."""
    checkpoints = list_checkpoints(checkpoint_dir)
    return checkpoints[-1] if checkpoints else None


def _discard(path: Path) -> None:
    trash = path.parent / f"{_TRASH_PREFIX}{path.name}-{os.getpid()}-{time.monotonic_ns()}"
    os.rename(path, trash)  # from here on it no longer looks like a checkpoint
    _fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def prune(checkpoint_dir: str | Path, *, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; returns the removed paths."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    checkpoints = list_checkpoints(checkpoint_dir)
    removed = []
    for info in checkpoints[:-keep_last]:
        _discard(info.path)
        removed.append(info.path)
    return removed


def remove_stale(checkpoint_dir: str | Path) -> list[Path]:
    """Delete leftovers of interrupted writes and deletions (``.tmp-*``, ``.trash-*``)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith((_TMP_PREFIX, _TRASH_PREFIX))]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def load_state(path: str | Path) -> dict[str, Any]:
    """``state.pt`` of a checkpoint directory (tensors on CPU), loaded with ``weights_only=True``."""
    file = Path(path) / "state.pt"
    state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{file}: not a mergevq training state (format {FORMAT_VERSION})")
    return state


def load_module(module: nn.Module, path: str | Path, stem: str) -> None:
    """Load ``<stem>.safetensors`` from a checkpoint directory into ``module`` (strict)."""
    file = Path(path) / f"{stem}.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no {file.name}")
    tensors = load_file(str(file))
    try:
        missing, unexpected = module.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = str(e).strip().splitlines()[-1].strip()
        raise ValueError(f"{file} does not fit the {type(module).__name__} of this run: {first}") from None
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise ValueError(f"{file} does not fit the {type(module).__name__} of this run: {'; '.join(parts)}")
