"""Stage-2 token files: what ``mergevq encode`` writes and the generators train on.

One safetensors file per split holds the labels and, for every stored K (merged tokens per image), one pair of
tensors; the JSON metadata blob records the tokenizer and the source split::

    labels          [N]     class label (-1 when unlabelled)                  stored int64
    indices_k{K}    [N, K]  codebook indices of the K merged tokens           stored int32 (int64 if a value needs it)
    assignment_k{K} [N, L]  merged token that absorbed each grid position     stored int16 when it fits, else int32

Header metadata: ``format`` (``mergevq-tokens``), ``version`` (``"2"``), ``num_tokens`` (JSON list of the stored K,
ascending) and ``meta`` (JSON: tokenizer config, grid, codebook bits, split, ...). Version 1 files (one K, tensors
named ``indices`` / ``assignment`` / ``labels``) still load.

Validation (on save and on load): shapes agree (same N everywhere, same L for every K, K <= L), assignment values lie
in ``[0, K)``, indices are >= 0 and below ``2**codebook_bits`` when ``meta`` names the bits. Whether every one of the
K merged tokens owns at least one position is *not* checked: the encoder always produces K non-empty groups, but an
assignment predicted by learned Source Recovery may leave a token unused and is still a valid file.

Storage is compact; loading returns int64 tensors (``compact=True``: the stored dtypes). Files are written to a
temporary sibling and renamed into place, so a crash never leaves a half-written file under the final name.

:class:`TokenDataset` keeps a whole file in memory in the compact dtypes (CIFAR-10 train at L=64 is a few MB per K;
ImageNet with five K about 8 GB, where int64 would take 23 GB) and hands out int64 :class:`TokenBatch` es for index
arrays, one K per batch, so a trainer can pick K per optimizer step without a DataLoader.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from mergevq.files import give_default_mode

__all__ = [
    "TOKEN_FORMAT",
    "TOKENIZER_IDENTITY_KEYS",
    "TokenBatch",
    "TokenDataset",
    "TokenFile",
    "check_same_tokenizer",
    "load_tokens",
    "save_tokens",
    "tokenizer_identity",
]

TOKEN_FORMAT = "mergevq-tokens"
_FORMAT_VERSION = "2"
_READABLE_VERSIONS = ("1", "2")
_V1_KEYS = ("indices", "assignment", "labels")

# The fields that make two token sources interchangeable: a generator trained on one tokenizer's tokens cannot read
# another's (different vocabulary, grid or decoder).
TOKENIZER_IDENTITY_KEYS = ("tokenizer", "codebook_bits", "num_positions", "grid", "image_size")


def _indices_key(num_tokens: int) -> str:
    return f"indices_k{num_tokens}"


def _assignment_key(num_tokens: int) -> str:
    return f"assignment_k{num_tokens}"


# ------------------------------------------------------------------------------------------------------------- files


@dataclass
class TokenFile:
    """Contents of a token file; tensors on CPU, int64 (``load_tokens(compact=True)``: the stored dtypes).

    ``entries`` maps each stored K to ``(indices [N, K], assignment [N, L])``; every entry shares ``labels [N]``.
    """

    entries: dict[int, tuple[torch.Tensor, torch.Tensor]]
    labels: torch.Tensor  # [N]
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"  # the file it was read from (named in errors)
    version: str = _FORMAT_VERSION

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_tokens_available(self) -> tuple[int, ...]:
        """The stored K, ascending."""
        return tuple(sorted(self.entries))

    @property
    def num_positions(self) -> int:
        """L, the token-grid size before merging (the same for every K)."""
        first = self.entries[self.num_tokens_available[0]]
        return int(first[1].shape[1])

    def get(self, *, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices [N, K], assignment [N, L])`` for ``num_tokens`` = K; a one-line error when K is not stored."""
        if num_tokens not in self.entries:
            raise ValueError(
                f"token file {self.source} holds no K={num_tokens} tokens; available K: "
                f"{list(self.num_tokens_available)}"
            )
        return self.entries[num_tokens]

    def _single(self, what: str) -> int:
        if len(self.entries) != 1:
            raise ValueError(
                f"token file {self.source} holds several K {list(self.num_tokens_available)}; {what} is ambiguous, "
                "use .get(num_tokens=K)"
            )
        return next(iter(self.entries))

    @property
    def num_tokens(self) -> int:
        """K when exactly one K is stored (else an error pointing to :meth:`get`)."""
        return self._single(".num_tokens")

    @property
    def indices(self) -> torch.Tensor:
        """``indices [N, K]`` when exactly one K is stored."""
        return self.entries[self._single(".indices")][0]

    @property
    def assignment(self) -> torch.Tensor:
        """``assignment [N, L]`` when exactly one K is stored."""
        return self.entries[self._single(".assignment")][1]


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


def _compact(indices: torch.Tensor, assignment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The dtypes :func:`save_tokens` stores (a no-op for tensors loaded with ``compact=True``)."""
    return (
        indices.to(_smallest_dtype(indices, (torch.int32,))),
        assignment.to(_smallest_dtype(assignment, (torch.int16, torch.int32))),
    )


def _codebook_bits(meta: Mapping[str, Any]) -> int | None:
    bits = meta.get("codebook_bits")
    return bits if isinstance(bits, int) and not isinstance(bits, bool) else None


def _check_entry(
    where: str,
    *,
    names: tuple[str, str],
    indices: torch.Tensor,
    assignment: torch.Tensor,
    labels: torch.Tensor,
    codebook_bits: int | None,
) -> None:
    """Shapes and value ranges of one K's ``indices [N, K]`` / ``assignment [N, L]`` against ``labels [N]``."""
    name_i, name_a = names
    shapes = f"{name_i} {tuple(indices.shape)}, {name_a} {tuple(assignment.shape)}, labels {tuple(labels.shape)}"
    if indices.ndim != 2 or assignment.ndim != 2 or labels.ndim != 1:
        raise ValueError(f"{where}: expected {name_i} [N, K], {name_a} [N, L], labels [N]; got {shapes}")
    if not indices.shape[0] == assignment.shape[0] == labels.shape[0]:
        raise ValueError(f"{where}: the number of images N differs between tensors ({shapes})")
    num_kept, num_positions = indices.shape[1], assignment.shape[1]
    if num_kept < 1:
        raise ValueError(f"{where}: {name_i} has K=0 tokens per image ({shapes})")
    if num_kept > num_positions:
        raise ValueError(f"{where}: {name_i} has K={num_kept} merged tokens, more than L={num_positions} positions")
    if assignment.numel() and (int(assignment.min()) < 0 or int(assignment.max()) >= num_kept):
        raise ValueError(
            f"{where}: {name_a} values must lie in [0, K={num_kept}), got [{int(assignment.min())}, "
            f"{int(assignment.max())}]"
        )
    if indices.numel() and int(indices.min()) < 0:
        raise ValueError(f"{where}: {name_i} codebook indices must be >= 0, got {int(indices.min())}")
    if codebook_bits is not None and indices.numel() and int(indices.max()) >= 2**codebook_bits:
        raise ValueError(
            f"{where}: {name_i} codebook indices must be < 2^{codebook_bits} (meta codebook_bits), "
            f"got {int(indices.max())}"
        )


def _check_entries(
    where: str,
    entries: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
    labels: torch.Tensor,
    *,
    codebook_bits: int | None,
    legacy_names: bool = False,
) -> None:
    if not entries:
        raise ValueError(f"{where}: no token entries (need at least one K)")
    positions: dict[int, int] = {}
    for k, (indices, assignment) in sorted(entries.items()):
        names = ("indices", "assignment") if legacy_names else (_indices_key(k), _assignment_key(k))
        _check_entry(
            where, names=names, indices=indices, assignment=assignment, labels=labels, codebook_bits=codebook_bits
        )
        if indices.shape[1] != k:
            raise ValueError(f"{where}: {names[0]} is stored for K={k} but has shape {tuple(indices.shape)}")
        positions[k] = int(assignment.shape[1])
    if len(set(positions.values())) > 1:
        listed = ", ".join(f"K={k}: L={length}" for k, length in positions.items())
        raise ValueError(f"{where}: the number of positions L differs between entries ({listed})")


def _normalise_entries(
    path: Path,
    *,
    entries: Mapping[int, tuple[Any, Any]] | None,
    indices: Any,
    assignment: Any,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    if entries is not None and (indices is not None or assignment is not None):
        raise ValueError(f"cannot save tokens to {path}: give either entries= or indices=/assignment=, not both")
    if entries is None:
        if indices is None or assignment is None:
            raise ValueError(f"cannot save tokens to {path}: give entries= or both indices= and assignment=")
        indices_t = _as_int_tensor(indices, name="indices")
        # K comes from the shape; a malformed shape is reported by the entry check with the tensor's real shape.
        k = int(indices_t.shape[1]) if indices_t.ndim == 2 else -1
        entries = {k: (indices_t, assignment)}
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for k, pair in entries.items():
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"cannot save tokens to {path}: entries keys must be int K, got {k!r}")
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"cannot save tokens to {path}: entries[{k}] must be (indices [N, K], assignment [N, L])")
        out[int(k)] = (
            _as_int_tensor(pair[0], name=f"entries[{k}] indices"),
            _as_int_tensor(pair[1], name=f"entries[{k}] assignment"),
        )
    return out


def save_tokens(
    path: str | Path,
    *,
    entries: Mapping[int, tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray]] | None = None,
    indices: torch.Tensor | np.ndarray | None = None,
    assignment: torch.Tensor | np.ndarray | None = None,
    labels: torch.Tensor | np.ndarray,
    meta: dict[str, Any],
) -> Path:
    """Write a token file atomically (temporary file in the same folder, fsync, rename). Returns the path.

    Give ``entries={K: (indices [N, K], assignment [N, L]), ...}`` for several K, or ``indices=`` / ``assignment=``
    for a single K. ``meta`` must be JSON-serialisable (tokenizer config, L, grid, image size, source split, ...).
    """
    path = Path(path)
    where = f"cannot save tokens to {path}"
    pairs = _normalise_entries(path, entries=entries, indices=indices, assignment=assignment)
    labels_t = _as_int_tensor(labels, name="labels")
    # The single-K form names its tensors as the caller did (indices / assignment) in errors.
    _check_entries(where, pairs, labels_t, codebook_bits=_codebook_bits(meta), legacy_names=entries is None)
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: meta is not JSON-serialisable ({exc})") from exc

    tensors = {"labels": labels_t.to(torch.int64).contiguous()}
    for k, (indices_t, assignment_t) in sorted(pairs.items()):
        indices_c, assignment_c = _compact(indices_t, assignment_t)
        tensors[_indices_key(k)], tensors[_assignment_key(k)] = indices_c.contiguous(), assignment_c.contiguous()
    metadata = {
        "format": TOKEN_FORMAT,
        "version": _FORMAT_VERSION,
        "num_tokens": json.dumps(sorted(pairs)),
        "meta": meta_json,
    }

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp_name, metadata=metadata)
        give_default_mode(tmp_name)  # mkstemp and safetensors create 0600; token files are meant to be shared
        with open(tmp_name, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        # Leave nothing behind: the previous file (if any) stays intact under the final name.
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


def _parse_num_tokens(path: Path, text: str | None, keys: set[str]) -> list[int]:
    """The K listed in a v2 header; every listed K must have both tensors and no tensor may be unlisted."""
    try:
        listed = json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        listed = None
    if not isinstance(listed, list) or not listed or not all(type(k) is int and k >= 1 for k in listed):
        raise ValueError(f"token file {path} has a bad num_tokens header {text!r} (expected a JSON list of K >= 1)")
    expected = {"labels"} | {_indices_key(k) for k in listed} | {_assignment_key(k) for k in listed}
    missing, extra = sorted(expected - keys), sorted(keys - expected)
    if missing:
        raise ValueError(f"token file {path} lacks tensor(s) {', '.join(missing)} (header lists K={listed})")
    if extra:
        raise ValueError(f"token file {path} has unexpected tensor(s) {', '.join(extra)} (header lists K={listed})")
    return sorted(set(listed))


def load_tokens(path: str | Path, *, compact: bool = False) -> TokenFile:
    """Read a token file written by :func:`save_tokens` (version 2, or the single-K version 1).

    Tensors are int64, or with ``compact=True`` the dtypes the file stores (int32 indices, int16 assignments: about a
    third of the memory). Errors name the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file not found: {path}")

    def read(keys: list[str] | None) -> tuple[dict[str, str], set[str], dict[str, torch.Tensor]]:
        try:
            with safe_open(str(path), framework="pt") as handle:
                names = set(handle.keys())
                return handle.metadata() or {}, names, {key: handle.get_tensor(key) for key in keys or ()}
        except Exception as exc:  # safetensors raises its own error types for bad headers and short files
            raise ValueError(f"{path} is not a readable safetensors token file: {exc}") from exc

    metadata, keys, _ = read(None)  # the header first: format, version and the listed K decide what to read
    version = metadata.get("version")
    if metadata.get("format") != TOKEN_FORMAT:
        raise ValueError(f"{path} is not a {TOKEN_FORMAT} file (format={metadata.get('format')!r})")
    if version not in _READABLE_VERSIONS:
        raise ValueError(
            f"token file {path} has format version {version!r}; this mergevq reads versions "
            f"{', '.join(_READABLE_VERSIONS)}"
        )
    if version == "1":
        missing = [key for key in _V1_KEYS if key not in keys]
        if missing:
            raise ValueError(f"token file {path} lacks tensor(s) {', '.join(missing)} (has {sorted(keys)})")
        num_tokens: list[int] = []
    else:
        num_tokens = _parse_num_tokens(path, metadata.get("num_tokens"), keys)
    _, _, tensors = read(list(_V1_KEYS) if version == "1" else sorted(keys))
    try:
        meta = json.loads(metadata.get("meta", "{}"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"token file {path} has corrupt JSON metadata: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"token file {path}: meta must be a JSON object, got {type(meta).__name__}")
    for key, tensor in tensors.items():
        if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
            raise ValueError(f"token file {path}: {key} has dtype {tensor.dtype}, expected an integer type")
    if not compact:
        tensors = {key: tensor.to(torch.int64) for key, tensor in tensors.items()}
    labels = tensors["labels"].to(torch.int64)  # [N]: small, and what every caller compares
    where = f"token file {path} is inconsistent"
    if version == "1":
        indices, assignment = tensors["indices"], tensors["assignment"]
        k = int(indices.shape[1]) if indices.ndim == 2 else -1
        entries = {k: (indices, assignment)}
    else:
        entries = {k: (tensors[_indices_key(k)], tensors[_assignment_key(k)]) for k in num_tokens}
    _check_entries(where, entries, labels, codebook_bits=_codebook_bits(meta), legacy_names=version == "1")
    return TokenFile(entries=entries, labels=labels, meta=meta, source=str(path), version=version)


# -------------------------------------------------------------------------------------------------- tokenizer identity


def tokenizer_identity(source: Mapping[str, Any] | Any) -> dict[str, Any]:
    """The fields that must match between a token file and the tokenizer (or generator) that uses it.

    ``source`` is a token file's ``meta`` (as ``mergevq encode`` writes it, also what a generator checkpoint can
    store), or a tokenizer config object (``name``, ``codebook_bits``, ``num_tokens_full``, ``grid_size``,
    ``image_size``), for example ``model.config``. Returns ``{tokenizer, codebook_bits, num_positions, grid,
    image_size}``; a field the source does not record is ``None``.
    """
    if isinstance(source, Mapping):
        identity = {key: source.get(key) for key in TOKENIZER_IDENTITY_KEYS}
    else:
        grid_size = getattr(source, "grid_size", None)
        identity = {
            "tokenizer": getattr(source, "name", None),
            "codebook_bits": getattr(source, "codebook_bits", None),
            "num_positions": getattr(source, "num_tokens_full", None),
            "grid": [grid_size, grid_size] if grid_size is not None else None,
            "image_size": getattr(source, "image_size", None),
        }
    if isinstance(identity["grid"], tuple):  # JSON gives lists; a caller may pass a tuple
        identity["grid"] = list(identity["grid"])
    return identity


def check_same_tokenizer(a: Mapping[str, Any] | Any, b: Mapping[str, Any] | Any, *, what_a: str, what_b: str) -> None:
    """Raise a one-line ``ValueError`` when ``a`` and ``b`` come from different tokenizers.

    ``a`` / ``b`` are anything :func:`tokenizer_identity` accepts; ``what_a`` / ``what_b`` name them in the message
    (for example ``"token file data/train.safetensors"`` and ``"generator checkpoint run/last.pt"``). A field
    missing on either side is not compared (older files may lack it), but at least one field must be comparable.
    """
    id_a, id_b = tokenizer_identity(a), tokenizer_identity(b)
    compared = [key for key in TOKENIZER_IDENTITY_KEYS if id_a[key] is not None and id_b[key] is not None]
    if not compared:
        raise ValueError(f"cannot tell whether {what_a} and {what_b} share a tokenizer: neither records the other's "
                         f"fields ({', '.join(TOKENIZER_IDENTITY_KEYS)})")  # fmt: skip
    differ = [f"{key} {id_a[key]!r} vs {id_b[key]!r}" for key in compared if id_a[key] != id_b[key]]
    if differ:
        raise ValueError(f"{what_a} and {what_b} come from different tokenizers: {'; '.join(differ)}")


# ------------------------------------------------------------------------------------------------------------ dataset


@dataclass
class TokenBatch:
    """One training batch at a single K: ``indices [B, K]``, ``assignment [B, L]``, ``labels [B]`` (int64)."""

    indices: torch.Tensor  # [B, K]
    assignment: torch.Tensor  # [B, L], values in [0, K)
    labels: torch.Tensor  # [B], -1 when unlabelled

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_tokens(self) -> int:
        """K, the merged tokens per image of this batch."""
        return int(self.indices.shape[1])

    @property
    def num_positions(self) -> int:
        """L, the grid positions per image."""
        return int(self.assignment.shape[1])

    def raster_indices(self) -> torch.Tensor:
        """``[B, L]``: the codebook index of every grid position (its merged token's index), in raster order."""
        return self.indices.gather(1, self.assignment)

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> TokenBatch:
        return TokenBatch(
            indices=self.indices.to(device, non_blocking=non_blocking),
            assignment=self.assignment.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
        )


class TokenDataset(Dataset):
    """All of a token file in memory; batches are drawn by index arrays at one K per batch.

    ``num_tokens`` keeps only some of the stored K (default: all). The tensors are held in the file's compact dtypes
    (int32 indices, int16 assignments where the values fit; an int64 :class:`TokenFile` is narrowed the same way) and
    each batch is converted to int64, so memory is the file's size, not 2-4x it. ``device`` moves everything there
    once, so :meth:`batch` is a few gathers with no host-to-device copy.

    ``dataset[i]`` returns ``{"labels": int64 scalar, "indices_k{K}": [K], "assignment_k{K}": [L], ...}`` for use
    with a DataLoader; :meth:`collate` turns a list of those into a :class:`TokenBatch` at one K.
    """

    def __init__(
        self,
        source: TokenFile | str | Path,
        *,
        num_tokens: Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        tokens = source if isinstance(source, TokenFile) else load_tokens(source, compact=True)
        keep = tokens.num_tokens_available if num_tokens is None else tuple(sorted(set(num_tokens)))
        self.source = tokens.source
        self.meta = tokens.meta
        self.labels = tokens.labels.to(device) if device is not None else tokens.labels  # [N]
        self._entries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for k in keep:
            indices, assignment = _compact(*tokens.get(num_tokens=k))
            if device is not None:
                indices, assignment = indices.to(device), assignment.to(device)
            self._entries[k] = (indices, assignment)
        if not self._entries:
            raise ValueError(f"token dataset from {self.source}: num_tokens selects no K")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def nbytes(self) -> int:
        """Memory held by the labels and every kept K's indices and assignments."""
        held = [self.labels, *(t for pair in self._entries.values() for t in pair)]
        return sum(t.numel() * t.element_size() for t in held)

    @property
    def num_tokens_available(self) -> tuple[int, ...]:
        """The K this dataset can batch, ascending."""
        return tuple(sorted(self._entries))

    @property
    def num_positions(self) -> int:
        """L, the grid positions per image."""
        return int(next(iter(self._entries.values()))[1].shape[1])

    @property
    def num_classes(self) -> int:
        """Classes recorded in the metadata, else ``max(label) + 1`` (0 for an unlabelled set)."""
        recorded = self.meta.get("num_classes")
        if isinstance(recorded, int) and recorded > 0:
            return recorded
        return int(self.labels.max()) + 1 if len(self) else 0

    def _entry(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        if num_tokens not in self._entries:
            raise ValueError(
                f"token dataset from {self.source} holds no K={num_tokens} tokens; available K: "
                f"{list(self.num_tokens_available)}"
            )
        return self._entries[num_tokens]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"labels": self.labels[index]}
        for k, (indices, assignment) in self._entries.items():
            item[_indices_key(k)] = indices[index].long()
            item[_assignment_key(k)] = assignment[index].long()
        return item

    def batch(self, rows: torch.Tensor | np.ndarray | Sequence[int] | slice, *, num_tokens: int) -> TokenBatch:
        """The rows ``rows`` (index array ``[B]`` or slice) at ``num_tokens`` = K, on the dataset's device."""
        indices, assignment = self._entry(num_tokens)
        if not isinstance(rows, slice):
            rows = torch.as_tensor(np.asarray(rows) if not isinstance(rows, torch.Tensor) else rows, dtype=torch.long)
            if rows.ndim != 1:
                raise ValueError(f"token dataset from {self.source}: rows must be a 1-D index array, got shape "
                                 f"{tuple(rows.shape)}")  # fmt: skip
            rows = rows.to(self.labels.device)
        # Gather in the compact dtype, then widen only the B rows.
        return TokenBatch(indices=indices[rows].long(), assignment=assignment[rows].long(), labels=self.labels[rows])

    @staticmethod
    def collate(items: Sequence[Mapping[str, torch.Tensor]], *, num_tokens: int) -> TokenBatch:
        """Stack ``dataset[i]`` items into a :class:`TokenBatch` at K = ``num_tokens`` (a DataLoader ``collate_fn``
        via ``functools.partial``)."""
        key_i, key_a = _indices_key(num_tokens), _assignment_key(num_tokens)
        if items and key_i not in items[0]:
            held = sorted(int(key.removeprefix("indices_k")) for key in items[0] if key.startswith("indices_k"))
            raise ValueError(f"token items hold no K={num_tokens} tokens; available K: {held}")
        return TokenBatch(
            indices=torch.stack([item[key_i] for item in items]),
            assignment=torch.stack([item[key_a] for item in items]),
            labels=torch.stack([item["labels"] for item in items]),
        )
