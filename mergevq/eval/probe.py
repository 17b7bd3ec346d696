"""Representation quality of frozen features: linear probe and weighted k-NN accuracy.

Only the math lives here, with the raw-pixel baseline's features (:func:`pixel_features`); feature extraction from a
tokenizer is built on top of the model elsewhere.
Shapes: ``train_features [N, F]``, ``train_labels [N]`` (int, classes ``0..C-1``), ``test_features [M, F]``,
``test_labels [M]``. NumPy arrays and tensors are both accepted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ProbeResult", "knn_accuracy", "linear_probe", "pixel_features"]


def _features(array: Tensor | np.ndarray, device: torch.device) -> Tensor:
    tensor = array if isinstance(array, Tensor) else torch.from_numpy(np.asarray(array))
    if tensor.ndim != 2:
        raise ValueError(f"features must be [N, F], got shape {tuple(tensor.shape)}")
    return tensor.detach().to(device=device, dtype=torch.float32)


def _labels(array: Tensor | np.ndarray, rows: int, device: torch.device) -> Tensor:
    tensor = array if isinstance(array, Tensor) else torch.from_numpy(np.asarray(array))
    tensor = tensor.detach().reshape(-1).to(device=device, dtype=torch.int64)
    if tensor.shape[0] != rows:
        raise ValueError(f"{tensor.shape[0]} labels for {rows} feature rows")
    if tensor.numel() and int(tensor.min()) < 0:
        raise ValueError("labels must be non-negative class indices")
    return tensor


@dataclass(frozen=True)
class ProbeResult:
    """Accuracies are fractions in ``[0, 1]``; ``top5`` is None with fewer than 5 classes."""

    top1: float
    top5: float | None
    train_top1: float
    final_loss: float
    num_classes: int
    num_train: int
    num_test: int


def _topk_accuracy(logits: Tensor, labels: Tensor, k: int) -> float:
    top = logits.topk(k, dim=1).indices
    return float((top == labels[:, None]).any(dim=1).double().mean())


def linear_probe(
    train_features: Tensor | np.ndarray,
    train_labels: Tensor | np.ndarray,
    test_features: Tensor | np.ndarray,
    test_labels: Tensor | np.ndarray,
    *,
    epochs: int = 90,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 1024,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> ProbeResult:
    """Multinomial logistic regression on frozen features; top-1 (and top-5) accuracy on the test set.

    Protocol (paper A.4, after MAE): a parameter-free normalisation, i.e. features are standardised with the
    *training* mean and std (what MAE's affine-free BatchNorm converges to), then one linear layer trained with
    AdamW, ``batch_size`` mini-batches, a per-step cosine LR from ``lr`` to 0 and ``epochs`` epochs (defaults:
    the paper's 90 epochs, batch 1024, LR 1e-3; the paper gives no weight decay, so 0). The head starts at zero
    and the shuffling uses a private generator seeded with ``seed``, so a run is deterministic on a given device.
    """
    device = torch.device(device)
    x_train = _features(train_features, device)
    x_test = _features(test_features, device)
    y_train = _labels(train_labels, x_train.shape[0], device)
    y_test = _labels(test_labels, x_test.shape[0], device)
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"train has {x_train.shape[1]} features, test {x_test.shape[1]}")
    if x_train.shape[0] == 0 or x_test.shape[0] == 0:
        raise ValueError("need at least one train and one test sample")
    num_classes = int(max(int(y_train.max()), int(y_test.max()))) + 1

    mean = x_train.mean(dim=0)
    std = x_train.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant features stay constant (zero)
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std

    head = torch.nn.Linear(x_train.shape[1], num_classes, device=device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(x_train.shape[0] / batch_size)
    total_steps = max(1, epochs * steps_per_epoch)
    generator = torch.Generator(device="cpu").manual_seed(seed)

    step = 0
    loss = torch.zeros(())
    for _ in range(epochs):
        order = torch.randperm(x_train.shape[0], generator=generator).to(device)
        for start in range(0, x_train.shape[0], batch_size):
            batch = order[start : start + batch_size]
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
            loss = F.cross_entropy(head(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1

    with torch.no_grad():
        test_logits = head(x_test)
        train_logits = head(x_train)
    return ProbeResult(
        top1=_topk_accuracy(test_logits, y_test, 1),
        top5=_topk_accuracy(test_logits, y_test, 5) if num_classes >= 5 else None,
        train_top1=_topk_accuracy(train_logits, y_train, 1),
        final_loss=float(loss.detach()),
        num_classes=num_classes,
        num_train=int(x_train.shape[0]),
        num_test=int(x_test.shape[0]),
    )


@torch.no_grad()
def knn_accuracy(
    train_features: Tensor | np.ndarray,
    train_labels: Tensor | np.ndarray,
    test_features: Tensor | np.ndarray,
    test_labels: Tensor | np.ndarray,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
    device: str | torch.device = "cpu",
) -> float:
    """Top-1 accuracy of a temperature-weighted k-NN vote on cosine similarity (DINO's k-NN evaluation).

    Features are L2-normalised (no other preprocessing). Each test row takes its ``k`` most similar training rows;
    neighbour ``j`` votes for its class with weight ``exp(s_j / temperature)``; the class with the largest total
    wins (ties → the smaller class index). Test rows are processed ``chunk_size`` at a time, so memory is
    ``O(chunk_size · N)``. Defaults k=20, T=0.07 as in DINO.
    """
    device = torch.device(device)
    train = F.normalize(_features(train_features, device), dim=1)
    test = F.normalize(_features(test_features, device), dim=1)
    y_train = _labels(train_labels, train.shape[0], device)
    y_test = _labels(test_labels, test.shape[0], device)
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"train has {train.shape[1]} features, test {test.shape[1]}")
    if not 1 <= k <= train.shape[0]:
        raise ValueError(f"k must be in [1, {train.shape[0]}], got {k}")
    if test.shape[0] == 0:
        raise ValueError("need at least one test sample")
    num_classes = int(max(int(y_train.max()), int(y_test.max()))) + 1

    correct = 0
    for start in range(0, test.shape[0], chunk_size):
        similarity = test[start : start + chunk_size] @ train.T  # [c, N]
        top_sim, top_idx = similarity.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(top_sim.shape[0], num_classes, device=device, dtype=weights.dtype)
        votes.scatter_add_(1, y_train[top_idx], weights)
        correct += int((votes.argmax(dim=1) == y_test[start : start + chunk_size]).sum())
    return correct / test.shape[0]


def pixel_features(
    *, batches: Iterable[tuple[Tensor, Tensor]], progress: Callable[[int], object] | None = None
) -> tuple[Tensor, Tensor]:
    """The raw-pixel baseline: ``(images [B, 3, H, W], labels [B])`` batches → ``(features [N, 3·H·W], labels [N])``.

    Images are flattened as given (channel-major), i.e. in the ``[-1, 1]`` scaling the tokenizer sees, so a probe on
    them measures what a linear classifier gets without any encoder. All batches must share one image size.
    """
    features: list[Tensor] = []
    labels: list[Tensor] = []
    for images, batch_labels in batches:
        images = torch.as_tensor(images)
        if images.ndim != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
        if features and images.shape[1:] != features[0].shape[1:]:
            raise ValueError(f"images of shape {tuple(images.shape[1:])} after {tuple(features[0].shape[1:])}")
        features.append(images.detach().float().cpu())
        labels.append(torch.as_tensor(batch_labels).reshape(-1).long().cpu())
        if progress is not None:
            progress(images.shape[0])
    if not features:
        raise ValueError("no images to extract features from")
    return torch.cat(features).flatten(1), torch.cat(labels)
