"""How the tokenizer and the generator keep themselves on disk: a JSON config next to safetensors weights.

Both ``save_pretrained`` / ``from_pretrained`` pairs and both config classes go through these functions, so the two
model directories have one format (``config.json`` + ``model.safetensors``) and one set of error messages.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mergevq.files import give_default_mode

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "check_config_keys",
    "load_config_json",
    "read_weights",
    "safetensors_metadata",
    "save_config_json",
    "save_weights",
    "weights_mismatch",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


# ----------------------------------------------------------------------------------------------------------------------
# Config JSON
# ----------------------------------------------------------------------------------------------------------------------


def check_config_keys(*, cls: type, data: dict[str, Any], source: str, what: str) -> None:
    """Refuse keys that are not fields of dataclass ``cls`` (``what``: e.g. "generator config")."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{source}: unknown {what} key(s) {unknown}")


def save_config_json(*, path: str | Path, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def load_config_json(*, path: str | Path, what: str) -> Any:
    """The parsed JSON at ``path``; a missing file or bad JSON is an error naming it (``what``: e.g. "tokenizer")."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no {what} config at {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


# ----------------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------------


def save_weights(*, module: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Write ``module``'s state dict as safetensors at ``path``, atomically (a temporary file, then a rename)."""
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    give_default_mode(tmp)  # safetensors creates files 0600; weights are meant to be shared
    tmp.replace(path)


def read_weights(*, path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file; a missing or unreadable file is an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def weights_mismatch(*, own: Mapping[str, Tensor], state: Mapping[str, Tensor], name_sides: bool = True) -> list[str]:
    """How ``state`` fails to fit a model whose state dict is ``own``: one phrase per kind of misfit (empty: fits).

    ``name_sides``: a shape mismatch says which shape is the file's and which the model's.
    """
    file_side, model_side = ("file ", "model ") if name_sides else ("", "")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    details = []
    if wrong:
        k = wrong[0]
        details.append(
            f"{len(wrong)} shape mismatch(es), e.g. {k}: {file_side}{tuple(state[k].shape)} vs "
            f"{model_side}{tuple(own[k].shape)}"
        )
    if missing:
        details.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
    if unexpected:
        details.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
    return details


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header, read without loading tensors; {} when unreadable."""
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            return json.loads(f.read(header_len)).get("__metadata__", {})
    except (OSError, ValueError):
        return {}
