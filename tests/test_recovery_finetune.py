"""Source Recovery fine-tuning on generated samples: the pairs, the training, and the command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mergevq import MergeVQ
from mergevq.train.recovery_finetune import finetune_recovery, recovery_accuracy, recovery_pairs


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    # Smooth random images: blurred noise, so merging has structure to follow.
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 3, 8, 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False)


def test_pairs_are_the_encoders_codes_and_assignment(images) -> None:
    torch.manual_seed(0)
    model = MergeVQ.from_preset("tiny-32").eval()
    (pairs,) = recovery_pairs(model=model, images=images[:10], num_tokens=[16], batch_size=4)
    with torch.inference_mode():
        encoded = model.encode(images[:10], num_tokens=16)
        codes = model.quantizer.indices_to_codes(encoded.indices)
    assert pairs.codes.shape == (10, 16, model.config.codebook_bits)
    torch.testing.assert_close(pairs.codes, codes.float())
    assert torch.equal(pairs.assignment, encoded.assignment)


def test_finetuning_trains_only_the_recovery_and_improves_it(images) -> None:
    torch.manual_seed(0)
    model = MergeVQ.from_preset("tiny-32").eval()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("recovery.")}
    tuned = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("recovery.")}
    pairs = recovery_pairs(model=model, images=images, num_tokens=[16, 36])
    train_acc_before = recovery_accuracy(model=model, pairs=pairs[0])
    result = finetune_recovery(model=model, pairs=pairs, epochs=6, lr=3e-3, batch_size=8, heldout_fraction=0.25)
    assert result.num_train == 30 and result.num_heldout == 10
    assert set(result.accuracy_before) == set(result.accuracy_after) == {16, 36}
    assert result.train_losses[-1] < result.train_losses[0]
    assert recovery_accuracy(model=model, pairs=pairs[0]) > train_acc_before
    for name, p in model.named_parameters():
        assert p.requires_grad  # restored afterwards
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert any(not torch.equal(p, tuned[n]) for n, p in model.named_parameters() if n in tuned)


def test_finetuning_refuses_bad_arguments(images) -> None:
    torch.manual_seed(0)
    model = MergeVQ.from_preset("tiny-32").eval()
    pairs = recovery_pairs(model=model, images=images[:4], num_tokens=[16])
    with pytest.raises(ValueError, match="heldout_fraction"):
        finetune_recovery(model=model, pairs=pairs, heldout_fraction=1.0)
    with pytest.raises(ValueError, match="images"):
        recovery_pairs(model=model, images=images[:2, :, :16, :16], num_tokens=[16])


def test_command_saves_a_tokenizer_with_only_a_new_recovery(
    mergevq_cli, tiny_tokenizer_dir, images, tmp_path, capsys
) -> None:
    samples = tmp_path / "samples.npz"
    uint8 = ((images.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    np.savez(samples, arr_0=uint8, labels=np.zeros(len(uint8), dtype=np.int64))
    out = tmp_path / "tuned"
    code = mergevq_cli(
        "finetune-recovery", "--tokenizer", tiny_tokenizer_dir, "--samples", samples, "--num-tokens", "16",
        "--epochs", "1", "--output", out, "--device", "cpu",
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / "finetune.json").read_text())
    assert report["num_images"] == 40 and report["num_heldout"] == 4 and set(report["accuracy_after"]) == {"16"}
    assert "held-out recovery accuracy" in capsys.readouterr().out
    original, tuned = MergeVQ.from_pretrained(tiny_tokenizer_dir), MergeVQ.from_pretrained(out)
    assert original.config == tuned.config
    a, b = original.state_dict(), tuned.state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a if not n.startswith("recovery."))
    assert any(not torch.equal(a[n], b[n]) for n in a if n.startswith("recovery."))


def test_command_names_a_bad_samples_file(mergevq_cli, tiny_tokenizer_dir, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, arr_0=np.zeros((2, 16, 16, 3), dtype=np.uint8))
    code = mergevq_cli(
        "finetune-recovery", "--tokenizer", tiny_tokenizer_dir, "--samples", bad, "--num-tokens", "16",
        "--output", tmp_path / "out", "--device", "cpu",
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "32" in err and len(err.strip().splitlines()) == 1
    assert not Path(tmp_path / "out").exists()
