"""LPIPS perceptual distance on a VGG16 trunk, in pure torch.

Two variants share one forward pass (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric"):

    x, y ∈ [-1, 1]  →  scaling layer (x − shift) / scale
                    →  VGG16 taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3      f_l [B, C_l, H_l, W_l]
                    →  unit-normalise every feature vector over channels            f̂_l = f_l / ‖f_l‖₂
                    →  squared difference, non-negative 1×1 linear head, spatial mean
    d(x, y) = Σ_l mean_hw( w_l · (f̂_l(x) − f̂_l(y))² )                               [B]

* ``shift_tolerant`` (default): ST-LPIPS (Ghildyal & Liu, ECCV 2022). Its VGG16 replaces each 2×2/stride-2
  max-pool with an anti-aliased "MaxBlurPool" (Zhang 2019, "Making Convolutional Networks Shift-Invariant Again"):
  a dense 2×2 max-pool at stride 1, then a depth-wise 3×3 binomial blur ([1,2,1]ᵀ[1,2,1]/16) evaluated at stride 2
  on a reflection-padded map. Trunk, heads and scaling layer come from one file that the ``stlpips-pytorch`` wheel
  ships (``weights/vST0.0/vgg_shift_tolerant.pth``; install with ``pip install --no-deps stlpips-pytorch``).
* ``vanilla``: the original LPIPS-VGG (plain max-pool). It needs the ImageNet VGG16 backbone as a local
  torchvision-format state dict (``features.N.weight``) and the LPIPS linear heads (``lin0.model.1.weight``, ...).

What the weight file pins down, and what it does not:
* verified from the file: the layer list and indices (conv/relu pairs, one parameter-free module followed by a
  blur module with a ``filt`` buffer [C,1,3,3] at every down-sampling point), the blur kernel values, the channel
  widths, the scaling-layer constants and the five non-negative heads; all keys load with ``strict=True``.
* inferred, not verifiable from weights: the parameter-free module before each blur is the stride-1 2×2 max-pool
  of MaxBlurPool; the blur pads by reflection (1 px each side); the 3×3 convs use 1-pixel zero padding as in
  VGG16 (``conv_padding_mode`` switches this for experiments: reflect/replicate/circular padding move distances
  on 32² CIFAR images by 10–20 %, so this choice matters at that level); the distance head is the unchanged LPIPS
  one. Bit-level agreement with the reference ``stlpips`` package has not been checked (it is deliberately never
  imported here).
"""

from __future__ import annotations

import importlib.util
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LPIPS", "find_stlpips_weights"]

# VGG16 configuration "D": conv widths, "M" marks a down-sampling point.
_VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# LPIPS taps relu1_2 ... relu5_3: number of VGG blocks (conv widths or "M") that make up each slice.
_SLICE_ENDS = (2, 5, 9, 13, 17)
_TAP_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS input normalisation, the same constants for both variants (stored in the ST-LPIPS file).
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


def find_stlpips_weights(net: str = "vgg") -> Path:
    """Path of the ST-LPIPS weight file inside the installed ``stlpips-pytorch`` wheel (the package is never imported).

    Raises:
        FileNotFoundError: the wheel (or the file in it) is missing.
    """
    spec = importlib.util.find_spec("stlpips_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("ST-LPIPS weights not found: install them with `pip install --no-deps stlpips-pytorch`")
    for root in spec.submodule_search_locations:
        path = Path(root) / "weights" / "vST0.0" / f"{net}_shift_tolerant.pth"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"stlpips-pytorch is installed but ships no weights/vST0.0/{net}_shift_tolerant.pth; reinstall it with "
        "`pip install --no-deps --force-reinstall stlpips-pytorch`"
    )


def _unit_normalize(feats: Tensor) -> Tensor:
    """[B,C,H,W] → every C-vector scaled to unit L2 norm; an all-zero vector stays zero.

    x / max(‖x‖, eps) has a finite gradient at an all-zero vector (every ReLU of a location dead), where LPIPS's
    x / (sqrt(Σx²) + eps) back-propagates 0·∞ = NaN; the values differ by < 1e-10 relative.
    """
    return F.normalize(feats, dim=1, eps=1e-10)


class _ScalingLayer(nn.Module):
    """(x − shift) / scale with per-channel constants; buffers so they load from the weight file."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.shift) / self.scale


class _BlurDownsample(nn.Module):
    """Depth-wise 3×3 binomial low-pass evaluated at stride 2 (the "Blur" half of MaxBlurPool)."""

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = torch.outer(taps, taps) / 16.0
        # Persistent buffer: the ST-LPIPS file stores it as `filt`, and loading it keeps us honest about its values.
        self.register_buffer("filt", kernel.expand(channels, 1, 3, 3).clone())

    def forward(self, x: Tensor) -> Tensor:
        # Reflection keeps borders from looking like edges, which would break shift tolerance near the frame.
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return F.conv2d(x, self.filt, stride=2, groups=x.shape[1])


class _LinearHead(nn.Module):
    """LPIPS head: dropout (a no-op in eval) + non-negative 1×1 conv to one channel; keys `model.1.weight`."""

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class _VGG16Taps(nn.Module):
    """VGG16 conv trunk split into five slices ending at relu1_2 ... relu5_3.

    Sub-module names are the layer indices of the flattened trunk, so the state dict reads ``slice2.5.filt``,
    ``slice3.12.weight``... With ``anti_aliased`` every "M" becomes two layers (max-pool 2/1, blur 3/2), which is
    the indexing of the ST-LPIPS file; without it the indices are torchvision's ``vgg16().features``.
    """

    def __init__(self, *, anti_aliased: bool, conv_padding_mode: str = "zeros") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ends: list[int] = []
        in_ch = 3
        for block, spec in enumerate(_VGG16_CFG, start=1):
            if spec == "M":
                if anti_aliased:
                    layers += [nn.MaxPool2d(kernel_size=2, stride=1), _BlurDownsample(channels=in_ch)]
                else:
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                conv = nn.Conv2d(in_ch, int(spec), kernel_size=3, padding=1, padding_mode=conv_padding_mode)
                layers += [conv, nn.ReLU(inplace=False)]
                in_ch = int(spec)
            if block in _SLICE_ENDS:
                ends.append(len(layers))
        start = 0
        for i, end in enumerate(ends, start=1):
            named = OrderedDict((str(j), layers[j]) for j in range(start, end))
            self.add_module(f"slice{i}", nn.Sequential(named))
            start = end

    def forward(self, x: Tensor) -> list[Tensor]:
        """[B,3,H,W] → five feature maps [B,C_l,H_l,W_l], C = 64, 128, 256, 512, 512."""
        taps = []
        for i in range(1, 6):
            x = getattr(self, f"slice{i}")(x)
            taps.append(x)
        return taps


def _require_file(path: str | Path | None, *, what: str, origin: str) -> Path:
    if path is None:
        raise FileNotFoundError(f"{what} not given; {origin}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found at {p}; {origin}")
    return p


def _load_state_dict(path: Path) -> dict[str, Tensor]:
    # weights_only: never unpickle arbitrary objects from a user-supplied file.
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


class LPIPS(nn.Module):
    """Frozen LPIPS distance. ``forward(x, y)`` takes images [B,3,H,W] in [-1, 1] and returns distances [B].

    The module never trains (``train()`` is a no-op that keeps eval mode, parameters have ``requires_grad=False``),
    but gradients flow to both inputs, so it can be used as a loss. Inputs must be at least 24×24 (shift-tolerant:
    the fourth blur needs a 2-pixel map) or 16×16 (vanilla).

    Args:
        variant: ``"shift_tolerant"`` (ST-LPIPS weights from the stlpips-pytorch wheel) or ``"vanilla"``.
        weights: ST-LPIPS file (default: the wheel's ``vgg_shift_tolerant.pth``), or for ``vanilla`` the LPIPS
            linear-head file (``vgg.pth`` of the lpips package, keys ``lin0.model.1.weight`` ...).
        backbone_weights: ``vanilla`` only: a torchvision-format VGG16 ImageNet state dict (``features.N.weight``).
    """

    def __init__(
        self,
        *,
        variant: str = "shift_tolerant",
        weights: str | Path | None = None,
        backbone_weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        if variant not in ("shift_tolerant", "vanilla"):
            raise ValueError(f"unknown LPIPS variant {variant!r}; expected 'shift_tolerant' or 'vanilla'")
        self.variant = variant
        self.scaling_layer = _ScalingLayer()
        self.net = _VGG16Taps(anti_aliased=variant == "shift_tolerant")
        for i, ch in enumerate(_TAP_CHANNELS):
            self.add_module(f"lin{i}", _LinearHead(channels=ch))

        if variant == "shift_tolerant":
            if backbone_weights is not None:
                raise ValueError("backbone_weights is for variant='vanilla'; the ST-LPIPS file holds its own trunk")
            if weights is None:
                path = find_stlpips_weights("vgg")
            else:
                path = _require_file(
                    weights,
                    what="ST-LPIPS weights",
                    origin="it is weights/vST0.0/vgg_shift_tolerant.pth of `pip install --no-deps stlpips-pytorch`",
                )
            self.load_state_dict(_load_state_dict(path), strict=True)
        else:
            self._load_vanilla(weights=weights, backbone_weights=backbone_weights)

        self.requires_grad_(False)
        super().train(False)

    def _load_vanilla(self, *, weights: str | Path | None, backbone_weights: str | Path | None) -> None:
        backbone = _require_file(
            backbone_weights,
            what="VGG16 backbone weights",
            origin="save torchvision's ImageNet vgg16 state dict (keys features.N.weight/bias) to a local file "
            "and pass its path as backbone_weights",
        )
        heads = _require_file(
            weights,
            what="LPIPS linear-head weights",
            origin="use weights/v0.1/vgg.pth from the `lpips` package (keys lin0.model.1.weight ...) and pass "
            "its path as weights",
        )
        trunk_state = _load_state_dict(backbone)
        # Map torchvision's flat `features.N.*` onto our per-slice names; the classifier keys are not needed.
        index_to_slice = {int(idx): name for name, sl in self.net.named_children() for idx, _ in sl.named_children()}
        mapped: dict[str, Tensor] = {}
        for key, value in trunk_state.items():
            parts = key.split(".")
            if parts[0] != "features":
                continue
            if len(parts) != 3 or int(parts[1]) not in index_to_slice:
                raise ValueError(f"unexpected key {key!r} in VGG16 backbone file {backbone}")
            mapped[f"{index_to_slice[int(parts[1])]}.{parts[1]}.{parts[2]}"] = value
        self.net.load_state_dict(mapped, strict=True)
        head_state = {k: v for k, v in _load_state_dict(heads).items() if k.startswith("lin")}
        for i in range(len(_TAP_CHANNELS)):
            getattr(self, f"lin{i}").load_state_dict(
                {k.split(".", 1)[1]: v for k, v in head_state.items() if k.split(".", 1)[0] == f"lin{i}"}, strict=True
            )

    def train(self, mode: bool = True) -> LPIPS:
        """Stays in eval mode: the metric is frozen (dropout in the heads must stay off)."""
        return super().train(False)

    def layer_distances(self, x: Tensor, y: Tensor) -> list[Tensor]:
        """Per-layer terms: five tensors [B], whose sum is ``forward(x, y)``."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected two images [B,3,H,W] of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        min_size = 24 if self.variant == "shift_tolerant" else 16  # the last blur/pool must see >= 2 pixels
        if min(x.shape[-2:]) < min_size:
            raise ValueError(
                f"{self.variant} LPIPS needs images of at least {min_size}×{min_size}, got {tuple(x.shape)}"
            )
        # One trunk pass over both batches (same FLOPs, half the kernel launches).
        feats = self.net(self.scaling_layer(torch.cat([x, y], dim=0)))
        out = []
        for i, f in enumerate(feats):
            fx, fy = f.chunk(2, dim=0)
            diff = (_unit_normalize(fx) - _unit_normalize(fy)).square()
            out.append(getattr(self, f"lin{i}")(diff).mean(dim=(1, 2, 3)))
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Distances [B] between images x, y [B,3,H,W] in [-1, 1]."""
        return torch.stack(self.layer_distances(x, y), dim=0).sum(dim=0)
