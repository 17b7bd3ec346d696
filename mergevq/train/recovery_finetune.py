"""Fine-tune the learned Source Recovery on a generator's own samples (paper Table A2: "5 (optional)" epochs).

RandAR generates K merged codes and nothing else; the Source Recovery must say which grid positions each code covers
(SPEC §3, §5). It was trained in stage 1 on the encoder's tokens of *real* images. A generator's samples are a shifted
distribution, so the paper optionally fine-tunes the module after stage 2. The paper does not say how the targets are
obtained; generated codes have no true assignment. Here they come from the tokenizer itself:

1. the generator's decoded samples (``samples.npz`` of ``mergevq sample``) are **re-encoded** at each K, which gives
   pairs ``(codes [K, d], assignment [L])`` on images of the generator's distribution;
2. only the Source Recovery is trained on those pairs (everything else frozen), with its stage-1 loss and the paper's
   Table A2 optimiser: AdamW (0.9, 0.95), weight decay 1e-2, lr 1e-4, a few epochs;
3. a held-out share of the pairs measures the recovery accuracy (positions given their true merged token) before and
   after, so the effect is visible without an FID run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mergevq.tokenizer.model import MergeVQ
from mergevq.train.rng import derive_seed

__all__ = ["RecoveryPairs", "RecoveryFinetune", "recovery_pairs", "recovery_accuracy", "finetune_recovery"]


@dataclass
class RecoveryPairs:
    """Training pairs of one K: the merged codes and the encoder's assignment of the L positions to them."""

    num_tokens: int
    codes: Tensor  # [N, K, d] float, the quantised merged tokens (±1 per bit)
    assignment: Tensor  # [N, L] int64 in [0, K)


@dataclass
class RecoveryFinetune:
    """What :func:`finetune_recovery` did: accuracies per K on the held-out pairs, before and after, and the losses."""

    accuracy_before: dict[int, float]
    accuracy_after: dict[int, float]
    train_losses: list[float]  # mean loss per epoch
    num_train: int  # pairs per K used for training
    num_heldout: int  # pairs per K held out
    seconds: float


@torch.inference_mode()
def recovery_pairs(
    *, model: MergeVQ, images: Tensor, num_tokens: Sequence[int], batch_size: int = 64
) -> list[RecoveryPairs]:
    """Re-encode ``images [N, 3, H, W]`` (in [-1, 1], the model's size) at each K into Source Recovery pairs."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [N, 3, H, W], got shape {tuple(images.shape)}")
    size = model.config.image_size
    if tuple(images.shape[-2:]) != (size, size):
        raise ValueError(f"images are {tuple(images.shape[-2:])}, the tokenizer {model.config.name!r} expects {size}²")
    model.eval()
    out = []
    for k in num_tokens:
        codes, assignment = [], []
        for first in range(0, images.shape[0], batch_size):
            encoded = model.encode(images[first : first + batch_size], num_tokens=k)
            codes.append(encoded.codes.float())
            assignment.append(encoded.assignment)
        out.append(RecoveryPairs(k, torch.cat(codes), torch.cat(assignment)))
    return out


@torch.inference_mode()
def recovery_accuracy(*, model: MergeVQ, pairs: RecoveryPairs, batch_size: int = 256) -> float:
    """Share of grid positions whose predicted merged token is the true one."""
    model.recovery.eval()
    hits = 0
    for first in range(0, pairs.codes.shape[0], batch_size):
        predicted = model.recovery(pairs.codes[first : first + batch_size]).assignment
        hits += int((predicted == pairs.assignment[first : first + batch_size]).sum())
    return hits / max(1, pairs.assignment.numel())


def _split(pairs: RecoveryPairs, index: Tensor) -> RecoveryPairs:
    return RecoveryPairs(pairs.num_tokens, pairs.codes[index], pairs.assignment[index])


def finetune_recovery(
    *,
    model: MergeVQ,
    pairs: Sequence[RecoveryPairs],
    epochs: int = 5,
    lr: float = 1e-4,
    weight_decay: float = 1e-2,
    batch_size: int = 64,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> RecoveryFinetune:
    """Train ``model.recovery`` in place on ``pairs`` (every K in turn, one shuffled mini-batch stream per epoch).

    The first ``heldout_fraction`` of a fixed random permutation of the pairs is held out for the accuracies;
    ``progress`` is called with the number of training pairs of each step.
    """
    if model.recovery is None:
        raise ValueError(f"preset {model.config.name!r} has no learned Source Recovery to fine-tune")
    if not pairs:
        raise ValueError("no training pairs")
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must lie in [0, 1), got {heldout_fraction}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    count = pairs[0].codes.shape[0]
    if any(p.codes.shape[0] != count for p in pairs):
        raise ValueError("every K needs the same number of pairs (they come from the same images)")
    start = time.perf_counter()
    order = torch.randperm(count, generator=torch.Generator().manual_seed(derive_seed(seed, 1)))
    num_heldout = int(math.floor(count * heldout_fraction))
    heldout = [_split(p, order[:num_heldout]) for p in pairs]
    train = [_split(p, order[num_heldout:]) for p in pairs]
    if train[0].codes.shape[0] == 0:
        raise ValueError(f"all {count} pairs are held out: lower heldout_fraction or add samples")

    def accuracies() -> dict[int, float]:
        return {p.num_tokens: recovery_accuracy(model=model, pairs=p) for p in heldout} if num_heldout else {}

    before = accuracies()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trainable = list(model.recovery.parameters())
    for parameter in trainable:
        parameter.requires_grad_(True)
    # Table A2 (Source Recovery): AdamW (0.9, 0.95), weight decay 1e-2, lr 1e-4.
    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    rng = torch.Generator().manual_seed(derive_seed(seed, 2))
    losses: list[float] = []
    try:
        for _ in range(epochs):
            model.recovery.train()
            # One stream of (K, mini-batch) steps, shuffled across K so no level is trained last.
            steps = [
                (i, idx)
                for i, p in enumerate(train)
                for idx in torch.randperm(p.codes.shape[0], generator=rng).split(batch_size)
            ]
            total, seen = 0.0, 0
            for j in torch.randperm(len(steps), generator=rng).tolist():
                i, idx = steps[j]
                out = model.recovery(train[i].codes[idx])
                loss = model.recovery.loss(out.logits, train[i].assignment[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(idx)
                seen += len(idx)
                if progress is not None:
                    progress(len(idx))
            losses.append(total / seen)
    finally:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        model.eval()
    return RecoveryFinetune(
        accuracy_before=before,
        accuracy_after=accuracies(),
        train_losses=losses,
        num_train=train[0].codes.shape[0],
        num_heldout=num_heldout,
        seconds=time.perf_counter() - start,
    )
