"""Linear probe and weighted k-NN on synthetic features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergevq.eval.probe import knn_accuracy, linear_probe, pixel_features


def _blobs(
    n_per_class: int, classes: int, dim: int, *, spread: float, seed: int, noise_seed: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around class centres drawn from ``seed``; ``spread`` small → linearly separable."""
    centres = np.random.default_rng(seed).standard_normal((classes, dim)) * 3
    rng = np.random.default_rng(seed if noise_seed is None else noise_seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    features = centres[labels] + spread * rng.standard_normal((labels.size, dim))
    order = rng.permutation(labels.size)
    return features[order].astype(np.float32), labels[order]


def test_linear_probe_separable_features() -> None:
    x_train, y_train = _blobs(100, 6, 16, spread=0.3, seed=0, noise_seed=1)
    x_test, y_test = _blobs(30, 6, 16, spread=0.3, seed=0, noise_seed=2)  # same classes, fresh samples
    # Offset and scale the raw features: standardisation with train statistics must absorb it.
    result = linear_probe(x_train * 50 + 1000, y_train, x_test * 50 + 1000, y_test, epochs=10, lr=5e-2, batch_size=128)
    assert result.top1 == 1.0 and result.train_top1 == 1.0
    assert result.top5 == 1.0 and result.num_classes == 6
    assert (result.num_train, result.num_test) == (600, 180)


def test_linear_probe_random_labels_is_near_chance() -> None:
    rng = np.random.default_rng(2)
    classes = 4
    x_train = rng.standard_normal((800, 32)).astype(np.float32)
    x_test = rng.standard_normal((800, 32)).astype(np.float32)
    result = linear_probe(
        x_train,
        rng.integers(0, classes, 800),
        x_test,
        rng.integers(0, classes, 800),
        epochs=10,
        lr=1e-2,
        batch_size=200,
    )
    assert abs(result.top1 - 1 / classes) < 0.07  # 800 test samples: std of chance accuracy ≈ 0.015
    assert result.top5 is None  # fewer than 5 classes


def test_linear_probe_is_deterministic_given_seed() -> None:
    x, y = _blobs(40, 5, 8, spread=2.0, seed=3)  # overlapping classes: the result depends on every step
    kwargs = dict(epochs=5, lr=5e-2, batch_size=32)
    a = linear_probe(x[:150], y[:150], x[150:], y[150:], seed=7, **kwargs)
    b = linear_probe(torch.from_numpy(x[:150]), torch.from_numpy(y[:150]), x[150:], y[150:], seed=7, **kwargs)
    assert a == b
    c = linear_probe(x[:150], y[:150], x[150:], y[150:], seed=8, **kwargs)
    assert c.final_loss != a.final_loss  # a different shuffle takes a different path


def test_linear_probe_is_invariant_to_per_feature_affine_maps() -> None:
    # Standardising with train statistics makes the probe blind to per-feature units and offsets.
    x, y = _blobs(40, 5, 8, spread=2.0, seed=5)
    scales = np.geomspace(0.1, 10.0, 8).astype(np.float32)
    kwargs = dict(epochs=5, lr=5e-2, batch_size=32)
    a = linear_probe(x[:150], y[:150], x[150:], y[150:], **kwargs)
    b = linear_probe(x[:150] * scales + 100, y[:150], x[150:] * scales + 100, y[150:], **kwargs)
    assert b.final_loss == pytest.approx(a.final_loss, rel=1e-3)
    assert b.top1 == pytest.approx(a.top1, abs=0.02)


def test_linear_probe_validates_inputs() -> None:
    with pytest.raises(ValueError, match="labels for"):
        linear_probe(np.zeros((4, 2)), np.zeros(3), np.zeros((2, 2)), np.zeros(2))
    with pytest.raises(ValueError, match="features"):
        linear_probe(np.zeros((4, 2)), np.zeros(4), np.zeros((2, 3)), np.zeros(2))


def _knn_brute_force(train, y_train, test, y_test, k: int, temperature: float) -> float:
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    correct = 0
    for row, label in zip(test, y_test):
        similarity = train @ row
        neighbours = np.argsort(-similarity)[:k]
        votes: dict[int, float] = {}
        for j in neighbours:
            votes[int(y_train[j])] = votes.get(int(y_train[j]), 0.0) + np.exp(similarity[j] / temperature)
        correct += max(votes, key=lambda c: (votes[c], -c)) == label
    return correct / len(y_test)


@pytest.mark.parametrize(("k", "temperature"), [(1, 0.07), (5, 0.07), (20, 0.5)])
def test_knn_matches_brute_force(k: int, temperature: float) -> None:
    x, y = _blobs(30, 5, 12, spread=3.0, seed=4)  # heavily overlapping: accuracy well inside (0, 1)
    train, test = x[:100], x[100:]
    expected = _knn_brute_force(train.astype(np.float64), y[:100], test.astype(np.float64), y[100:], k, temperature)
    got = knn_accuracy(train, y[:100], test, y[100:], k=k, temperature=temperature, chunk_size=7)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0.2 < expected < 1.0


def test_knn_separable_and_random() -> None:
    x, y = _blobs(50, 4, 16, spread=0.2, seed=5)
    assert knn_accuracy(x[:150], y[:150], x[150:], y[150:]) == 1.0
    rng = np.random.default_rng(6)
    accuracy = knn_accuracy(
        rng.standard_normal((600, 16)), rng.integers(0, 4, 600), rng.standard_normal((600, 16)), rng.integers(0, 4, 600)
    )
    assert abs(accuracy - 0.25) < 0.07
    with pytest.raises(ValueError, match="k must be"):
        knn_accuracy(x[:5], y[:5], x[5:], y[5:], k=6)


def test_pixel_features_flatten_batches_in_order() -> None:
    images = torch.linspace(-1, 1, 5 * 3 * 4 * 2).reshape(5, 3, 4, 2)
    seen: list[int] = []
    batches = [(images[:2], torch.tensor([0, 1])), (images[2:], [1, 0, 1])]  # list labels are accepted too
    features, labels = pixel_features(batches=batches, progress=seen.append)
    assert features.shape == (5, 3 * 4 * 2) and features.dtype == torch.float32
    assert torch.equal(features, images.flatten(1))  # values kept as given: the tokenizer's [-1, 1] scaling
    assert labels.tolist() == [0, 1, 1, 0, 1] and seen == [2, 3]
    with pytest.raises(ValueError, match="no images"):
        pixel_features(batches=[])
    with pytest.raises(ValueError, match="after"):
        pixel_features(batches=[(images[:1], [0]), (torch.zeros(1, 3, 2, 2), [0])])
