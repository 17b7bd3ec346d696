"""PSNR, SSIM, streaming accumulation and codebook usage."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mergevq.eval.metrics import (
    CodebookUsage,
    MetricAccumulator,
    ReconstructionEvaluator,
    Summary,
    psnr,
    ssim,
    summarize,
)


def _images(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


# ---------------------------------------------------------------------------------------------------------------------
# PSNR
# ---------------------------------------------------------------------------------------------------------------------


def test_psnr_identical_is_inf_and_constant_offset_is_known() -> None:
    x = _images(3, 8, 8, seed=0)
    assert torch.isinf(psnr(x, x)).all() and bool((psnr(x, x) > 0).all())
    # |error| = 0.1 everywhere: MSE = 0.01, PSNR = 10 log10(2² / 0.01) = 26.0206 dB.
    y = x + 0.1
    torch.testing.assert_close(psnr(x, y), torch.full((3,), 10 * math.log10(400.0), dtype=torch.float64))
    # Same error measured on [0, 1] images with data_range 1 gives the same number.
    torch.testing.assert_close(psnr((x + 1) / 2, (y + 1) / 2, data_range=1.0), psnr(x, y))


def test_psnr_is_per_image_not_per_batch() -> None:
    x = torch.zeros(2, 3, 4, 4)
    y = x.clone()
    y[0] += 0.2  # image 0: MSE 0.04; image 1 exact
    values = psnr(x, y)
    assert values[0].item() == pytest.approx(10 * math.log10(4 / 0.04)) and math.isinf(values[1].item())
    # A whole-batch PSNR (the authors' bug) would report 10 log10(4 / 0.02) for both images.
    assert values[0].item() != pytest.approx(10 * math.log10(4 / 0.02))


def test_summarize_reports_inf_explicitly() -> None:
    summary = summarize(torch.tensor([30.0, float("inf"), 40.0, float("inf"), float("nan")]))
    assert summary == Summary(mean=35.0, num_finite=2, num_inf=2, num_nan=1)
    assert summary.count == 5 and "2 inf" in str(summary) and "1 nan" in str(summary)
    assert summarize([float("inf")] * 3).mean == math.inf
    assert math.isnan(summarize([]).mean)


# ---------------------------------------------------------------------------------------------------------------------
# SSIM
# ---------------------------------------------------------------------------------------------------------------------


def _ssim_brute_force(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """Direct definition: loop over every window position inside the image, per channel. x, y: [C, H, W]."""
    radius = 5
    offsets = np.arange(-radius, radius + 1)
    g1 = np.exp(-(offsets**2) / (2 * 1.5**2))
    weights = np.outer(g1, g1) / np.outer(g1, g1).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for c in range(x.shape[0]):
        for i in range(radius, x.shape[1] - radius):
            for j in range(radius, x.shape[2] - radius):
                px = x[c, i - radius : i + radius + 1, j - radius : j + radius + 1]
                py = y[c, i - radius : i + radius + 1, j - radius : j + radius + 1]
                mx, my = (weights * px).sum(), (weights * py).sum()
                vx = (weights * (px - mx) ** 2).sum()
                vy = (weights * (py - my) ** 2).sum()
                cxy = (weights * (px - mx) * (py - my)).sum()
                values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_brute_force_definition() -> None:
    x = _images(2, 16, 15, seed=1)
    y = (x + 0.3 * _images(2, 16, 15, seed=2)).clamp(-1, 1)
    ours = ssim(x, y)
    for b in range(2):
        # Default: [-1, 1] shifted to [0, 2] intensities, L = 2.
        expected = _ssim_brute_force(x[b].numpy() + 1, y[b].numpy() + 1, 2.0)
        assert ours[b].item() == pytest.approx(expected, abs=1e-12)
    assert ours.shape == (2,) and bool(((ours > -1) & (ours < 1)).all())


def _pattern_pair() -> tuple[np.ndarray, np.ndarray]:
    """Closed-form test images in [0, 1], [H, W, C] (no RNG, so the values below are stable)."""
    i = np.arange(24)[:, None, None]
    j = np.arange(20)[None, :, None]
    c = np.arange(3)[None, None, :]
    a = 0.5 + 0.45 * np.sin(0.7 * i + 0.3 * j + c)
    b = np.clip(a + 0.2 * np.cos(1.3 * i - 0.5 * j + 2 * c) * np.sin(0.9 * j), 0, 1)
    return a, b


def _to_tensor(image01: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image01 * 2 - 1).permute(2, 0, 1)[None]


def test_ssim_matches_recorded_skimage_values() -> None:
    # Recorded once with scikit-image 0.26.0:
    #   structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
    #                         use_sample_covariance=False, data_range=1.0)
    a, b = _pattern_pair()
    assert ssim(_to_tensor(a), _to_tensor(b)).item() == pytest.approx(0.942401192035555, abs=1e-12)
    assert ssim(_to_tensor(a), _to_tensor(1 - a)).item() == pytest.approx(-0.8009111583380529, abs=1e-12)
    # skimage on the raw [-1, 1] arrays with data_range=2 equals our min_value=0; it scores the negative as similar.
    raw = ssim(_to_tensor(a), _to_tensor(1 - a), min_value=0.0).item()
    assert raw == pytest.approx(0.916261547902022, abs=1e-12)


def test_ssim_known_values() -> None:
    x = _images(2, 16, 16, seed=3)
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))
    # Constant images a, b (intensities after the shift): only the luminance term (2ab + C1) / (a² + b² + C1).
    a, b, c1 = 0.6, 1.1, (0.01 * 2) ** 2
    const_x = torch.full((1, 3, 12, 12), a - 1.0)
    const_y = torch.full((1, 3, 12, 12), b - 1.0)
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert ssim(const_x, const_y).item() == pytest.approx(expected, rel=1e-6)
    # Negative of a high-contrast image: structure term is about -1.
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2
    image = (checker.float() * 2 - 1).expand(1, 3, 16, 16)
    assert ssim(image, -image).item() < -0.9
    assert ssim(image, -image).item() == pytest.approx(ssim(-image, image).item(), abs=1e-12)


def test_ssim_rejects_small_images() -> None:
    with pytest.raises(ValueError, match="smaller than"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


# ---------------------------------------------------------------------------------------------------------------------
# Streaming accumulation
# ---------------------------------------------------------------------------------------------------------------------


def test_accumulator_is_batch_size_invariant() -> None:
    rng = np.random.default_rng(0)
    values = rng.standard_normal(101) * 1e3 + 1e-3  # wide dynamic range: naive float sums depend on the order
    values[[5, 50]] = np.inf
    reference = MetricAccumulator()
    reference.update(psnr=values)
    for batch in (1, 7, 33):
        acc = MetricAccumulator()
        for start in range(0, values.size, batch):
            acc.update(psnr=torch.from_numpy(values[start : start + batch]))
        assert acc.summary() == reference.summary()  # bit-identical
    assert reference.summary()["psnr"].num_inf == 2

    # Two shards merged (DDP) equal one pass.
    left, right = MetricAccumulator(), MetricAccumulator()
    left.update(psnr=values[:40])
    right.update(psnr=values[40:])
    assert left.merge(right).summary() == reference.summary()


def test_reconstruction_evaluator_batch_invariance_with_stub_lpips() -> None:
    class MeanAbs(torch.nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return (x - y).abs().flatten(1).mean(1)

    x = _images(10, 16, 16, seed=4)
    y = (x + 0.05 * _images(10, 16, 16, seed=5)).clamp(-1, 1)
    y[3] = x[3]  # one lossless image → one inf PSNR
    summaries = []
    for batch in (10, 3, 1):
        evaluator = ReconstructionEvaluator(lpips=MeanAbs())
        for start in range(0, 10, batch):
            evaluator.update(x[start : start + batch], y[start : start + batch])
        summaries.append(evaluator.summary())
    for summary in summaries[1:]:
        for name in ("psnr", "ssim", "lpips"):
            assert summary[name].mean == pytest.approx(summaries[0][name].mean, rel=1e-13)
            assert summary[name].num_inf == summaries[0][name].num_inf
    assert summaries[0]["psnr"].num_inf == 1 and summaries[0]["psnr"].num_finite == 9
    assert summaries[0]["lpips"].mean == pytest.approx(float((x - y).abs().mean()), rel=1e-12)


def test_reconstruction_evaluator_with_real_lpips(cifar10_root: Path) -> None:
    perceptual = pytest.importorskip("mergevq.losses.perceptual")
    try:
        evaluator = ReconstructionEvaluator(lpips="auto")
    except (FileNotFoundError, ImportError) as error:
        pytest.skip(f"LPIPS weights unavailable: {error}")
    assert isinstance(evaluator.lpips, perceptual.LPIPS)
    files = sorted((cifar10_root / "test" / "dog").glob("*.jpg"))[:4]
    images = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))) for p in files])
    x = images.permute(0, 3, 1, 2).double() / 127.5 - 1
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    values = evaluator.update(x.float(), x.float())
    assert torch.isinf(values["psnr"]).all() and torch.allclose(values["lpips"], torch.zeros(4, dtype=torch.float64))
    values = evaluator.update(x.float(), blurred.float())
    assert bool((values["lpips"] > 0).all()) and bool((values["ssim"] < 1).all())
    summary = evaluator.summary()
    assert summary["psnr"].num_inf == 4 and summary["psnr"].num_finite == 4


# ---------------------------------------------------------------------------------------------------------------------
# Codebook usage
# ---------------------------------------------------------------------------------------------------------------------


def test_codebook_usage_uniform_and_single_code() -> None:
    usage = CodebookUsage(num_codes=2**10)
    m = 37
    usage.update(torch.arange(m).repeat(5).view(5, m))  # uniform over m codes
    assert usage.num_used == m and usage.usage == pytest.approx(m / 2**10)
    assert usage.perplexity == pytest.approx(m, rel=1e-12)
    assert usage.total == 5 * m

    single = CodebookUsage(num_codes=8)
    single.update(torch.full((4, 4), 3))
    assert single.perplexity == pytest.approx(1.0) and single.usage == 1 / 8
    assert math.isnan(CodebookUsage(num_codes=8).perplexity)


def test_codebook_usage_skewed_distribution_and_merge() -> None:
    # Probabilities (1/2, 1/4, 1/4): entropy 1.5 ln 2, perplexity 2^1.5.
    a, b = CodebookUsage(num_codes=4), CodebookUsage(num_codes=4)
    a.update(torch.tensor([0, 0, 1]))
    b.update(torch.tensor([[0], [2]]))
    merged = a.merge(b)
    assert merged.counts.tolist() == [3, 1, 1, 0]
    full = CodebookUsage(num_codes=4)
    full.update(torch.tensor([0, 0, 1, 0, 2, 0, 1, 2]))
    assert full.perplexity == pytest.approx(2**1.5, rel=1e-12)
    assert full.all_reduce().counts.tolist() == [4, 2, 2, 0]  # no process group: unchanged


def test_codebook_usage_large_codebook_and_validation() -> None:
    usage = CodebookUsage(num_codes=2**18)
    indices = torch.randint(0, 2**18, (64, 256), generator=torch.Generator().manual_seed(0))
    usage.update(indices)
    assert usage.num_used == len(set(indices.flatten().tolist()))
    assert usage.counts.sum().item() == indices.numel()
    with pytest.raises(ValueError, match="must lie in"):
        usage.update(torch.tensor([2**18]))
    with pytest.raises(ValueError, match="must lie in"):
        usage.update(torch.tensor([-1]))
    with pytest.raises(TypeError):
        usage.update(torch.tensor([1.0]))
