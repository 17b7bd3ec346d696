"""Initialisation of new tokenizers: the authors' transformer init and DINOv2 weight selection for the encoder.

* :func:`trunc_normal_init`: Linear/Conv weights ~ trunc-normal(0, 0.02) (PyTorch's default bounds ±2), biases 0,
  norms 1/0 — the authors' ``TransformerBlock.init_weights``. :class:`~mergevq.tokenizer.model.MergeVQ` applies it to
  its transformer parts when ``TokenizerConfig.weight_init = "trunc_normal"`` (the default).
* :func:`init_encoder_from_dinov2`: the paper initialises the G and G+R transformer encoders (E2) from DINOv2-B by
  *weight selection* (App. A.1; SPEC §2.1 "E2 init"; Xu et al. 2023, "Initializing Models with Larger Ones").
  The recipe turns it on with ``model.init_from: dinov2`` (``model.init_from_source``: hub id or local directory in
  Hugging Face format, default ``facebook/dinov2-base``). Needs ``transformers`` (the ``teachers`` extra).

Weight selection, as chosen here:

* **Layers: first-N.** Encoder block ``i`` takes DINOv2 layer ``i`` for ``i < depth`` (weight selection found first-N
  better than evenly spaced layers, and the authors' key-matched loading is first-N too). A deeper encoder than the
  source is an error.
* **Channels: uniform element selection along every dimension.** From ``n`` source channels keep ``m``: every
  ``n/m``-th when ``m`` divides ``n``, else ``round(linspace(0, n − 1, m))``. The rule depends only on ``(n, m)``, so
  the residual-stream channels kept are the same in every norm, projection and the CLS token (weight selection's
  consistency). Query, key and value are selected separately (the authors select on the fused ``[3D, D]`` qkv,
  which for ``D = 512`` mixes query rows into the key block); heads are not kept whole: student head ``h`` is
  channels ``[h·d_h, (h+1)·d_h)`` of the selected ones.
* **What is copied:** per block the two LayerNorms, q/k/v and output projections, the MLP, and both LayerScales
  (DINOv2's values replace the 1e-5 init, as in the authors' loading), plus the CLS token. The stem, the output
  projection and the alignment head keep their own init; DINOv2's patch and position embeddings are unused.

Shapes: D width, d_h head width.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from mergevq.nn.dinov2 import load_dinov2

__all__ = [
    "DINOV2_DEFAULT_SOURCE",
    "dinov2_encoder_state",
    "init_encoder_from_dinov2",
    "load_dinov2_state",
    "select_weight",
    "trunc_normal_init",
    "uniform_indices",
]

DINOV2_DEFAULT_SOURCE = "facebook/dinov2-base"

# DINOv2 parameter names in transformers >= 5 (first) and 4.x (second), per encoder layer.
_LAYER_KEYS = {
    "q": ("attention.q_proj", "attention.attention.query"),
    "k": ("attention.k_proj", "attention.attention.key"),
    "v": ("attention.v_proj", "attention.attention.value"),
    "proj": ("attention.o_proj", "attention.output.dense"),
}


def trunc_normal_init(*, modules: Iterable[nn.Module], std: float = 0.02) -> None:
    """Linear/Conv weights ~ trunc-normal(0, std) (bounds ±2, PyTorch's default), biases 0, norm scales 1 / shifts 0."""
    for root in modules:
        for m in root.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def uniform_indices(*, source: int, target: int) -> Tensor:
    """Indices of the ``target`` channels kept from ``source`` by uniform element selection (int64, increasing)."""
    if not 1 <= target <= source:
        raise ValueError(f"weight selection keeps 1..{source} of {source} channels, asked for {target}")
    if source % target == 0:
        return torch.arange(target) * (source // target)
    return torch.linspace(0, source - 1, target, dtype=torch.float64).round().long()


def select_weight(*, tensor: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Uniform element selection of ``tensor`` down to ``shape``, dimension by dimension (a copy)."""
    if tensor.dim() != len(shape):
        raise ValueError(f"cannot select shape {tuple(shape)} from a tensor of shape {tuple(tensor.shape)}")
    out = tensor.detach()
    for dim, size in enumerate(shape):
        if out.shape[dim] < size:
            raise ValueError(f"cannot select shape {tuple(shape)} from a smaller tensor of shape {tuple(tensor.shape)}")
        if out.shape[dim] != size:
            out = out.index_select(dim, uniform_indices(source=out.shape[dim], target=size).to(out.device))
    return out.clone()


def _layer_tensor(state: Mapping[str, Tensor], layer: int, name: str, suffix: str) -> Tensor | None:
    for candidate in _LAYER_KEYS.get(name, (name,)):
        key = f"encoder.layer.{layer}.{candidate}.{suffix}"
        if key in state:
            return state[key]
    return None


def dinov2_encoder_state(
    *, state: Mapping[str, Tensor], target: Mapping[str, Tensor], depth: int, prefix: str = ""
) -> dict[str, Tensor]:
    """Our encoder's transformer weights selected from a DINOv2 ``state`` (``Dinov2Model.state_dict()``).

    Args:
        state: DINOv2 parameters (transformers naming, 4.x or 5.x).
        target: our encoder's state dict (for the shapes), keys ``[prefix]blocks.<i>....`` and ``[prefix]cls_token``.
        depth: number of encoder blocks (first-N layers of the source are used).
        prefix: prefix of ``target``'s keys (e.g. ``"encoder."``).

    Returns:
        ``{our key: selected tensor}`` for every block parameter and the CLS token.

    Raises:
        ValueError: the source has fewer layers or a smaller width/MLP than the encoder, or lacks a parameter.
    """
    num_layers = len({k.split(".")[2] for k in state if k.startswith("encoder.layer.")})
    if depth > num_layers:
        raise ValueError(f"the encoder has depth={depth} blocks but the DINOv2 source only {num_layers} layers")

    def need(layer: int, name: str, suffix: str) -> Tensor:
        value = _layer_tensor(state, layer, name, suffix)
        if value is None:
            raise ValueError(f"DINOv2 source lacks encoder.layer.{layer}.{name}.{suffix} (unsupported layout)")
        return value

    out: dict[str, Tensor] = {}

    def put(key: str, value: Tensor) -> None:
        full = prefix + key
        if full not in target:
            raise ValueError(f"encoder has no parameter {full!r}")
        out[full] = select_weight(tensor=value, shape=tuple(target[full].shape)).to(target[full].dtype)

    for i in range(depth):
        block = f"blocks.{i}."
        dim = target[prefix + block + "attn.proj.weight"].shape[0]
        for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            put(block + ours + ".weight", need(i, theirs, "weight"))
            put(block + ours + ".bias", need(i, theirs, "bias"))
        put(block + "attn.proj.weight", need(i, "proj", "weight"))
        put(block + "attn.proj.bias", need(i, "proj", "bias"))
        put(block + "ls1.gamma", need(i, "layer_scale1", "lambda1"))
        put(block + "ls2.gamma", need(i, "layer_scale2", "lambda1"))
        # q, k and v are selected separately, then stacked as our fused qkv ([3D, D], q rows first).
        weights = [select_weight(tensor=need(i, p, "weight"), shape=(dim, dim)) for p in ("q", "k", "v")]
        biases = [_layer_tensor(state, i, p, "bias") for p in ("q", "k", "v")]
        qkv_bias = torch.cat(
            [select_weight(tensor=b, shape=(dim,)) if b is not None else torch.zeros(dim) for b in biases]
        )
        for key, value in (("attn.qkv.weight", torch.cat(weights)), ("attn.qkv.bias", qkv_bias)):
            full = prefix + block + key
            if full in target:
                out[full] = value.to(target[full].dtype)
    if "embeddings.cls_token" in state:
        put("cls_token", state["embeddings.cls_token"])
    return out


def load_dinov2_state(*, source: str | Path, local_files_only: bool | None = None) -> dict[str, Tensor]:
    """The parameters of a ``transformers`` DINOv2 from a hub id (cached; honours ``HF_HUB_OFFLINE``) or a directory.

    Raises:
        ImportError: ``transformers`` is not installed.
        OSError: the weights cannot be loaded (the message names the source).
        ValueError: the source uses a SwiGLU MLP or a non-GELU activation, which our blocks do not have.
    """
    model = load_dinov2(source=source, what="model.init_from_source", local_files_only=local_files_only)
    cfg = model.config
    if getattr(cfg, "use_swiglu_ffn", False) or getattr(cfg, "hidden_act", "gelu") != "gelu":
        raise ValueError(
            f"model.init_from_source: {os.fspath(source)!r} uses a SwiGLU or non-GELU MLP; the encoder blocks have a "
            "GELU MLP, so only DINOv2 ViT-S/B/L sources can be selected from"
        )
    return {k: v.detach() for k, v in model.state_dict().items()}


def init_encoder_from_dinov2(
    *, encoder: nn.Module, source: str | Path = DINOV2_DEFAULT_SOURCE, local_files_only: bool | None = None
) -> list[str]:
    """Load weight-selected DINOv2 parameters into ``encoder`` (an :class:`~mergevq.tokenizer.encoder.Encoder`).

    Returns:
        The encoder's parameter names that were set (block weights and ``cls_token``).
    """
    target = encoder.state_dict()
    depth = len(encoder.blocks)
    selected = dinov2_encoder_state(
        state=load_dinov2_state(source=source, local_files_only=local_files_only), target=target, depth=depth
    )
    with torch.no_grad():
        params = dict(encoder.named_parameters())
        for key, value in selected.items():
            params[key].copy_(value.to(params[key].device))
    return sorted(selected)
