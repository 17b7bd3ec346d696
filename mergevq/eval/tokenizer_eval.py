"""Dataset-level tokenizer evaluation: reconstruction metrics at several K, and frozen features for probing.

:func:`evaluate_tokenizer` makes **one pass** over the data. Per batch it computes the Inception features of the
originals once, then for every K encodes, decodes, clamps to ``[-1, 1]`` and accumulates

- PSNR, SSIM and LPIPS per image (:class:`~mergevq.eval.metrics.ReconstructionEvaluator`; dataset figure = mean of
  the per-image values, so it does not depend on the batch size);
- the Inception features of the reconstructions, as a streaming mean/covariance (:class:`GaussianAccumulator`), so
  memory stays at one ``2048×2048`` matrix per K whatever the image count;
- the code histogram (:class:`~mergevq.eval.metrics.CodebookUsage`).

rFID at K is the Fréchet distance between the originals' and the reconstructions' Gaussians.

:func:`extract_probe_features` returns, per K, the CLS token and the mean of the merged tokens of the frozen encoder
(both ``[N, D]``, before the ``D → d`` projection and the quantizer).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from mergevq.eval.fid import FIDStatistics, InceptionFeatures, frechet_distance
from mergevq.eval.metrics import CodebookUsage, ReconstructionEvaluator, Summary
from mergevq.tokenizer.model import MergeVQ

__all__ = [
    "GaussianAccumulator",
    "KEvaluation",
    "ProbeFeatures",
    "TokenizerEvaluation",
    "evaluate_tokenizer",
    "extract_probe_features",
]

ProgressFn = Callable[[int], None]  # called with the number of images just processed


class GaussianAccumulator:
    """Streaming mean and unbiased covariance of feature rows ``[n, F]``, merged batch by batch (Chan et al.).

    Each batch contributes its own centred scatter matrix, so there is no ``E[xxᵀ] − μμᵀ`` cancellation; results
    equal ``np.cov(all_rows, rowvar=False)`` to float64 rounding for any split into batches.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.scatter = np.zeros((dim, dim), dtype=np.float64)  # Σ (x − μ)(x − μ)ᵀ

    def update(self, features: Tensor | np.ndarray) -> None:
        rows = features.detach().cpu().double().numpy() if isinstance(features, Tensor) else np.asarray(features)
        rows = rows.astype(np.float64, copy=False).reshape(-1, self.dim)
        n = rows.shape[0]
        if n == 0:
            return
        batch_mean = rows.mean(axis=0)
        centred = rows - batch_mean
        delta = batch_mean - self.mean
        total = self.count + n
        self.scatter += centred.T @ centred + np.outer(delta, delta) * (self.count * n / total)
        self.mean += delta * (n / total)
        self.count = total

    def statistics(self) -> FIDStatistics:
        if self.count < 2:
            raise ValueError(f"need at least 2 feature rows for a covariance, got {self.count}")
        return FIDStatistics(mu=self.mean.copy(), sigma=self.scatter / (self.count - 1), num_images=self.count)


# ----------------------------------------------------------------------------------------------------------------------
# Reconstruction at several K
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class KEvaluation:
    """Metrics of one K. ``merged_tokens`` is the K the encoder actually used (it keeps the ratio K/L when the
    evaluation resolution differs from the model's)."""

    num_tokens: int
    merged_tokens: int
    metrics: dict[str, Summary]  # "psnr", "ssim" and, when LPIPS ran, "lpips"
    rfid: float | None
    codebook_usage: float
    codebook_used: int
    codebook_perplexity: float
    num_codes: int
    seconds: dict[str, float] = field(default_factory=dict)  # encode, decode, metrics, inception
    # "true": decoded with the encoder's assignment (stage 1); "predicted": with the learned Source Recovery's, as
    # a RandAR sample is (SPEC §3; the paper's Table 5 cost, rFID 1.48 → 1.71 at its scale).
    assignment: str = "true"
    recovery_accuracy: float | None = None  # predicted only: share of positions given their true merged token


@dataclass
class TokenizerEvaluation:
    num_images: int
    results: list[KEvaluation]
    seconds: dict[str, float]  # "inception_originals", "total"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """Accumulates wall time per named phase (synchronising the GPU so asynchronous kernels are counted)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        _sync(self.device)
        start = time.perf_counter()
        yield
        _sync(self.device)
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start


@torch.inference_mode()
def evaluate_tokenizer(
    *,
    model: MergeVQ,
    batches: Iterable[Tensor],
    num_tokens: Sequence[int],
    device: torch.device,
    lpips: nn.Module | None = None,
    inception: InceptionFeatures | None = None,
    progress: ProgressFn | None = None,
    assignments: Sequence[str] = ("true",),
) -> TokenizerEvaluation:
    """Reconstruct every batch ``[B, 3, H, W]`` (in ``[-1, 1]``) at each K and accumulate the metrics.

    ``lpips`` (on ``device``) and ``inception`` are optional: without them LPIPS / rFID are left out (None).
    ``assignments`` names how the merged tokens go back onto the grid: ``"true"`` (the encoder's assignment) and/or
    ``"predicted"`` (the learned Source Recovery's, from the K codes alone); one result per K and assignment, in
    that order.
    """
    if not num_tokens:
        raise ValueError("num_tokens must name at least one K")
    unknown = sorted(set(assignments) - {"true", "predicted"})
    if unknown or not assignments:
        raise ValueError(f"assignments must be 'true' and/or 'predicted', got {list(assignments)}")
    if "predicted" in assignments and model.recovery is None:
        raise ValueError(f"preset {model.config.name!r} has no learned Source Recovery: only 'true' can be evaluated")
    runs = [(k, mode) for k in num_tokens for mode in assignments]
    start = time.perf_counter()
    model.eval()
    num_codes = 2**model.config.codebook_bits
    evaluators = {run: ReconstructionEvaluator(lpips=lpips) for run in runs}
    usages = {k: CodebookUsage(num_codes=num_codes, device=device) for k in num_tokens}
    clocks = {run: _Clock(device) for run in runs}
    merged_tokens: dict[int, int] = {}
    recovered = {k: [0, 0] for k in num_tokens}  # positions given their true merged token, positions seen
    # Created at the first batch, with the feature width of whatever network ``inception`` wraps.
    originals: GaussianAccumulator | None = None
    reconstructed: dict[tuple[int, str], GaussianAccumulator] = {}
    inception_seconds = 0.0
    count = 0

    for batch in batches:
        images = batch.to(device, non_blocking=True).float()
        if inception is not None:
            t0 = time.perf_counter()
            features = inception(images)
            inception_seconds += time.perf_counter() - t0
            if originals is None:
                originals = GaussianAccumulator(features.shape[1])
                reconstructed = {run: GaussianAccumulator(features.shape[1]) for run in runs}
            originals.update(features)
        for k in num_tokens:
            encoded = None
            for mode in assignments:
                clock = clocks[k, mode]
                if encoded is None:
                    with clock("encode"):
                        encoded = model.encode(images, num_tokens=k)
                    merged_tokens[k] = encoded.num_tokens
                    usages[k].update(encoded.indices)
                with clock("decode"):
                    if mode == "true":
                        decoded = model.decode(encoded)
                    else:
                        predicted = model.predict_assignment(encoded.indices)
                        recovered[k][0] += int((predicted == encoded.assignment).sum())
                        recovered[k][1] += predicted.numel()
                        decoded = model.decode(encoded.indices, predicted)
                    # Metrics are defined on the displayable image: clamp like the reference evaluation (SPEC §7).
                    reconstruction = decoded.float().clamp(-1.0, 1.0)
                with clock("metrics"):
                    evaluators[k, mode].update(images, reconstruction)
                if inception is not None:
                    with clock("inception"):
                        reconstructed[k, mode].update(inception(reconstruction))
        count += images.shape[0]
        if progress is not None:
            progress(images.shape[0])

    if count == 0:
        raise ValueError("no images to evaluate")
    reference = originals.statistics() if originals is not None and count >= 2 else None
    results = []
    for k, mode in runs:
        rfid = None
        if reference is not None:
            stats = reconstructed[k, mode].statistics()
            rfid = frechet_distance(reference.mu, reference.sigma, stats.mu, stats.sigma)
        hits, seen = recovered[k]
        results.append(
            KEvaluation(
                num_tokens=k,
                merged_tokens=merged_tokens[k],
                metrics=evaluators[k, mode].summary(),
                rfid=rfid,
                codebook_usage=usages[k].usage,
                codebook_used=usages[k].num_used,
                codebook_perplexity=usages[k].perplexity,
                num_codes=num_codes,
                seconds=dict(clocks[k, mode].totals),
                assignment=mode,
                recovery_accuracy=hits / seen if mode == "predicted" and seen else None,
            )
        )
    seconds = {"inception_originals": inception_seconds, "total": time.perf_counter() - start}
    return TokenizerEvaluation(num_images=count, results=results, seconds=seconds)


# ----------------------------------------------------------------------------------------------------------------------
# Probe features
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ProbeFeatures:
    cls: Tensor  # [N, D] CLS token after the last encoder block
    mean_tokens: Tensor  # [N, D] size-weighted mean of the K merged tokens (= mean over the L grid positions)
    labels: Tensor  # [N] int64


@torch.inference_mode()
def extract_probe_features(
    *,
    model: MergeVQ,
    batches: Iterable[tuple[Tensor, Tensor]],
    num_tokens: Sequence[int],
    device: torch.device,
    progress: ProgressFn | None = None,
) -> dict[int, ProbeFeatures]:
    """Frozen-encoder features of ``(images [B, 3, H, W], labels [B])`` batches at each K.

    The merged tokens are taken where they enter the encoder's output head (the input of ``encoder.norm_out``,
    width D, after the last block): the representation the CLS token is aligned with, not the d-bit LFQ latents.
    Their mean is weighted by group size, i.e. it is the average over the L grid positions after recovery, so it
    is comparable across K (at K = L it is plain global average pooling, MAE's protocol).
    """
    if not num_tokens:
        raise ValueError("num_tokens must name at least one K")
    model.eval()
    captured: list[Tensor] = []
    hook = model.encoder.norm_out.register_forward_pre_hook(lambda _module, inputs: captured.append(inputs[0]))
    chunks: dict[int, dict[str, list[Tensor]]] = {k: {"cls": [], "mean": [], "labels": []} for k in num_tokens}
    try:
        for images, labels in batches:
            images = images.to(device, non_blocking=True).float()
            for k in num_tokens:
                captured.clear()
                out = model.encoder(images, num_tokens=k)
                merged_BDK = captured[-1].float()
                sizes_BK = out.sizes.float().to(merged_BDK.device)
                mean_BD = (merged_BDK * sizes_BK[:, None, :]).sum(-1) / sizes_BK.sum(-1, keepdim=True)
                chunks[k]["cls"].append(out.cls.float().cpu())
                chunks[k]["mean"].append(mean_BD.cpu())
                chunks[k]["labels"].append(torch.as_tensor(labels).reshape(-1).long().cpu())
            if progress is not None:
                progress(images.shape[0])
    finally:
        hook.remove()
    if not chunks[num_tokens[0]]["cls"]:
        raise ValueError("no images to extract features from")
    return {
        k: ProbeFeatures(
            cls=torch.cat(parts["cls"]), mean_tokens=torch.cat(parts["mean"]), labels=torch.cat(parts["labels"])
        )
        for k, parts in chunks.items()
    }
