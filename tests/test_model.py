"""MergeVQ end to end: presets, parameter counts, round trips for every K, persistence and errors."""

from __future__ import annotations

import json

import pytest
import torch

from mergevq.tokenizer.config import TokenizerConfig, get_preset
from mergevq.tokenizer.model import MergeVQ

# SPEC §2.1 verified counts (millions): encoder without head, alignment head, decoder.
VERIFIED = {
    "g-d64": (62.33, 2.63, 82.85),
    "gr-d64": (62.67, 6.82, 83.37),
    "r-vitb": (85.68, 14.16, 83.37),
    "g-d32": (38.2, 1.8, 51.4),
    "gr-d32": (38.6, 4.1, 52.0),
    "gr-d96": (140.9, 14.2, 187.2),
}


@pytest.mark.parametrize("name", sorted(VERIFIED))
def test_paper_preset_parameter_counts(name):
    with torch.device("meta"):
        model = MergeVQ.from_preset(name)
    counts = model.parameter_counts()
    for part, expected in zip(("encoder", "align_head", "decoder"), VERIFIED[name]):
        # within 1%, or within the rounding of the one-decimal figures SPEC gives for the d32/d96 sizes
        assert counts[part] / 1e6 == pytest.approx(expected, rel=0.01, abs=0.05), (name, part, counts[part])


def _round_trip_low_resolution(name: str, ks) -> None:
    # Same architecture as the preset, on a small image (4×4 grid, L = 16) so that K sweeps are cheap.
    size = get_preset(name).downsample * 4
    model = MergeVQ.from_preset(name, image_size=size, default_num_tokens=4).eval()
    x = torch.rand(1, 3, size, size) * 2 - 1
    with torch.no_grad():
        for k in ks:
            enc = model.encode(x, num_tokens=k)
            assert enc.indices.shape == (1, k)
            assert enc.assignment.shape == (1, 16)
            assert torch.equal(torch.sort(enc.assignment.unique())[0], torch.arange(k))
            assert torch.equal(enc.sizes.sum(1), torch.full((1,), 16.0))
            assert model.decode(enc).shape == x.shape


@pytest.mark.parametrize("name", sorted(VERIFIED))
def test_paper_presets_round_trip_at_low_resolution(name):
    _round_trip_low_resolution(name, (1, 7, 16))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VERIFIED))
def test_paper_presets_round_trip_every_k_at_low_resolution(name):
    _round_trip_low_resolution(name, range(1, 17))


@pytest.mark.parametrize("name", ["tiny-32", "tiny-64"])
def test_tiny_round_trip_all_k_with_invariants(name):
    model = MergeVQ.from_preset(name).eval()
    size = model.config.image_size
    x = torch.rand(2, 3, size, size) * 2 - 1
    length = model.num_tokens_full
    with torch.no_grad():
        for k in range(1, length + 1):
            enc = model.encode(x, num_tokens=k)
            counts = torch.stack([torch.bincount(a, minlength=k) for a in enc.assignment])
            assert torch.equal(counts.float(), enc.sizes)  # sizes equal group counts
            s = enc.source_matrix()
            assert torch.equal(s.sum(1), torch.ones(2, length))  # each position in exactly one group
            # raster order of the first source position
            positions = torch.arange(length).expand(2, length)
            first = torch.full((2, k), length).scatter_reduce(1, enc.assignment, positions, "amin")
            assert bool((first[:, 1:] > first[:, :-1]).all())
            assert torch.equal(enc.codes, model.quantizer.indices_to_codes(enc.indices))
            if k % 9 == 1 or k == length:  # decoding is the slow part: a spread of K is enough
                torch.testing.assert_close(model.decode(enc), model.decode(enc.indices, enc.assignment))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VERIFIED))
def test_paper_presets_full_resolution_round_trip(name):
    model = MergeVQ.from_preset(name).eval()
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        for k in (1, 97, model.config.default_num_tokens, model.num_tokens_full):
            enc = model.encode(x, num_tokens=k)
            assert enc.indices.shape == (1, k)
            assert model.decode(enc).shape == x.shape


def test_training_forward_losses_and_gradients():
    model = MergeVQ.from_preset("tiny-32").train()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    out = model(x, num_tokens=20)
    assert out.reconstruction.shape == x.shape
    for key in ("commitment", "entropy", "per_sample_entropy", "codebook_entropy", "source_recovery"):
        assert out.losses[key].dim() == 0 and torch.isfinite(out.losses[key])
    loss = (out.reconstruction - x).abs().mean() + out.losses["entropy"] + out.losses["source_recovery"]
    loss.backward()
    # straight-through: the reconstruction loss reaches the stem and the first merging block
    assert model.encoder.stem.conv_in.weight.grad.abs().sum() > 0
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.recovery.queries.grad.abs().sum() > 0


def test_batch_consistency_in_eval():
    model = MergeVQ.from_preset("tiny-32").eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        batch = model.encode(x, num_tokens=17)
        for i in range(3):
            single = model.encode(x[i : i + 1], num_tokens=17)
            assert torch.equal(single.indices[0], batch.indices[i])
            assert torch.equal(single.assignment[0], batch.assignment[i])


def test_default_k_and_other_resolution_keeps_merge_ratio():
    model = MergeVQ.from_preset("tiny-32").eval()
    with torch.no_grad():
        assert model.encode(torch.zeros(1, 3, 32, 32)).indices.shape[1] == model.config.default_num_tokens
        # 16×16 input → L=16 → K scaled by 16/64
        enc = model.encode(torch.zeros(1, 3, 16, 16), num_tokens=32)
    assert enc.indices.shape[1] == 8 and enc.grid == (4, 4)


def test_decode_with_predicted_assignment():
    model = MergeVQ.from_preset("tiny-32").eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        enc = model.encode(x, num_tokens=12)
        predicted = model.predict_assignment(enc.indices)
        assert predicted.shape == (2, 64) and int(predicted.max()) < 12
        assert model.decode(enc.indices).shape == x.shape


def test_save_and_load_pretrained_identical(tmp_path):
    model = MergeVQ.from_preset("tiny-32").eval()
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["name"] == "tiny-32"
    loaded = MergeVQ.from_pretrained(tmp_path / "m").eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a, b = model.encode(x, num_tokens=9), loaded.encode(x, num_tokens=9)
        assert torch.equal(a.indices, b.indices)
        torch.testing.assert_close(model.decode(a), loaded.decode(b))


def test_loading_weights_of_another_preset_names_both(tmp_path):
    MergeVQ.from_preset("tiny-64").save_pretrained(tmp_path / "other")
    model = MergeVQ.from_preset("tiny-32")
    with pytest.raises(
        ValueError, match=r"model\.safetensors does not fit preset 'tiny-32'.*saved from preset 'tiny-64'"
    ):
        model.load_weights(tmp_path / "other" / "model.safetensors")


def test_corrupt_weights_and_missing_files(tmp_path):
    model = MergeVQ.from_preset("tiny-32")
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors"):
        MergeVQ.from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        MergeVQ.from_pretrained(tmp_path / "nowhere")


def test_bad_inputs_give_clear_errors():
    model = MergeVQ.from_preset("tiny-32").eval()
    with pytest.raises(ValueError, match=r"num_tokens=65 is outside \[1, L=64\]"):
        model.encode(torch.zeros(1, 3, 32, 32), num_tokens=65)
    with pytest.raises(ValueError, match=r"expected images \[B,3,H,W\]"):
        model.encode(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="not divisible"):
        model.encode(torch.zeros(1, 3, 30, 30))
    with pytest.raises(ValueError, match="assignment shape"):
        model.decode(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        MergeVQ.from_preset("nope")
    with pytest.raises(ValueError, match="unknown tokenizer config key"):
        MergeVQ.from_preset("tiny-32", widht=3)


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="TokenizerConfig.variant"):
        TokenizerConfig(variant="x")
    with pytest.raises(ValueError, match="TokenizerConfig.default_num_tokens"):
        get_preset("tiny-32", default_num_tokens=100)
    with pytest.raises(ValueError, match="TokenizerConfig.image_size"):
        get_preset("tiny-32", image_size=30)
