"""Crash-safe training checkpoints.

Layout of ``output_dir/checkpoints``::

    step_00001000/                 one committed checkpoint (the number counts completed optimizer steps)
        model.safetensors          the trained weights
        ema.safetensors            EMA weights (what validation and export use), only when the run keeps an EMA:
                                   stage 1 always, stage 2 when ema_decay is set
        discriminator.safetensors  PatchGAN weights and BatchNorm statistics (stage 1)
        alignment.safetensors      trainable or EMA alignment state (only when there is any)
        state.pt                   optimizers, GradScalers, data position, per-rank RNG and LeCAM state, configs
        meta.json                  a human-readable summary, with the size and sha256 of every other file
    .tmp-step_00001000-<pid>/      being written; never read

Every file is written and fsync'ed inside a temporary directory; renaming that directory to ``step_N`` is the commit
point, so a crash at any moment leaves either the complete new checkpoint or none of it, and the previous one stays
loadable. Pruning renames a directory away before deleting it, so a half-deleted checkpoint is never mistaken for one,
and never removes the newest checkpoint known to be good. ``state.pt`` holds only tensors and plain containers, so it
loads with ``torch.load(weights_only=True)``.

Weights holding NaN/inf are refused at save time (:class:`NonFiniteWeights`). Reading back
(:func:`read_checkpoint`, :func:`read_newest`) checks ``state.pt`` first and hands it to the caller's ``check`` (a
checkpoint of another model or recipe is that error, not damage), then the recorded sizes and checksums of the other
files, that every part loads and is finite; a damaged checkpoint is a one-line :class:`CheckpointDamaged`, and
:func:`read_newest` falls back to the next older one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mergevq.files import give_default_mode
from mergevq.persistence import weights_mismatch

__all__ = [
    "CHECKPOINT_FILES",
    "CheckpointDamaged",
    "CheckpointInfo",
    "CheckpointWriteError",
    "LoadedCheckpoint",
    "NonFiniteWeights",
    "find_latest",
    "first_nonfinite",
    "list_checkpoints",
    "load_module",
    "load_state",
    "prune",
    "read_checkpoint",
    "read_newest",
    "remove_stale",
    "save_checkpoint",
    "step_dir_name",
]

FORMAT_VERSION = 1
REQUIRED_FILES = ("model.safetensors", "state.pt")
_OPTIONAL_FILES = ("ema.safetensors", "discriminator.safetensors", "alignment.safetensors", "meta.json")
CHECKPOINT_FILES = REQUIRED_FILES + _OPTIONAL_FILES
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path


class CheckpointDamaged(ValueError):
    """A committed checkpoint that does not read back intact; the message is one line naming the file."""


class NonFiniteWeights(ValueError):
    """Weights or optimizer state holding NaN/inf: such a checkpoint is never written."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, permissions); the previous checkpoints are untouched."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def first_nonfinite(tensors: Iterable[tuple[str, Any]]) -> str | None:
    """Name of the first floating tensor holding NaN/inf, or None; one device sync per device, not per tensor."""
    named = [(n, t) for n, t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    for indices in by_device.values():
        flags = torch.stack([torch.isfinite(named[i][1]).all() for i in indices]).cpu()
        if not bool(flags.all()):
            return named[indices[int((~flags).nonzero()[0])]][0]
    return None


def nested_tensors(value: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """``(dotted name, tensor)`` for every tensor inside nested dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from nested_tensors(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from nested_tensors(item, f"{prefix}[{i}]")


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
    tensors = _tensors_for_file(state)
    bad = first_nonfinite(tensors.items())
    if bad is not None:
        raise NonFiniteWeights(f"{path.name}: {bad} holds NaN/inf values; such weights are not checkpointed")
    try:
        save_file(tensors, str(path), metadata=metadata)
    except OSError:
        raise
    except Exception as e:  # safetensors reports I/O failures (ENOSPC included) as its own error type
        raise OSError(f"{path.name}: {' '.join(str(e).split())}") from None
    give_default_mode(path)  # safetensors creates files 0600
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


def _digest(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return {"bytes": os.fstat(f.fileno()).st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


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

    Raises :class:`NonFiniteWeights` (nothing written) when a weight or a ``state`` tensor holds NaN/inf, and
    :class:`CheckpointWriteError` naming the checkpoint when the disk refuses (the older checkpoints stay intact).

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
    name = step_dir_name(step)
    bad = first_nonfinite(nested_tensors(state))
    if bad is not None:
        raise NonFiniteWeights(f"{name}: state entry {bad} holds NaN/inf values; such a checkpoint is not written")
    tmp = root / f"{_TMP_PREFIX}{name}-{os.getpid()}"
    final = root / name
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        files: dict[str, Any] = {}
        for stem, tensors in weights.items():
            _write_safetensors(tmp / f"{stem}.safetensors", tensors, metadata={"step": str(step), "part": stem})
        _write_torch(tmp / "state.pt", {"format": FORMAT_VERSION, "step": int(step), **state})
        for part in sorted(tmp.iterdir()):
            files[part.name] = _digest(part)  # read back from the page cache: cheap next to writing
        summary = {"step": int(step), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **(meta or {})}
        summary.update(finite=True, files=files)
        _write_text(tmp / "meta.json", json.dumps(summary, indent=2, default=str) + "\n")
        _fsync_dir(tmp)
        if final.exists():
            # Only reachable when a run re-saves a step it already committed; move the old one out of the way.
            _discard(final)
        os.rename(tmp, final)  # the commit point
        _fsync_dir(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, CheckpointWriteError):
            reason = e.strerror or " ".join(str(e).split())
            where = f" ({Path(e.filename).name})" if e.filename else ""
            raise CheckpointWriteError(
                e.errno or 0, f"cannot write checkpoint {final}: {reason}{where}; the previous checkpoints are intact"
            ) from e
        raise
    if keep_last is not None:
        prune(root, keep_last=keep_last, protect=(final,))
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


def find_latest(checkpoint_dir: str | Path, *, verify: bool = True) -> CheckpointInfo | None:
    """The committed checkpoint with the most steps whose files match their recorded checksums, or None.

    A damaged newer one is reported in one line on stderr and skipped (``verify=False``: no checks at all).
    """
    for info in reversed(list_checkpoints(checkpoint_dir)):
        if not verify:
            return info
        try:
            _check_files(info.path)
        except CheckpointDamaged as e:
            if info.path.exists():  # not merely pruned by a running training meanwhile
                _report_stderr(f"warning: {e}; trying the previous checkpoint")
            continue
        return info
    return None


def _discard(path: Path) -> None:
    trash = path.parent / f"{_TRASH_PREFIX}{path.name}-{os.getpid()}-{time.monotonic_ns()}"
    os.rename(path, trash)  # from here on it no longer looks like a checkpoint
    _fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def _marked_finite(path: Path) -> bool:
    try:
        return json.loads((path / "meta.json").read_text()).get("finite") is True
    except (OSError, ValueError, AttributeError):
        return False


def prune(checkpoint_dir: str | Path, *, keep_last: int, protect: Iterable[str | Path] = ()) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; returns the removed paths.

    Never removed: the ``protect`` paths (the checkpoint just written) and the newest checkpoint whose meta.json
    records finite weights, so that damaged or unchecked newer ones can never crowd out the last good one.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    checkpoints = list_checkpoints(checkpoint_dir)
    kept = {Path(p) for p in protect}
    newest_good = next((c.path for c in reversed(checkpoints) if _marked_finite(c.path)), None)
    if newest_good is not None:
        kept.add(newest_good)
    removed = []
    for info in checkpoints[:-keep_last]:
        if info.path in kept:
            continue
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


def check_fits(module: nn.Module, tensors: Mapping[str, torch.Tensor], file: str | Path) -> None:
    """Raise ``ValueError`` naming ``file`` unless ``tensors`` has exactly the keys and shapes of ``module``."""
    parts = weights_mismatch(own=module.state_dict(), state=tensors, name_sides=False)
    if parts:
        raise ValueError(f"{file} does not fit the {type(module).__name__} of this run: {'; '.join(parts)}")


def load_module(module: nn.Module, path: str | Path, stem: str) -> None:
    """Load ``<stem>.safetensors`` from a checkpoint directory into ``module`` (strict)."""
    file = Path(path) / f"{stem}.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no {file.name}")
    tensors = load_file(str(file))
    check_fits(module, tensors, file)
    module.load_state_dict(tensors)


# ----------------------------------------------------------------------------------------------------------------------
# Verified reading, with fallback to older checkpoints
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedCheckpoint:
    step: int
    path: Path
    state: dict[str, Any] = field(repr=False)  # the whole state.pt
    weights: dict[str, dict[str, torch.Tensor]] = field(repr=False)  # file stem -> tensors (CPU)
    substituted: dict[str, str] = field(default_factory=dict)  # absent stem -> the stem whose weights stand in

    def file(self, stem: str) -> Path:
        """The file the ``stem`` weights were read from (its substitute's when it was absent)."""
        return self.path / f"{self.substituted.get(stem, stem)}.safetensors"


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _recorded_files(path: Path) -> dict[str, Any]:
    """meta.json's file name -> {bytes, sha256}; empty for checkpoints written before checksums existed."""
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        return {}
    try:
        recorded = json.loads(meta_file.read_text()).get("files", {})
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointDamaged(f"checkpoint {path}: meta.json is unreadable ({_short(e)})") from None
    return recorded if isinstance(recorded, dict) else {}


def _check_file(path: Path, name: str, expected: Mapping[str, Any]) -> None:
    file = path / name
    if not file.is_file():
        raise CheckpointDamaged(f"checkpoint {path}: {name} is missing")
    actual = _digest(file)
    if actual["bytes"] != expected.get("bytes"):
        raise CheckpointDamaged(
            f"checkpoint {path}: {name} has {actual['bytes']} bytes, {expected.get('bytes')} were written"
        )
    if actual["sha256"] != expected.get("sha256"):
        raise CheckpointDamaged(f"checkpoint {path}: {name} does not match its checksum (modified or corrupted)")


def _check_files(path: Path, *, skip: Iterable[str] = ()) -> None:
    """Sizes and sha256 against meta.json (checkpoints written before checksums existed skip this)."""
    skipped = set(skip)
    for name, expected in sorted(_recorded_files(path).items()):
        if name not in skipped:
            _check_file(path, name, expected)


def _read_weights(path: Path, stem: str) -> dict[str, torch.Tensor]:
    file = path / f"{stem}.safetensors"
    if not file.is_file():
        raise CheckpointDamaged(f"checkpoint {path}: {file.name} is missing")
    try:
        tensors = load_file(str(file))
    except Exception as e:  # safetensors has its own error type for corrupt headers and short files
        raise CheckpointDamaged(f"checkpoint {path}: {file.name} is unreadable ({_short(e)})") from None
    bad = first_nonfinite(tensors.items())
    if bad is not None:
        raise CheckpointDamaged(f"checkpoint {path}: {file.name} holds NaN/inf values ({bad})")
    return tensors


def read_checkpoint(
    path: str | Path,
    *,
    parts: Iterable[str],
    substitutes: Mapping[str, str] | None = None,
    check: Callable[[dict[str, Any], Path], None] | None = None,
) -> LoadedCheckpoint:
    """Read ``state.pt`` and the ``parts`` weights of one checkpoint, verified; raises :class:`CheckpointDamaged`.

    Order: ``state.pt`` (its recorded size and checksum, that it loads), then ``check(state, path)`` whose errors
    propagate (a checkpoint of another model is that error even when its weights could not be used), then the other
    recorded files, that each part loads and is finite. ``substitutes`` maps an optional part to the part read in its
    place when the checkpoint does not hold it, e.g. ``{"ema": "model"}`` (a part that was written but is gone is
    damage, never substituted).
    """
    path = Path(path)
    recorded = _recorded_files(path)
    if "state.pt" in recorded:
        _check_file(path, "state.pt", recorded["state.pt"])
    try:
        state = load_state(path)
    except Exception as e:  # torch/pickle raise many types for a truncated or overwritten file
        raise CheckpointDamaged(f"checkpoint {path}: state.pt is unreadable ({_short(e)})") from None
    if check is not None:
        check(state, path)
    _check_files(path, skip=("state.pt",))
    substitutes = dict(substitutes or {})
    weights: dict[str, dict[str, torch.Tensor]] = {}
    substituted: dict[str, str] = {}
    for stem in parts:
        if stem in substitutes and not (path / f"{stem}.safetensors").exists():
            substituted[stem] = substitutes[stem]
            continue
        weights[stem] = _read_weights(path, stem)
    for stem, other in substituted.items():  # the same tensors when the substitute is a part too: no second copy
        weights[stem] = weights[other] if other in weights else _read_weights(path, other)
    return LoadedCheckpoint(
        step=int(state.get("step", -1)), path=path, state=state, weights=weights, substituted=substituted
    )


def _report_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_newest(
    checkpoint_dir: str | Path,
    *,
    parts: Iterable[str],
    substitutes: Mapping[str, str] | None = None,
    check: Callable[[dict[str, Any], Path], None] | None = None,
    fits: Callable[[LoadedCheckpoint], None] | None = None,
    report: Callable[[str], None] = _report_stderr,
) -> LoadedCheckpoint | None:
    """The newest checkpoint that reads back intact (:func:`read_checkpoint`), or None when there is none.

    ``check(state, path)`` runs on each candidate's ``state.pt`` before its weights are verified; its errors (another
    model, another recipe) propagate, they are not damage. ``fits(loaded)`` may then refuse one by raising
    :class:`CheckpointDamaged` (e.g. shapes that do not fit this run's modules). Each refused newer checkpoint is
    reported in one line through ``report``; when none is usable, :class:`CheckpointDamaged` lists them.
    """
    parts = tuple(parts)
    problems = []
    for info in reversed(list_checkpoints(checkpoint_dir)):
        try:
            loaded = read_checkpoint(info.path, parts=parts, substitutes=substitutes, check=check)
            if fits is not None:
                fits(loaded)
        except CheckpointDamaged as e:
            report(f"warning: {e}; trying the previous checkpoint")
            problems.append(info.path.name)
            continue
        return loaded
    if problems:
        raise CheckpointDamaged(
            f"no usable checkpoint under {checkpoint_dir} (damaged: {', '.join(problems)}); move them away to "
            "start over"
        )
    return None
