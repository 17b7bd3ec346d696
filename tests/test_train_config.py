"""Training config: layers (variant, recipe, file, overrides), strict errors, saving, and the shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergevq.train.config_io import ConfigError, parse_overrides, save_config
from mergevq.train.recipe import TrainConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_follow_the_code_and_the_variant(tmp_path):
    cfg = load_config(write(tmp_path, "model: {preset: gr-d64}\n"))
    assert cfg.variant == "gr"
    assert cfg.loss.reconstruction == "l1" and cfg.loss.perceptual_weight == 1.0
    assert cfg.loss.adversarial_mode == "fixed" and cfg.loss.adversarial_weight == 0.1
    assert cfg.loss.alignment_weight == 1.0 and cfg.loss.source_recovery_weight == 0.5
    assert cfg.merge.distribution == "gaussian" and (cfg.merge.t_min, cfg.merge.t_max) == (-1, 3)
    assert cfg.optim.optimizer == "adam" and cfg.optim.betas == (0.5, 0.9)

    g = load_config(write(tmp_path, "model: {preset: g-d64}\n"))
    assert g.variant == "g" and g.loss.alignment_weight == 0.1 and g.merge.distribution == "authors_gaussian"
    assert g.merge.num_candidates == 9 and g.grad_clip is None  # K in {225, ..., 529} (SPEC §2.4)

    r = load_config(write(tmp_path, "model: {preset: r-vitb}\nrecipe: paper\n"))
    assert r.variant == "r" and r.loss.source_recovery_weight == 1.0 and r.grad_clip == 5.0
    # paper recipe (Table A1): L2, perceptual 0.7, adaptive adversarial weight 0.8, AdamW, cosine for R
    assert r.loss.reconstruction == "l2" and r.loss.perceptual_weight == 0.7
    assert r.loss.adversarial_mode == "adaptive" and r.loss.adversarial_weight == 0.8
    assert r.optim.optimizer == "adamw" and r.schedule.kind == "cosine"


def test_file_beats_layers_and_overrides_beat_file(tmp_path):
    path = write(tmp_path, "model: {preset: r-vitb}\nrecipe: paper\nloss: {perceptual_weight: 0.3}\ngrad_clip: 1.0\n")
    cfg = load_config(path, overrides=["loss.perceptual_weight=0.2", "optim.betas=[0.9, 0.95]", "optim.lr=3e-4"])
    assert cfg.loss.perceptual_weight == 0.2
    assert cfg.grad_clip == 1.0  # file beats the R layer
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.optim.lr == pytest.approx(3e-4)  # "3e-4" is a YAML string; accepted as a number
    # overrides may set the variant, which changes the layer underneath the file
    cfg = load_config(write(tmp_path, "model: {preset: tiny-32}\nmerge: {root: 6, t_min: -2, t_max: 2}\n"))
    assert cfg.variant == "gr"
    cfg = load_config(
        write(tmp_path, "model: {preset: tiny-32}\nmerge: {root: 6, t_min: 0, t_max: 2}\n"), overrides=["variant=r"]
    )
    assert cfg.loss.source_recovery_weight == 1.0 and cfg.grad_clip == 5.0


def test_model_overrides_merge_key_by_key(tmp_path):
    path = write(tmp_path, "model: {preset: tiny-32, overrides: {depth: 2}}\nmerge: {distribution: fixed}\n")
    cfg = load_config(path, overrides=["model.overrides.codebook_bits=10"])
    assert cfg.model.overrides == {"depth": 2, "codebook_bits": 10}


@pytest.mark.parametrize(
    ("text", "overrides", "pattern"),
    [
        ("loss: {percepual_weight: 1}\n", [], r"run\.yaml: unknown key 'loss\.percepual_weight' \(did you mean"),
        ("bogus: 1\n", [], r"run\.yaml: unknown key 'bogus'"),
        ("loss: {perceptual_weight: abc}\n", [], r"run\.yaml: loss\.perceptual_weight: expected a number"),
        ("batch_size: 2.5\n", [], r"run\.yaml: batch_size: expected an integer"),
        ("precision: fp8\n", [], r"run\.yaml: precision: expected one of 'fp32', 'bf16', 'fp16'"),
        ("deterministic: 1\n", [], r"deterministic: expected true/false"),
        ("optim: {betas: [0.5]}\n", [], r"optim\.betas: expected a list of 2 values"),
        ("loss: 3\n", [], r"run\.yaml: loss: expected a mapping"),
        ("", ["optim.lrr=1"], r"command line: unknown key 'optim\.lrr' \(did you mean 'optim\.lr'\?\)"),
        ("", ["max_steps=many"], r"command line: max_steps: expected an integer, got 'many'"),
        ("", ["max_steps"], r"override 'max_steps': expected section\.key=value"),
        ("", ["model.preset=huge"], r"model\.preset: unknown preset 'huge'"),
        ("", ["model.overrides.depth=deep"], r"model\.overrides\.depth: expected an integer"),
        ("", ["model.overrides.nope=1"], r"unknown key 'model\.overrides\.nope'"),
        ("", ["batch_size=0"], r"batch_size: must be >= 1"),
        ("", ["merge.t_max=9"], r"merge: merge sampling candidate K=\d+ is outside \[1, L=64\]"),
        ("", ["schedule.milestones=[5,1]"], r"schedule\.milestones must be increasing"),
        ("", ["model.overrides.depth=1"], r"merge: candidate K=16: cannot merge L=64 tokens down to K=16"),
    ],
)
def test_errors_are_one_line_and_name_the_key(tmp_path, text, overrides, pattern):
    path = write(tmp_path, "model: {preset: tiny-32}\nmerge: {root: 6, t_min: -2, t_max: 2}\n" + text)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(path, overrides=overrides)
    assert "\n" not in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_parse_overrides_yaml_scalars():
    parsed = dict(parse_overrides(["a=1", "b=0.5", "c=true", "d=null", "e=[1, 2]", "f=text", "g="]))
    assert parsed == {"a": 1, "b": 0.5, "c": True, "d": None, "e": [1, 2], "f": "text", "g": None}


def test_save_and_load_round_trip(tmp_path):
    path = write(tmp_path, "model: {preset: tiny-32}\nmerge: {root: 6, t_min: -2, t_max: 2}\n")
    cfg = load_config(path, overrides=["alignment.crop_scale=[0.5, 1.0]", "data.val=null", "notes=hello"])
    save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(tmp_path / "out" / "config.yaml")
    assert again == cfg
    assert isinstance(again, TrainConfig) and again.alignment.crop_scale == (0.5, 1.0)


@pytest.mark.parametrize(
    "name", ["cifar10/g", "cifar10/gr", "cifar10/r", "imagenet/g-d64", "imagenet/gr-d64", "imagenet/r-vitb"]
)
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    variant = name.split("/")[1].split("-")[0]
    assert cfg.variant == variant
    assert cfg.alignment.kind == ("ema" if name.startswith("cifar10") else "dinov2")
    expected_align = {"g": 0.1, "gr": 1.0, "r": 1.0}[variant]
    assert cfg.loss.alignment_weight == expected_align
    assert cfg.loss.source_recovery_weight == {"g": 0.5, "gr": 0.5, "r": 1.0}[variant]
