"""Generator configuration, presets, parameter counts and checkpoint round trips."""

from __future__ import annotations

import json

import pytest
import torch

from mergevq.generator import Generator, GeneratorConfig, find_multiple, preset_names


def _meta_count(name: str, **task) -> int:
    with torch.device("meta"):
        model = Generator.from_preset(name, **task)
    return model.parameter_counts()["total"]


@pytest.mark.parametrize(("name", "published"), [("B", 111e6), ("L", 343e6), ("XL", 775e6)])
def test_llamagen_sizes_match_published_counts(name, published):
    # LlamaGen: single head over 2^14 codes, 1000 classes, 16×16 = 256 positions.
    total = _meta_count(name, codebook_bits=14, grid=(16, 16), num_classes=1000)
    assert abs(total - published) / published < 0.01, (name, total)


def test_official_mergevq_generator_count():
    # SPEC §6.2: 24 layers, 1024 wide, 16 heads, bits (6, 12), 2 intra layers, 1000 classes: 343.6M.
    total = _meta_count("L", codebook_bits=18, factorized_bits=(6, 12), factorized_depth=2, num_classes=1000)
    assert abs(total - 343.6e6) / 343.6e6 < 0.001, total


def test_cpu_presets_are_small():
    task = dict(kind="mergear", codebook_bits=18, grid=(8, 8), num_classes=10, merge_levels=(16, 32, 64))
    tiny = _meta_count("tiny", **task)
    small = _meta_count("small", **task)
    assert 2e6 < tiny < 6e6 and 8e6 < small < 14e6, (tiny, small)
    assert set(preset_names()) >= {"B", "L", "XL", "tiny", "small"}


def test_defaults_and_derived_fields():
    assert find_multiple(2730, 256) == 2816 and find_multiple(256, 256) == 256
    cfg = GeneratorConfig(width=1024, num_heads=16, codebook_bits=18)
    assert cfg.hidden_dim == 2816  # find_multiple(int(2·4·1024/3), 256), SPEC §6.2
    assert cfg.factorized_bits == (6, 12)  # a large codebook is factorised by default
    assert GeneratorConfig(codebook_bits=12).factorized_bits == (12,)  # small one: plain head
    assert cfg.num_positions == 256 and cfg.null_class == 1000
    assert cfg.replace(codebook_bits=9).factorized_bits == (9,)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (dict(kind="diffusion"), "kind"),
        (dict(width=100, num_heads=3), "width"),
        (dict(width=120, num_heads=12), "num_heads"),  # head dim 10 is not divisible by 4
        (dict(codebook_bits=18, factorized_bits=(6, 10)), "factorized_bits"),
        (dict(codebook_bits=18, factorized_bits=(18,)), "factorized_bits"),
        (dict(codebook_bits=19), "codebook_bits"),
        (dict(grid=(4, 0)), "grid"),
        (dict(kind="mergear"), "merge_levels"),
        (dict(kind="mergear", merge_levels=(0,)), "merge_levels"),
        (dict(kind="mergear", grid=(4, 4), merge_levels=(17,)), "merge_levels"),
        (dict(kind="ar", merge_levels=(4,)), "merge_levels"),
        (dict(grid=(4, 4), window=16), "window"),
        (dict(class_dropout=1.5), "class_dropout"),
        (dict(label_smoothing=1.0), "label_smoothing"),
    ],
)
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ValueError, match=f"GeneratorConfig.{key}"):
        GeneratorConfig(**overrides)


def test_from_dict_round_trip_and_unknown_keys(tmp_path):
    cfg = GeneratorConfig.from_preset(
        "tiny", kind="mergear", codebook_bits=18, grid=(8, 8), num_classes=10, merge_levels=(16, 32)
    )
    path = tmp_path / "config.json"
    cfg.save(path)
    assert GeneratorConfig.load(path) == cfg
    with pytest.raises(ValueError, match=r"unknown generator config key\(s\) \['widht'\]"):
        GeneratorConfig.from_dict({**cfg.to_dict(), "widht": 3})
    with pytest.raises(ValueError, match="unknown generator preset 'huge'"):
        GeneratorConfig.from_preset("huge")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GeneratorConfig.load(path)


def _tiny(**overrides) -> Generator:
    base = dict(depth=1, width=32, num_heads=2, codebook_bits=8, factorized_bits=(3, 5), grid=(4, 4), num_classes=3)
    return Generator(GeneratorConfig(**{**base, **overrides}))


def test_save_load_round_trip(tmp_path):
    model = _tiny(kind="mergear", merge_levels=(4, 8))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    model.save_pretrained(tmp_path / "gen")
    loaded = Generator.from_pretrained(tmp_path / "gen")
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_load_errors_name_the_file(tmp_path):
    _tiny().save_pretrained(tmp_path / "a")
    other = _tiny(width=64, num_heads=4)
    weights = tmp_path / "a" / "model.safetensors"
    with pytest.raises(ValueError, match=r"model\.safetensors does not fit generator .*shape mismatch"):
        other.load_weights(weights)
    weights.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        Generator.from_pretrained(tmp_path / "a")
    config = tmp_path / "a" / "config.json"
    config.write_text(json.dumps({**_tiny().config.to_dict(), "depth": 0}))
    with pytest.raises(ValueError, match=r"config\.json: GeneratorConfig\.depth"):
        Generator.from_pretrained(tmp_path / "a")
