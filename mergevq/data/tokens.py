"""Stage-2 token files: what ``mergevq encode`` writes and the generators train on.

One safetensors file per split holds three tensors and a JSON metadata blob::

    indices     [N, K]  codebook indices of the K merged tokens   stored int32 (int64 if a value needs it)
    assignment  [N, L]  merged token that absorbed each position  stored int16 when it fits, else int32/int64
    labels      [N]     class label (-1 when unlabelled)          stored int64

Storage is compact; :func:`load_tokens` always returns int64 tensors. Files are written to a temporary sibling and
renamed into place, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["TOKEN_FORMAT", "TokenFile", "load_tokens", "save_tokens"]

TOKEN_FORMAT = "mergevq-tokens"
_FORMAT_VERSION = "1"
_KEYS = ("indices", "assignment", "labels")


@dataclass
class TokenFile:
    """Contents of a token file; all tensors int64 on CPU."""

    indices: torch.Tensor  # [N, K]
    assignment: torch.Tensor  # [N, L], values in [0, K)
    labels: torch.Tensor  # [N]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def num_tokens(self) -> int:
        """K, the merged token count per image."""
        return int(self.indices.shape[1])

    @property
    def num_positions(self) -> int:
        """L, the token-grid size before merging."""
        return int(self.assignment.shape[1])


def _as_int_tensor(value: Any, *, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {tensor.dtype}")
    return tensor.detach().cpu()


def _smallest_dtype(tensor: torch.Tensor, candidates: tuple[torch.dtype, ...]) -> torch.dtype:
    if tensor.numel() == 0:
        return candidates[0]
    low, high = int(tensor.min()), int(tensor.max())
    for dtype in candidates:
        info = torch.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    return torch.int64


def _check_consistent(where: str, indices: torch.Tensor, assignment: torch.Tensor, labels: torch.Tensor) -> None:
    shapes = f"indices {tuple(indices.shape)}, assignment {tuple(assignment.shape)}, labels {tuple(labels.shape)}"
    if indices.ndim != 2 or assignment.ndim != 2 or labels.ndim != 1:
        raise ValueError(f"{where}: expected indices [N, K], assignment [N, L], labels [N]; got {shapes}")
    if not indices.shape[0] == assignment.shape[0] == labels.shape[0]:
        raise ValueError(f"{where}: the number of images N differs between tensors ({shapes})")
    num_kept, num_positions = indices.shape[1], assignment.shape[1]
    if num_kept > num_positions and assignment.shape[0] > 0:
        raise ValueError(f"{where}: K={num_kept} merged tokens cannot exceed L={num_positions} positions")
    if assignment.numel() and (int(assignment.min()) < 0 or int(assignment.max()) >= num_kept):
        raise ValueError(
            f"{where}: assignment values must lie in [0, K={num_kept}), got [{int(assignment.min())}, "
            f"{int(assignment.max())}]"
        )
    if indices.numel() and int(indices.min()) < 0:
        raise ValueError(f"{where}: codebook indices must be >= 0, got {int(indices.min())}")


def save_tokens(
    path: str | Path,
    *,
    indices: torch.Tensor | np.ndarray,
    assignment: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    meta: dict[str, Any],
) -> Path:
    """Write a token file atomically (temporary file in the same folder, fsync, rename). Returns the path.

    ``meta`` must be JSON-serialisable (for example the tokenizer preset, K, L, the image size and the source split).
    """
    path = Path(path)
    indices_t = _as_int_tensor(indices, name="indices")
    assignment_t = _as_int_tensor(assignment, name="assignment")
    labels_t = _as_int_tensor(labels, name="labels")
    _check_consistent(f"cannot save tokens to {path}", indices_t, assignment_t, labels_t)
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot save tokens to {path}: meta is not JSON-serialisable ({exc})") from exc
    tensors = {
        "indices": indices_t.to(_smallest_dtype(indices_t, (torch.int32,))).contiguous(),
        "assignment": assignment_t.to(_smallest_dtype(assignment_t, (torch.int16, torch.int32))).contiguous(),
        "labels": labels_t.to(torch.int64).contiguous(),
    }
    metadata = {"format": TOKEN_FORMAT, "version": _FORMAT_VERSION, "meta": meta_json}

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp_name, metadata=metadata)
        with open(tmp_name, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        # Leave nothing behind: the previous file (if any) stays intact under the final name.
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


def load_tokens(path: str | Path) -> TokenFile:
    """Read a token file written by :func:`save_tokens`; errors name the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            available = set(handle.keys())
            tensors = {key: handle.get_tensor(key) for key in _KEYS if key in available}
    except Exception as exc:  # safetensors raises its own error types for bad headers and short files
        raise ValueError(f"{path} is not a readable safetensors token file: {exc}") from exc
    missing = [key for key in _KEYS if key not in tensors]
    if missing:
        raise ValueError(f"token file {path} lacks tensor(s) {', '.join(missing)} (has {sorted(tensors)})")
    if metadata.get("format") != TOKEN_FORMAT:
        raise ValueError(f"{path} is not a {TOKEN_FORMAT} file (format={metadata.get('format')!r})")
    try:
        meta = json.loads(metadata.get("meta", "{}"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"token file {path} has corrupt JSON metadata: {exc}") from exc
    for key, tensor in tensors.items():
        if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
            raise ValueError(f"token file {path}: {key} has dtype {tensor.dtype}, expected an integer type")
    indices, assignment, labels = (tensors[key].to(torch.int64) for key in _KEYS)
    _check_consistent(f"token file {path} is inconsistent", indices, assignment, labels)
    return TokenFile(indices=indices, assignment=assignment, labels=labels, meta=meta)
