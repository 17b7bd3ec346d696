"""Loading a ``transformers`` DINOv2 with one-line errors: shared by the alignment teacher and the encoder init."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def load_dinov2(*, source: str | Path, what: str, local_files_only: bool | None = None) -> Any:
    """A ``transformers.Dinov2Model`` from a hub id (cached; honours ``HF_HUB_OFFLINE``) or a local directory.

    ``what`` names the caller in the errors (e.g. ``"the DINOv2 teacher"``, ``"model.init_from_source"``).

    Raises:
        ImportError: ``transformers`` is not installed.
        OSError: the weights cannot be loaded (the message names the source and the fix).
    """
    try:
        from transformers import Dinov2Model
    except ImportError as err:
        raise ImportError(f"{what} needs transformers: pip install 'mergevq[teachers]'") from err
    kwargs = {} if local_files_only is None else {"local_files_only": local_files_only}
    try:
        return Dinov2Model.from_pretrained(os.fspath(source), **kwargs)
    except Exception as err:  # transformers raises OSError, ValueError or hub errors depending on the cause
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OSError(
            f"{what}: could not load DINOv2 from {os.fspath(source)!r} ({reason}). Pass a local directory holding "
            "config.json and model.safetensors (download once with `huggingface-cli download facebook/dinov2-base "
            "--local-dir DIR`), or a hub id already in the cache."
        ) from err
