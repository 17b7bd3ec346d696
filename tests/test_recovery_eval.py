"""Reconstruction with the learned Source Recovery's assignment against the encoder's (the paper's Table 5 cost)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergevq import MergeVQ
from mergevq.eval.tokenizer_eval import evaluate_tokenizer


@pytest.fixture(scope="module")
def model() -> MergeVQ:
    torch.manual_seed(0)
    return MergeVQ.from_preset("tiny-32").eval()


@pytest.fixture(scope="module")
def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(4, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2)]


def _psnr(result) -> float:
    return result.metrics["psnr"].mean


def test_true_rows_do_not_change_when_predicted_rows_are_added(model, batches) -> None:
    alone = evaluate_tokenizer(model=model, batches=batches, num_tokens=[16, 36], device=torch.device("cpu"))
    both = evaluate_tokenizer(
        model=model, batches=batches, num_tokens=[16, 36], device=torch.device("cpu"), assignments=["true", "predicted"]
    )
    assert [(r.num_tokens, r.assignment) for r in both.results] == [
        (16, "true"),
        (16, "predicted"),
        (36, "true"),
        (36, "predicted"),
    ]
    for a, b in zip(alone.results, [r for r in both.results if r.assignment == "true"], strict=True):
        assert _psnr(a) == _psnr(b) and a.codebook_used == b.codebook_used
        assert b.recovery_accuracy is None


def test_predicted_rows_decode_with_the_source_recovery(model, batches) -> None:
    with torch.inference_mode():
        hits = seen = 0
        for images in batches:
            encoded = model.encode(images, num_tokens=16)
            predicted = model.predict_assignment(encoded.indices)
            hits += int((predicted == encoded.assignment).sum())
            seen += predicted.numel()
    result = evaluate_tokenizer(
        model=model, batches=batches, num_tokens=[16], device=torch.device("cpu"), assignments=["predicted"]
    ).results[0]
    assert result.recovery_accuracy == pytest.approx(hits / seen)
    assert result.recovery_accuracy < 1  # an untrained recovery misplaces tokens ...
    true = evaluate_tokenizer(model=model, batches=batches, num_tokens=[16], device=torch.device("cpu")).results[0]
    assert _psnr(result) != _psnr(true)  # ... so its reconstructions differ


def test_a_perfect_recovery_gives_the_true_rows(model, batches, monkeypatch) -> None:
    truth: dict[int, torch.Tensor] = {}
    real_encode = model.encode

    def encode(x, *, num_tokens=None):
        encoded = real_encode(x, num_tokens=num_tokens)
        truth[id(encoded.indices)] = encoded.assignment
        return encoded

    monkeypatch.setattr(model, "encode", encode)
    monkeypatch.setattr(model, "predict_assignment", lambda indices: truth[id(indices)])
    both = evaluate_tokenizer(
        model=model, batches=batches, num_tokens=[16], device=torch.device("cpu"), assignments=["true", "predicted"]
    ).results
    assert both[1].recovery_accuracy == 1.0
    assert _psnr(both[0]) == pytest.approx(_psnr(both[1]), abs=1e-6)


def test_bad_assignment_names_are_refused(model, batches) -> None:
    with pytest.raises(ValueError, match="assignments"):
        evaluate_tokenizer(model=model, batches=batches, num_tokens=[16], device=torch.device("cpu"), assignments=["x"])


def test_cli_writes_one_row_per_assignment(mergevq_cli, tiny_tokenizer_dir, cifar10_root, tmp_path) -> None:
    out = tmp_path / "eval.json"
    code = mergevq_cli(
        "evaluate", "tokenizer", "--model", tiny_tokenizer_dir, "--data", cifar10_root / "test", "--max-images", "8",
        "--num-tokens", "16", "--assignment", "true", "predicted", "--no-fid", "--no-lpips", "--output", out,
        "--num-workers", "0",
    )  # fmt: skip
    assert code == 0
    rows = json.loads(Path(out).read_text())["results"]
    assert [(r["num_tokens"], r["assignment"]) for r in rows] == [(16, "true"), (16, "predicted")]
    assert rows[0]["recovery_accuracy"] is None and 0 <= rows[1]["recovery_accuracy"] <= 1
