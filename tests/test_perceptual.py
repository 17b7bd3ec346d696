"""LPIPS: ST-LPIPS weight loading, metric properties, gradients, vanilla-variant loading."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mergevq.losses.perceptual import LPIPS, _unit_normalize, find_stlpips_weights

try:
    _ST_WEIGHTS: Path | None = find_stlpips_weights("vgg")
except FileNotFoundError:
    _ST_WEIGHTS = None

needs_st = pytest.mark.skipif(_ST_WEIGHTS is None, reason="stlpips-pytorch wheel not installed (weights only)")
CIFAR_ROOT = Path(
    os.environ.get("MERGEVQ_CIFAR10", Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10")
)


@pytest.fixture(scope="module")
def st_lpips() -> LPIPS:
    if _ST_WEIGHTS is None:
        pytest.skip("stlpips-pytorch wheel not installed (weights only)")
    return LPIPS()


def _smooth_image(*, seed: int, size: int = 32, batch: int = 1) -> torch.Tensor:
    """A natural-looking test image in [-1, 1]: colour gradient + low-pass random field + a few edges."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    base = torch.stack([xx, yy, -(xx + yy) / 2]).unsqueeze(0).repeat(batch, 1, 1, 1) * 0.5
    field = torch.randn(batch, 3, size // 8, size // 8, generator=g)
    field = F.interpolate(field, size=size, mode="bicubic", align_corners=False) * 0.3
    edges = (torch.sin(xx * 9.0 + yy * 4.0) > 0.3).float() * 0.4
    return (base + field + edges).clamp(-1, 1)


def _cifar_batch(n: int) -> torch.Tensor:
    """The first test image of each of the first ``n`` CIFAR-10 classes, [n,3,32,32] in [-1, 1]."""
    from PIL import Image

    test = CIFAR_ROOT / "test"
    if not test.is_dir():
        pytest.skip(f"CIFAR-10 not found at {CIFAR_ROOT} (set MERGEVQ_CIFAR10)")
    imgs = []
    for cls_dir in sorted(p for p in test.iterdir() if p.is_dir())[:n]:
        arr = np.asarray(Image.open(sorted(cls_dir.iterdir())[0]).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        imgs.append(torch.from_numpy(arr).permute(2, 0, 1))
    return torch.stack(imgs)


@needs_st
def test_stlpips_file_matches_module_keys_exactly() -> None:
    state = torch.load(_ST_WEIGHTS, map_location="cpu", weights_only=True)
    fresh = LPIPS(weights=_ST_WEIGHTS)
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(fresh.state_dict()) == set(state)
    # The blur buffers in the file are the [1,2,1]⊗[1,2,1]/16 binomial our module builds.
    expected = torch.outer(torch.tensor([1.0, 2.0, 1.0]), torch.tensor([1.0, 2.0, 1.0])) / 16
    for key in ("net.slice2.5.filt", "net.slice5.27.filt"):
        assert torch.equal(state[key][0, 0], expected)
    for i in range(5):
        assert (state[f"lin{i}.model.1.weight"] >= 0).all()


def test_unit_normalize_has_finite_gradient_at_dead_locations() -> None:
    feats = torch.zeros(1, 4, 2, 2)
    feats[0, :, 0, 0] = torch.tensor([3.0, 0.0, 4.0, 0.0])  # one live location, three all-zero (dead-ReLU) ones
    feats.requires_grad_(True)
    out = _unit_normalize(feats)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.6, 0.0, 0.8, 0.0]))
    assert torch.all(out[0, :, 1:, :] == 0)
    out.square().sum().backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()


def test_missing_weights_raise_clear_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="stlpips-pytorch"):
        LPIPS(weights=missing)
    with pytest.raises(FileNotFoundError, match="torchvision"):
        LPIPS(variant="vanilla", weights=missing, backbone_weights=missing)
    with pytest.raises(FileNotFoundError, match="VGG16 backbone weights not given"):
        LPIPS(variant="vanilla")
    with pytest.raises(ValueError, match="unknown LPIPS variant"):
        LPIPS(variant="alex")


def test_find_stlpips_weights_message_when_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps stlpips-pytorch"):
        find_stlpips_weights()


def test_rejects_too_small_or_mismatched_images(st_lpips: LPIPS) -> None:
    with pytest.raises(ValueError, match="at least 24"):
        st_lpips(torch.zeros(1, 3, 20, 32), torch.zeros(1, 3, 20, 32))
    with pytest.raises(ValueError, match="equal shape"):
        st_lpips(torch.zeros(1, 3, 32, 32), torch.zeros(2, 3, 32, 32))
    with torch.no_grad():
        assert st_lpips(torch.zeros(1, 3, 24, 24), torch.full((1, 3, 24, 24), 0.5)).item() > 0


def test_frozen_and_stays_in_eval(st_lpips: LPIPS) -> None:
    assert all(not p.requires_grad for p in st_lpips.parameters())
    st_lpips.train()
    assert not st_lpips.training and not any(m.training for m in st_lpips.modules())


def test_identity_symmetry_positivity(st_lpips: LPIPS) -> None:
    x = _smooth_image(seed=0, batch=2)
    y = _smooth_image(seed=1, batch=2)
    with torch.no_grad():
        d_xx = st_lpips(x, x)
        d_xy = st_lpips(x, y)
        d_yx = st_lpips(y, x)
    assert d_xx.shape == (2,)
    assert torch.all(d_xx == 0)
    torch.testing.assert_close(d_xy, d_yx, rtol=1e-5, atol=1e-6)
    assert torch.all(d_xy > 0.05)


def test_monotonic_in_noise_strength(st_lpips: LPIPS) -> None:
    x = _smooth_image(seed=2)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    sigmas = torch.tensor([0.02, 0.05, 0.1, 0.2, 0.4]).view(-1, 1, 1, 1)
    with torch.no_grad():
        dists = st_lpips(x.expand(5, -1, -1, -1), (x + sigmas * noise).clamp(-1, 1)).tolist()
    assert all(a < b for a, b in zip(dists, dists[1:])), dists


def test_batch_size_invariance(st_lpips: LPIPS) -> None:
    x = _smooth_image(seed=4, batch=2)
    y = _smooth_image(seed=5, batch=2)
    with torch.no_grad():
        batched = st_lpips(x, y)
        single = torch.cat([st_lpips(x[i : i + 1], y[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-6)


def test_gradient_reaches_inputs(st_lpips: LPIPS) -> None:
    x = _smooth_image(seed=6).requires_grad_(True)
    y = _smooth_image(seed=7)
    st_lpips(x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # Descending the distance moves x toward y.
    with torch.no_grad():
        before = st_lpips(x, y)
        after = st_lpips(x - 0.05 * x.grad.sign(), y)
    assert after < before


def test_real_images_rank_distortions_sensibly(st_lpips: LPIPS) -> None:
    x = _cifar_batch(4)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        d_noise = st_lpips(x, (x + 0.1 * noise).clamp(-1, 1))
        d_other = st_lpips(x, x.roll(1, dims=0))  # a different CIFAR image
    assert torch.all(d_noise > 0) and torch.all(d_noise < d_other)


def test_one_pixel_shift_is_tolerated(st_lpips: LPIPS) -> None:
    """ST-LPIPS's design goal: at equal pixel error, a 1-px shift is far closer than white noise."""
    x = _cifar_batch(6)
    a, b = x[..., 1:], x[..., :-1]  # the same scene shifted by one pixel (both cropped to 32×31)
    mse_shift = (a - b).square().mean(dim=(1, 2, 3), keepdim=True)
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(9))
    noisy = a + noise * mse_shift.sqrt()  # per image, the same expected squared error as the shift
    with torch.no_grad():
        d = st_lpips(torch.cat([a, a]), torch.cat([b, noisy]))
    d_shift, d_noise = d.chunk(2)
    assert torch.all(d_shift > 0)
    # Measured ratio: <= 0.13 over 30 CIFAR test images (median 0.05).
    assert torch.all(d_shift < 0.3 * d_noise), (d_shift, d_noise)


def _torchvision_style_vgg16_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    state: dict[str, torch.Tensor] = {}
    idx, in_ch = 0, 3
    for v in cfg:
        if v == "M":
            idx += 1
            continue
        state[f"features.{idx}.weight"] = torch.randn(v, in_ch, 3, 3, generator=g) * (2.0 / (9 * in_ch)) ** 0.5
        state[f"features.{idx}.bias"] = torch.zeros(v)
        idx, in_ch = idx + 2, v
    # torchvision's file also holds the classifier; LPIPS must ignore it.
    state["classifier.0.weight"] = torch.zeros(4, 8)
    return state


def test_vanilla_variant_loads_local_files(tmp_path: Path) -> None:
    backbone, heads = tmp_path / "vgg16.pth", tmp_path / "vgg.pth"
    torch.save(_torchvision_style_vgg16_state(0), backbone)
    g = torch.Generator().manual_seed(1)
    torch.save(
        {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate((64, 128, 256, 512, 512))},
        heads,
    )
    model = LPIPS(variant="vanilla", weights=heads, backbone_weights=backbone)
    saved = torch.load(backbone, weights_only=True)
    # torchvision index 17 (conv4_1) sits in slice4 of the max-pool trunk.
    torch.testing.assert_close(model.net.slice4.get_submodule("17").weight, saved["features.17.weight"])
    x, y = _smooth_image(seed=10), _smooth_image(seed=11)
    with torch.no_grad():
        assert model(x, x).item() == 0.0
        assert model(x, y).item() > 0.0
    # A truncated backbone file is rejected rather than silently half-loaded.
    partial = {k: v for k, v in torch.load(backbone, weights_only=True).items() if not k.startswith("features.28")}
    torch.save(partial, backbone)
    with pytest.raises(RuntimeError, match="features|28"):
        LPIPS(variant="vanilla", weights=heads, backbone_weights=backbone)
