"""Global alignment of the tokenizer's CLS head with a teacher (SPEC §2.6).

The student is the encoder's CLS token after its head, ``student [B,F]``. One module covers the four choices, so
a trainer calls every one of them the same way:

    alignment = build_alignment("dinov2", student_dim=768, source="facebook/dinov2-base")
    loss = alignment(student=student_BF, images=teacher_view, labels=labels_or_None)
    ...optimizer step...
    alignment.update_teacher(student_module, momentum=0.996)      # no-op except for kind "ema"

Kinds:
* ``dinov2`` — the released code: frozen DINOv2 ``pooler_output`` (layer-normed CLS), loss
  KL(softmax(t/τ) ‖ softmax(s/τ))·τ² with τ = 4 (:func:`distill_kl`). Needs ``transformers`` and the weights.
* ``ema``    — offline self-distillation (DINO, Caron et al. 2021): the teacher is an EMA copy of the student
  network; its outputs are centred (running mean, momentum 0.9) and sharpened (τ_t = 0.04 < τ_s = 0.1), which is
  what keeps an EMA teacher from collapsing to one constant output.
* ``labels`` — supervised alternative of the released code: a linear classifier on the student features trained
  with label-smoothing cross-entropy (ε = 0.1). Its classifier is trainable: give the generator optimizer
  ``[p for p in alignment.parameters() if p.requires_grad]``.
* ``none``   — zero loss.

Teachers are frozen (``requires_grad=False``, always in eval mode) and run without autograd. Note that a
``dinov2`` alignment's ``state_dict`` contains the frozen DINOv2 weights; checkpoint it only for ``ema``/``labels``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mergevq.nn.dinov2 import load_dinov2

__all__ = [
    "AlignBranch",
    "DinoV2Teacher",
    "EMATeacher",
    "GlobalAlignment",
    "Teacher",
    "build_alignment",
    "build_teacher",
    "dino_loss",
    "distill_kl",
    "student_view",
]

ALIGNMENT_KINDS = ("dinov2", "ema", "labels", "none")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------------


def distill_kl(student: Tensor, teacher: Tensor, *, temperature: float = 4.0) -> Tensor:
    """KL(softmax(t/τ) ‖ softmax(s/τ))·τ², summed over features and averaged over the batch ("batchmean").

    Args:
        student: [B,F] logits; gradients flow here.
        teacher: [B,F] logits; treated as a fixed target (detached).
    Returns:
        scalar. τ² keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015).
    """
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"expected student and teacher [B,F] of equal shape, got {student.shape} and {teacher.shape}")
    log_p_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2


def dino_loss(student: Tensor, teacher_probs: Tensor, *, student_temperature: float = 0.1) -> Tensor:
    """DINO cross-entropy −Σ_f p_t log softmax(s/τ_s), averaged over the batch; ``teacher_probs`` [B,F] is a target."""
    log_p_s = F.log_softmax(student.float() / student_temperature, dim=-1)
    return -(teacher_probs.detach() * log_p_s).sum(dim=-1).mean()


# ----------------------------------------------------------------------------------------------------------------------
# Teachers
# ----------------------------------------------------------------------------------------------------------------------


class Teacher(nn.Module):
    """A frozen network mapping images [B,3,H,W] in [-1, 1] to features [B, feature_dim]."""

    feature_dim: int

    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        """Teachers stay in eval mode (no dropout, no BatchNorm statistics updates)."""
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class DinoV2Teacher(Teacher):
    """Frozen DINOv2 whose ``pooler_output`` (the layer-normed CLS token) is the target.

    Images in [-1, 1] are resized (bicubic, anti-aliased) to ``image_size`` when needed and normalised with the
    ImageNet mean/std that DINOv2 was trained with.
    """

    def __init__(self, *, model: nn.Module, feature_dim: int, image_size: int = 224) -> None:
        super().__init__()
        self.model = model
        self.feature_dim = feature_dim
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._freeze()

    @classmethod
    def from_pretrained(
        cls, source: str | Path, *, image_size: int = 224, local_files_only: bool | None = None
    ) -> DinoV2Teacher:
        """Load a ``transformers`` DINOv2 from a hub id (cached, honours ``HF_HUB_OFFLINE``) or a local directory.

        Raises:
            ImportError: ``transformers`` is not installed.
            OSError: the weights cannot be loaded (message names the source and the fix).
        """
        model = load_dinov2(source=source, what="the DINOv2 teacher", local_files_only=local_files_only)
        return cls(model=model, feature_dim=int(model.config.hidden_size), image_size=image_size)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """[B,3,H,W] in [-1, 1] → [B, feature_dim]."""
        x = (images.float() + 1.0) * 0.5
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True)
        x = (x - self.mean) / self.std
        return self.model(pixel_values=x).pooler_output


def _default_forward(module: nn.Module, images: Tensor) -> Tensor:
    return module(images)


class EMATeacher(Teacher):
    """DINO teacher: an exponential moving average of the student network, centred and sharpened.

    Args:
        student: the module that maps images to the student's [B,F] output (encoder + head); it is deep-copied.
        feature_dim: F.
        forward_fn: how to call the copy, ``forward_fn(module, images) -> [B,F]`` (default ``module(images)``),
            for encoders whose head output needs extra arguments.
        temperature: teacher sharpening τ_t (DINO: 0.04–0.07, below the student's 0.1).
        center_momentum: momentum of the running centre of teacher outputs (DINO: 0.9).

    ``forward`` returns the raw EMA features [B,F]; :meth:`targets` turns them into centred, sharpened
    probabilities and (in training mode) updates the centre.
    """

    center: Tensor

    def __init__(
        self,
        *,
        student: nn.Module,
        feature_dim: int,
        forward_fn: Callable[[nn.Module, Tensor], Tensor] | None = None,
        temperature: float = 0.04,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.network = copy.deepcopy(student)
        self.feature_dim = feature_dim
        self.forward_fn = forward_fn or _default_forward
        self.temperature = temperature
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(feature_dim))
        self._freeze()

    @torch.no_grad()
    def update(self, student: nn.Module, *, momentum: float) -> None:
        """θ_t ← m·θ_t + (1 − m)·θ_s for every parameter; buffers (e.g. BatchNorm statistics) are copied."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        t_params = dict(self.network.named_parameters())
        s_params = dict(student.named_parameters())
        if t_params.keys() != s_params.keys():
            raise ValueError("student parameters do not match the teacher copy (different module structure)")
        for name, p_t in t_params.items():
            p_t.mul_(momentum).add_(s_params[name].detach(), alpha=1.0 - momentum)
        s_buffers = dict(student.named_buffers())
        for name, b_t in self.network.named_buffers():
            b_t.copy_(s_buffers[name])

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """[B,3,H,W] in [-1, 1] → EMA network features [B,F]."""
        return self.forward_fn(self.network, images)

    @torch.no_grad()
    def targets(self, images: Tensor, *, update_center: bool) -> Tensor:
        """Centred, sharpened teacher distribution softmax((t − c)/τ_t) [B,F]; optionally folds t into the centre."""
        out = self(images).float()
        probs = F.softmax((out - self.center) / self.temperature, dim=-1)
        if update_center:
            batch_center = out.mean(dim=0)
            if dist.is_available() and dist.is_initialized():
                # DINO centres with the global batch mean, so every rank sees the same target distribution.
                dist.all_reduce(batch_center)
                batch_center /= dist.get_world_size()
            self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)
        return probs


def build_teacher(
    kind: str,
    *,
    feature_dim: int | None = None,
    source: str | Path | None = None,
    encoder: nn.Module | None = None,
    **kw: object,
) -> Teacher | None:
    """Build the teacher network for an alignment kind; ``labels`` and ``none`` have none and return ``None``.

    Args:
        kind: ``dinov2``, ``ema``, ``labels`` or ``none``.
        feature_dim: for ``dinov2`` an optional check against the model's width; required for ``ema``.
        source: ``dinov2``: hub id or local directory (default ``facebook/dinov2-base``).
        encoder: ``ema``: the student module (encoder + head) to copy.
        **kw: ``dinov2``: ``image_size``, ``local_files_only``; ``ema``: ``forward_fn``, ``temperature``,
            ``center_momentum``.
    """
    if kind == "dinov2":
        teacher = DinoV2Teacher.from_pretrained(source or "facebook/dinov2-base", **kw)  # type: ignore[arg-type]
        if feature_dim is not None and feature_dim != teacher.feature_dim:
            raise ValueError(
                f"the DINOv2 teacher from {source!r} outputs {teacher.feature_dim} features but the student head "
                f"outputs {feature_dim}; set the head's output width to {teacher.feature_dim}"
            )
        return teacher
    if kind == "ema":
        if encoder is None or feature_dim is None:
            raise ValueError("the ema teacher needs encoder= (the student module to copy) and feature_dim=")
        return EMATeacher(student=encoder, feature_dim=feature_dim, **kw)  # type: ignore[arg-type]
    if kind in ("labels", "none"):
        return None
    raise ValueError(f"unknown alignment kind {kind!r}; expected one of {ALIGNMENT_KINDS}")


# ----------------------------------------------------------------------------------------------------------------------
# The single entry point
# ----------------------------------------------------------------------------------------------------------------------


class GlobalAlignment(nn.Module):
    """``forward(*, student [B,F], images [B,3,H,W], labels [B] | None) -> scalar loss`` for every kind.

    ``images`` is the teacher's view in [-1, 1] (ignored by ``labels`` and ``none``); ``labels`` are class ids,
    needed by ``labels`` only. Build it with :func:`build_alignment`.
    """

    def __init__(
        self,
        *,
        kind: str,
        teacher: Teacher | None = None,
        classifier: nn.Module | None = None,
        temperature: float = 4.0,
        student_temperature: float = 0.1,
        label_smoothing: float = 0.1,
    ) -> None:
        super().__init__()
        if kind not in ALIGNMENT_KINDS:
            raise ValueError(f"unknown alignment kind {kind!r}; expected one of {ALIGNMENT_KINDS}")
        if kind in ("dinov2", "ema") and teacher is None:
            raise ValueError(f"alignment kind {kind!r} needs a teacher")
        if kind == "ema" and not isinstance(teacher, EMATeacher):
            raise ValueError("alignment kind 'ema' needs an EMATeacher")
        if kind == "labels" and classifier is None:
            raise ValueError("alignment kind 'labels' needs a classifier")
        self.kind = kind
        self.teacher = teacher
        self.classifier = classifier
        self.temperature = temperature
        self.student_temperature = student_temperature
        self.label_smoothing = label_smoothing

    def forward(self, *, student: Tensor | None, images: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        """Scalar alignment loss (float32)."""
        if self.kind == "none":
            device = student.device if student is not None else None
            return torch.zeros((), device=device)
        if student is None:
            raise ValueError(f"alignment kind {self.kind!r} needs the student output [B,F]")
        if self.kind == "labels":
            if labels is None:
                raise ValueError("alignment kind 'labels' needs labels [B]")
            assert self.classifier is not None
            logits = self.classifier(student.float())
            return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        if images is None:
            raise ValueError(f"alignment kind {self.kind!r} needs the teacher's images [B,3,H,W]")
        if self.kind == "dinov2":
            assert self.teacher is not None
            return distill_kl(student, self.teacher(images), temperature=self.temperature)
        assert isinstance(self.teacher, EMATeacher)
        probs = self.teacher.targets(images, update_center=self.training)
        return dino_loss(student, probs, student_temperature=self.student_temperature)

    @torch.no_grad()
    def update_teacher(self, student: nn.Module, *, momentum: float = 0.996) -> None:
        """After each optimizer step: EMA-update the ``ema`` teacher from ``student``; a no-op for other kinds."""
        if self.kind == "ema":
            assert isinstance(self.teacher, EMATeacher)
            self.teacher.update(student, momentum=momentum)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


def build_alignment(
    kind: str,
    *,
    student_dim: int,
    source: str | Path | None = None,
    encoder: nn.Module | None = None,
    num_classes: int | None = None,
    temperature: float = 4.0,
    **teacher_kw: object,
) -> GlobalAlignment:
    """Build a :class:`GlobalAlignment`.

    Args:
        kind: ``dinov2``, ``ema``, ``labels`` or ``none``.
        student_dim: F, the width of the student head output (768 to match DINOv2-B).
        source: ``dinov2`` weights: hub id or local directory (default ``facebook/dinov2-base``).
        encoder: ``ema``: the student module (images → [B,F]) whose EMA copy becomes the teacher.
        num_classes: ``labels``: number of classes of the linear classifier.
        temperature: τ of the ``dinov2`` KL (SPEC: 4).
        **teacher_kw: passed to :func:`build_teacher` (e.g. ``local_files_only``, ``forward_fn``).
    """
    classifier = None
    if kind == "labels":
        if num_classes is None:
            raise ValueError("alignment kind 'labels' needs num_classes=")
        classifier = nn.Linear(student_dim, num_classes)
    teacher = build_teacher(kind, feature_dim=student_dim, source=source, encoder=encoder, **teacher_kw)
    return GlobalAlignment(kind=kind, teacher=teacher, classifier=classifier, temperature=temperature)


def student_view(images: Tensor, *, generator: torch.Generator, scale: tuple[float, float]) -> Tensor:
    """Random resized crop (area fraction in ``scale``, aspect 3/4–4/3) + horizontal flip, back at input size.

    The alignment branch's student view (SPEC §2.6), done on the batch with one ``grid_sample`` so it needs no
    second decode of the images; every random number comes from ``generator``.
    """
    b = images.shape[0]
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    aspect = log_ratio.exp()
    width = (area * aspect).sqrt().clamp(max=1.0)  # fractions of the side
    height = (area / aspect).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - width)
    cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - height)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = height
    theta[:, 1, 2] = cy
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


class AlignBranch(nn.Module):
    """Encoder + alignment head: images → [B, align_dim], the student branch (and what an EMA teacher copies)."""

    def __init__(self, encoder: nn.Module, head: nn.Module, *, num_tokens: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.num_tokens = num_tokens

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.encoder(images, num_tokens=self.num_tokens).cls)
