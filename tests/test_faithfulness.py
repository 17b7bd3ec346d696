"""Settings that follow the paper or the authors' code: DINOv2 weight selection, trunc-normal init, the G merge-count
range, the per-image adversarial loss, the paper's square schedule and the d32 head count."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergevq.losses.tokenizer_loss import LossWeights, TokenizerLoss
from mergevq.tokenizer.config import get_preset
from mergevq.tokenizer.initialization import (
    init_encoder_from_dinov2,
    select_weight,
    trunc_normal_init,
    uniform_indices,
)
from mergevq.tokenizer.model import MergeVQ
from mergevq.train.merge_sampling import MergeCountSampler
from mergevq.train.recipe import load_config

transformers = pytest.importorskip("transformers")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture
def dinov2_dir(tmp_path, monkeypatch) -> Path:
    """A small randomly initialised DINOv2 (width 192, 8 layers, MLP 768) saved in Hugging Face format."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    config = transformers.Dinov2Config(
        hidden_size=192, num_hidden_layers=8, num_attention_heads=6, intermediate_size=768, image_size=28, patch_size=14
    )
    model = transformers.Dinov2Model(config)
    with torch.no_grad():  # non-trivial norms and LayerScales, so that every selected tensor is distinguishable
        for name, p in model.named_parameters():
            if "norm" in name or "layer_scale" in name or "cls_token" in name:
                p.copy_(torch.randn_like(p))
    model.save_pretrained(tmp_path / "dinov2")
    return tmp_path / "dinov2"


def _source_state(path: Path) -> dict[str, torch.Tensor]:
    return transformers.Dinov2Model.from_pretrained(str(path), local_files_only=True).state_dict()


_NAMES = {  # transformers >= 5, then 4.x
    "q": ("attention.q_proj", "attention.attention.query"),
    "k": ("attention.k_proj", "attention.attention.key"),
    "v": ("attention.v_proj", "attention.attention.value"),
    "o": ("attention.o_proj", "attention.output.dense"),
}


def _layer(state: dict[str, torch.Tensor], i: int, name: str, suffix: str) -> torch.Tensor:
    for candidate in _NAMES[name]:
        key = f"encoder.layer.{i}.{candidate}.{suffix}"
        if key in state:
            return state[key]
    raise KeyError(f"layer {i} {name}")


def test_uniform_indices_follow_weight_selection():
    assert uniform_indices(source=768, target=384).tolist() == list(range(0, 768, 2))
    assert uniform_indices(source=12, target=4).tolist() == [0, 3, 6, 9]
    assert uniform_indices(source=10, target=4).tolist() == [0, 3, 6, 9]  # round(linspace(0, 9, 4))
    idx = uniform_indices(source=768, target=512)
    assert idx[0] == 0 and idx[-1] == 767 and bool((idx[1:] > idx[:-1]).all())
    assert torch.equal(idx, torch.linspace(0, 767, 512, dtype=torch.float64).round().long())
    w = torch.arange(12.0 * 6).view(12, 6)
    assert torch.equal(select_weight(tensor=w, shape=(4, 3)), w[[0, 3, 6, 9]][:, [0, 2, 4]])
    with pytest.raises(ValueError, match=r"cannot select shape \(13, 3\)"):
        select_weight(tensor=w, shape=(13, 3))


@pytest.mark.parametrize(("base_channels", "stride"), [(32, None), (24, 2)])
def test_dinov2_weight_selection_copies_the_source_slices(dinov2_dir, base_channels, stride):
    # tiny-32: 6 blocks of width 4·base (128: linspace selection from 192; 96: every second channel), 4 heads.
    model = MergeVQ.from_preset("tiny-32", base_channels=base_channels, width=4 * base_channels, align_dim=64)
    d = model.config.width
    loaded = init_encoder_from_dinov2(encoder=model.encoder, source=dinov2_dir, local_files_only=True)
    assert "cls_token" in loaded and "blocks.5.attn.qkv.weight" in loaded and len(loaded) == 1 + 6 * 14
    src = _source_state(dinov2_dir)
    c = uniform_indices(source=192, target=d)
    if stride:
        assert torch.equal(c, torch.arange(0, 192, stride))
    h = uniform_indices(source=768, target=4 * d)
    for i, block in enumerate(model.encoder.blocks):  # first-N layers
        qkv = block.attn.qkv
        for j, name in enumerate("qkv"):
            w, b = _layer(src, i, name, "weight"), _layer(src, i, name, "bias")
            assert torch.equal(qkv.weight[j * d : (j + 1) * d], w[c][:, c])
            assert torch.equal(qkv.bias[j * d : (j + 1) * d], b[c])
        assert torch.equal(block.attn.proj.weight, _layer(src, i, "o", "weight")[c][:, c])
        assert torch.equal(block.mlp.fc1.weight, src[f"encoder.layer.{i}.mlp.fc1.weight"][h][:, c])
        assert torch.equal(block.mlp.fc2.weight, src[f"encoder.layer.{i}.mlp.fc2.weight"][c][:, h])
        assert torch.equal(block.mlp.fc1.bias, src[f"encoder.layer.{i}.mlp.fc1.bias"][h])
        assert torch.equal(block.norm1.weight, src[f"encoder.layer.{i}.norm1.weight"][c])
        assert torch.equal(block.norm2.bias, src[f"encoder.layer.{i}.norm2.bias"][c])
        assert torch.equal(block.ls1.gamma, src[f"encoder.layer.{i}.layer_scale1.lambda1"][c])
        assert torch.equal(block.ls2.gamma, src[f"encoder.layer.{i}.layer_scale2.lambda1"][c])
    assert torch.equal(model.encoder.cls_token, src["embeddings.cls_token"][..., c])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(x, num_tokens=16)  # builds and runs
    assert out.reconstruction.shape == x.shape and torch.isfinite(out.reconstruction).all()


def test_dinov2_selection_refuses_a_deeper_or_wider_encoder(dinov2_dir):
    deep = MergeVQ.from_preset("tiny-32", depth=9)
    with pytest.raises(ValueError, match=r"depth=9 blocks but the DINOv2 source only 8 layers"):
        init_encoder_from_dinov2(encoder=deep.encoder, source=dinov2_dir, local_files_only=True)
    wide = MergeVQ.from_preset("tiny-32", base_channels=64, width=256)
    with pytest.raises(ValueError, match="from a smaller tensor"):
        init_encoder_from_dinov2(encoder=wide.encoder, source=dinov2_dir, local_files_only=True)
    with pytest.raises(OSError, match="init_from_source"):
        init_encoder_from_dinov2(encoder=deep.encoder, source=dinov2_dir / "absent", local_files_only=True)


def _image_folder(root: Path, count: int = 4) -> Path:
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def test_recipe_init_from_dinov2_reaches_the_model_and_its_ema(dinov2_dir, tmp_path):
    from mergevq.train.tokenizer_parts import build_parts

    data = _image_folder(tmp_path / "images")
    text = (
        f"model: {{preset: tiny-32, init_from: dinov2, init_from_source: '{dinov2_dir}'}}\n"
        f"data: {{train: '{data}', num_workers: 0}}\nalignment: {{kind: none}}\nloss: {{perceptual: none}}\n"
    )
    (tmp_path / "run.yaml").write_text(text)
    config = load_config(tmp_path / "run.yaml")
    assert config.model.init_from == "dinov2"
    parts = build_parts(config, device=torch.device("cpu"))
    src = _source_state(dinov2_dir)
    c = uniform_indices(source=192, target=128)
    expected = src["encoder.layer.3.norm1.weight"][c]
    assert torch.equal(parts.model.encoder.blocks[3].norm1.weight, expected)
    assert torch.equal(parts.ema.module.encoder.blocks[3].norm1.weight, expected)


def test_trunc_normal_init_is_the_default_for_new_models():
    torch.manual_seed(0)
    model = MergeVQ.from_preset("tiny-64")
    assert model.config.weight_init == "trunc_normal"
    for linear in (model.encoder.blocks[0].attn.qkv, model.decoder.blocks[1].mlp.fc1, model.recovery.q_head):
        assert linear.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert bool((linear.bias == 0).all())
    assert model.decoder.pos_conv.weight.std().item() == pytest.approx(0.02, rel=0.15)
    torch.manual_seed(0)
    plain = MergeVQ.from_preset("tiny-64", weight_init="torch")
    qkv = plain.encoder.blocks[0].attn.qkv  # PyTorch: U(±1/√fan_in), std = 1/√(3·fan_in)
    assert qkv.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 192), rel=0.1)
    # the CNN stem is left to PyTorch in both
    assert torch.equal(model.encoder.stem.conv_in.weight, plain.encoder.stem.conv_in.weight)
    with pytest.raises(ValueError, match=r"TokenizerConfig\.weight_init: 'xavier'"):
        get_preset("tiny-32", weight_init="xavier")


def test_trunc_normal_init_resets_norms_and_biases():
    net = nn.Sequential(nn.Linear(64, 512), nn.LayerNorm(512), nn.Conv2d(4, 8, 3))
    with torch.no_grad():
        net[1].weight.fill_(3.0)
    torch.manual_seed(0)
    trunc_normal_init(modules=[net])
    assert net[0].weight.std().item() == pytest.approx(0.02, rel=0.05) and net[0].weight.abs().max() < 2
    assert bool((net[1].weight == 1).all()) and bool((net[0].bias == 0).all()) and bool((net[2].bias == 0).all())


# ---------------------------------------------------------------------------------------------------------------------
# Recipe settings
# ---------------------------------------------------------------------------------------------------------------------


def test_code_recipe_averages_patch_logits_per_image_before_the_softplus(tmp_path):
    logits = torch.tensor([[[[1.0, -1.0], [3.0, 1.0]]], [[[0.0, -2.0], [-4.0, 2.0]]]])  # image means 1 and -1

    class Fixed(nn.Module):
        def forward(self, x):
            return logits + 0 * x.sum()

    images = torch.zeros(2, 3, 4, 4)
    weights = LossWeights(reconstruction=0.0, perceptual=0.0, adversarial=0.1)
    by_image = TokenizerLoss(weights=weights, adversarial_reduction="image")
    out = by_image.generator_loss(images=images, reconstruction=images, model_losses={}, step=0, discriminator=Fixed())
    hand = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2  # mean of softplus(−1), softplus(1)
    assert out.terms["adversarial"].item() == pytest.approx(hand, rel=1e-6)
    assert out.total.item() == pytest.approx(0.1 * hand, rel=1e-6)
    per_patch = TokenizerLoss(weights=weights, adversarial_reduction="patch").generator_loss(
        images=images, reconstruction=images, model_losses={}, step=0, discriminator=Fixed()
    )
    assert per_patch.terms["adversarial"].item() == pytest.approx(F.softplus(-logits).mean().item(), rel=1e-6)
    assert per_patch.terms["adversarial"].item() > hand  # softplus is convex
    with pytest.raises(ValueError, match="adversarial_reduction"):
        TokenizerLoss(weights=weights, adversarial_reduction="pixel")

    (tmp_path / "a.yaml").write_text("model: {preset: tiny-32}\n")
    assert load_config(tmp_path / "a.yaml").loss.adversarial_reduction == "image"


def test_paper_recipe_uses_the_square_schedule_and_code_the_linear_one(tmp_path):
    (tmp_path / "p.yaml").write_text("model: {preset: gr-d64}\nrecipe: paper\n")
    paper = load_config(tmp_path / "p.yaml")
    assert paper.model.overrides["merge_schedule"] == "square"
    assert get_preset(paper.model.preset, **paper.model.overrides).merge_schedule == "square"
    (tmp_path / "c.yaml").write_text("model: {preset: gr-d64}\n")
    assert "merge_schedule" not in load_config(tmp_path / "c.yaml").model.overrides
    mine = load_config(tmp_path / "p.yaml", overrides=["model.overrides.merge_schedule=linear"])
    assert mine.model.overrides["merge_schedule"] == "linear"  # the file/command line still wins


def _sampler(config) -> MergeCountSampler:
    model = get_preset(config.model.preset, **config.model.overrides)
    return MergeCountSampler(
        config=config.merge, num_tokens_full=model.num_tokens_full, default_num_tokens=model.default_num_tokens, seed=0
    )


def test_g_merge_counts_follow_the_authors_gaussian_9(tmp_path):
    expected = (225, 256, 289, 324, 361, 400, 441, 484, 529)
    (tmp_path / "g.yaml").write_text("model: {preset: g-d64}\n")  # the G variant layer
    for config in (load_config(CONFIGS / "imagenet" / "g-d64.yaml"), load_config(tmp_path / "g.yaml")):
        sampler = _sampler(config)
        assert sampler.candidates == expected
        assert sampler.probabilities[1] == pytest.approx(0.61, abs=0.005)  # SPEC §2.4: 61 of 100 at K0 = 256
        assert min(sampler.candidates) >= 225 and max(sampler.candidates) > 400  # no longer {144..256}
    # on a small grid the list is cut to what fits: tiny-32 as G keeps 36 of 64 → {25, 36, 49, 64}
    (tmp_path / "t.yaml").write_text("model: {preset: tiny-32}\nvariant: g\n")
    assert _sampler(load_config(tmp_path / "t.yaml")).candidates == (25, 36, 49, 64)
    # the paper's Fig. 5 range stays one setting away
    fig5 = load_config(
        CONFIGS / "imagenet" / "g-d64.yaml",
        overrides=["merge.distribution=exponential", "merge.root=15", "merge.direction=1", "merge.t_max=5"],
    )
    assert _sampler(fig5).candidates == (225, 256, 289, 324, 361, 400)


def test_imagenet_g_and_gr_configs_initialise_from_dinov2():
    for name in ("g-d64", "gr-d64"):
        config = load_config(CONFIGS / "imagenet" / f"{name}.yaml")
        assert config.model.init_from == "dinov2" and config.model.init_from_source == "facebook/dinov2-base"
        assert config.model.overrides.get("merge_schedule") == "square"  # recipe: paper
    assert load_config(CONFIGS / "imagenet" / "r-vitb.yaml").model.init_from == "none"


def test_d32_presets_use_eight_heads():
    for name in ("g-d32", "gr-d32"):
        config = get_preset(name)
        assert (config.width, config.num_heads, config.decoder_heads) == (384, 8, 8)


def test_resume_check_accepts_checkpoints_written_before_new_keys():
    import json

    from mergevq.train.tokenizer_parts import check_same_model

    current = get_preset("tiny-32")
    saved = current.to_dict()
    for key in ("merge_policy", "merge_split", "merge_window", "weight_init"):
        saved.pop(key)
    check_same_model({"model_config": json.dumps(saved)}, Path("ckpt"), current=current)
    changed = dict(saved, depth=4)
    with pytest.raises(Exception, match=r"depth \(4 vs 6\)"):
        check_same_model({"model_config": json.dumps(changed)}, Path("ckpt"), current=current)
