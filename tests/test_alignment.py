"""Global alignment: KL distillation, DINOv2 loading (local, offline), EMA self-distillation, labels, none."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# Before transformers is imported anywhere: a hub lookup must fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mergevq.losses.alignment import (  # noqa: E402
    DinoV2Teacher,
    EMATeacher,
    GlobalAlignment,
    build_alignment,
    build_teacher,
    dino_loss,
    distill_kl,
)


def test_distill_kl_hand_value() -> None:
    student = torch.tensor([[0.0, 4.0 * math.log(2.0)]])  # softmax(s/4) = (1/3, 2/3)
    teacher = torch.tensor([[0.0, 0.0]])  # softmax(t/4) = (1/2, 1/2)
    expected = 0.5 * math.log(0.5 / (1 / 3)) + 0.5 * math.log(0.5 / (2 / 3))
    assert distill_kl(student, teacher, temperature=4.0).item() == pytest.approx(16.0 * expected, rel=1e-5)


def test_distill_kl_batchmean_zero_and_gradient_to_student_only() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 7, generator=g, requires_grad=True)
    t = torch.randn(3, 7, generator=g, requires_grad=True)
    assert distill_kl(s, s.detach().clone()).item() == pytest.approx(0.0, abs=1e-6)
    per_sample = [distill_kl(s[i : i + 1], t[i : i + 1]).item() for i in range(3)]
    assert distill_kl(s, t).item() == pytest.approx(sum(per_sample) / 3, rel=1e-5)
    distill_kl(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    with pytest.raises(ValueError):
        distill_kl(s, t[:, :5])


def _tiny_dinov2(path: Path) -> None:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=56, patch_size=14
    )
    Dinov2Model(cfg).save_pretrained(path)


def test_dinov2_teacher_from_local_directory(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    _tiny_dinov2(tmp_path)
    teacher = build_teacher("dinov2", source=str(tmp_path), feature_dim=32, image_size=56)
    assert isinstance(teacher, DinoV2Teacher) and teacher.feature_dim == 32
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training
    images = torch.rand(2, 3, 40, 40) * 2 - 1
    feats = teacher(images)
    assert feats.shape == (2, 32) and not feats.requires_grad
    # Preprocessing: [-1,1] → resize to 56 → ImageNet mean/std → pooler_output (layer-normed CLS).
    x = F.interpolate((images + 1) / 2, size=(56, 56), mode="bicubic", antialias=True)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        torch.testing.assert_close(feats, teacher.model(pixel_values=x).pooler_output)

    align = build_alignment("dinov2", student_dim=32, source=tmp_path, image_size=56)
    student = torch.randn(2, 32, requires_grad=True)
    loss = align(student=student, images=images, labels=None)
    assert loss.item() == pytest.approx(distill_kl(student, feats, temperature=4.0).item(), rel=1e-5)
    loss.backward()
    assert student.grad is not None
    with pytest.raises(ValueError, match="outputs 32 features"):
        build_alignment("dinov2", student_dim=768, source=tmp_path)


def test_dinov2_teacher_load_failure_names_source(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    with pytest.raises(OSError, match="no-such-org/no-such-dinov2.*local directory"):
        DinoV2Teacher.from_pretrained("no-such-org/no-such-dinov2", local_files_only=True)
    with pytest.raises(OSError, match="missing-dir"):
        DinoV2Teacher.from_pretrained(tmp_path / "missing-dir")


class _StudentNet(nn.Module):
    """Stand-in for encoder + head: images [B,3,8,8] → [B,F]."""

    def __init__(self, feature_dim: int = 16) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 8 * 8, feature_dim)
        self.norm = nn.BatchNorm1d(feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x.flatten(1)))


def test_ema_update_arithmetic_is_exact() -> None:
    student = _StudentNet()
    teacher = EMATeacher(student=student, feature_dim=16)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())  # the copy does not freeze the original
    with torch.no_grad():
        for p in teacher.network.parameters():
            p.fill_(2.0)
        for p in student.parameters():
            p.fill_(-2.0)
        student.norm.running_mean.fill_(5.0)
    teacher.update(student, momentum=0.75)
    # 0.75·2 + 0.25·(−2) = 1, exactly representable; buffers are copied.
    for p in teacher.network.parameters():
        assert torch.equal(p, torch.ones_like(p))
    assert torch.equal(teacher.network.norm.running_mean, torch.full((16,), 5.0))
    teacher.update(student, momentum=0.5)
    assert torch.equal(teacher.network.proj.weight, torch.full_like(teacher.network.proj.weight, -0.5))
    with pytest.raises(ValueError):
        teacher.update(nn.Linear(2, 2), momentum=0.5)


def test_ema_centering_prevents_collapse() -> None:
    """A teacher whose outputs share one dominant direction would give every sample the same one-hot target;
    the running centre removes that shared component so targets differ across the batch."""
    torch.manual_seed(0)
    student = _StudentNet()
    student.norm = nn.Identity()  # type: ignore[assignment]
    with torch.no_grad():
        student.proj.bias.zero_()
        student.proj.bias[0] = 5.0  # the collapse direction
    align = build_alignment("ema", student_dim=16, encoder=student)
    teacher = align.teacher
    assert isinstance(teacher, EMATeacher)
    images = torch.randn(64, 3, 8, 8)

    before = teacher.targets(images, update_center=False)
    assert torch.all(before.argmax(dim=1) == 0) and before.max(dim=1).values.min() > 0.99  # collapsed targets

    align.train()
    for _ in range(60):
        align(student=torch.randn(64, 16), images=torch.randn(64, 3, 8, 8))
    assert teacher.center[0].item() == pytest.approx(5.0, abs=0.3)  # the centre has absorbed the shared bias
    after = teacher.targets(images, update_center=False)
    assert after.argmax(dim=1).unique().numel() >= 8
    assert after.mean(dim=0).max() < 0.3  # no single dimension dominates the batch
    # Eval mode leaves the centre alone.
    align.eval()
    centre = teacher.center.clone()
    align(student=torch.randn(4, 16), images=torch.randn(4, 3, 8, 8))
    assert torch.equal(teacher.center, centre)


def test_ema_alignment_loss_is_dino_cross_entropy_and_trains_student() -> None:
    torch.manual_seed(1)
    student_net = _StudentNet()
    align = build_alignment("ema", student_dim=16, encoder=student_net)
    align.eval()  # keep the centre fixed so the expected value is reproducible
    images = torch.randn(8, 3, 8, 8)
    student_out = student_net.train()(images)
    loss = align(student=student_out, images=images)
    assert isinstance(align.teacher, EMATeacher)
    probs = F.softmax(align.teacher(images) / 0.04, dim=-1)
    expected = -(probs * F.log_softmax(student_out / 0.1, dim=-1)).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert dino_loss(student_out, probs).item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert student_net.proj.weight.grad is not None
    assert all(p.grad is None for p in align.parameters())
    before = align.teacher.network.proj.weight.clone()
    with torch.no_grad():
        student_net.proj.weight.add_(1.0)
    align.update_teacher(student_net, momentum=0.5)
    torch.testing.assert_close(align.teacher.network.proj.weight, before + 0.5)


def test_ema_forward_fn_for_custom_call() -> None:
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor, *, return_head: bool = False) -> torch.Tensor:
            pooled = x.mean(dim=(2, 3))
            return self.lin(pooled) if return_head else pooled

    teacher = build_teacher(
        "ema", encoder=Encoder(), feature_dim=4, forward_fn=lambda m, x: m(x, return_head=True), temperature=0.07
    )
    assert isinstance(teacher, EMATeacher) and teacher.temperature == 0.07
    assert teacher(torch.randn(2, 3, 5, 5)).shape == (2, 4)


def test_labels_kind_label_smoothing_ce() -> None:
    torch.manual_seed(2)
    align = build_alignment("labels", student_dim=6, num_classes=3)
    student = torch.randn(4, 6, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 1])
    loss = align(student=student, images=None, labels=labels)
    assert align.classifier is not None
    logits = align.classifier(student)
    logp = F.log_softmax(logits, dim=-1)
    target = torch.full((4, 3), 0.1 / 3)
    target[torch.arange(4), labels] += 0.9
    assert loss.item() == pytest.approx(-(target * logp).sum(-1).mean().item(), rel=1e-5)
    loss.backward()
    assert student.grad is not None and align.classifier.weight.grad is not None
    assert any(p.requires_grad for p in align.parameters())  # the classifier trains with the generator
    with pytest.raises(ValueError, match="labels"):
        align(student=student, images=None, labels=None)
    with pytest.raises(ValueError, match="num_classes"):
        build_alignment("labels", student_dim=6)


def test_none_kind_and_bad_kinds() -> None:
    align = build_alignment("none", student_dim=8)
    assert align(student=torch.randn(2, 8), images=None, labels=None).item() == 0.0
    assert align(student=None).item() == 0.0
    align.update_teacher(nn.Linear(1, 1))  # a no-op
    assert build_teacher("none") is None and build_teacher("labels") is None
    with pytest.raises(ValueError, match="unknown alignment kind"):
        build_alignment("clip", student_dim=8)
    with pytest.raises(ValueError, match="encoder"):
        build_teacher("ema", feature_dim=8)
    with pytest.raises(ValueError):
        GlobalAlignment(kind="dinov2")
