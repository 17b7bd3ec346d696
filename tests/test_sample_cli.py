"""``mergevq sample``: generator + tokenizer → samples.npz, PNG grids and a summary, on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mergevq import MergeVQ
from mergevq.data.tokens import tokenizer_identity
from mergevq.generator import Generator, GeneratorConfig


def _generator_dir(root: Path, tokenizer_dir: Path, *, kind: str, **overrides) -> Path:
    tokenizer = MergeVQ.from_pretrained(tokenizer_dir)
    config = GeneratorConfig(
        kind=kind,
        depth=2,
        width=64,
        num_heads=2,
        codebook_bits=tokenizer.config.codebook_bits,
        grid=(tokenizer.config.grid_size, tokenizer.config.grid_size),
        num_classes=10,
        merge_levels=(16, 32) if kind in ("mergear", "randar") else (),
        window=0,
        tokenizer=tokenizer_identity(tokenizer.config),
    ).replace(**overrides)
    torch.manual_seed(1)
    model = Generator(config)
    with torch.no_grad():  # the output heads start at zero (uniform logits); give them some structure to sample from
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.save_pretrained(root / kind)


# kind -> (extra arguments, forward passes per batch, K asked for)
KINDS = {
    "ar": ([], 64, 64),  # prefill + 63 single-token steps
    "mergear": (["--num-tokens", "16"], 64, 16),
    "randar": (["--num-tokens", "16", "--steps", "8"], 8, 16),  # 8 parallel-decoding passes for 16 tokens
    "maskgit": (["--steps", "6", "--tome-ratio", "0.25"], 6, 64),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_sample_writes_npz_grids_and_summary(kind, tiny_tokenizer_dir, mergevq_cli, tmp_path) -> None:
    gen_dir = _generator_dir(tmp_path, tiny_tokenizer_dir, kind=kind)
    out = tmp_path / "out"
    extra, passes, requested = KINDS[kind]
    argv = ["sample", "--generator", gen_dir, "--tokenizer", tiny_tokenizer_dir, "--output", out]
    argv += ["--classes", "1", "7", "--num-per-class", "3", "--batch-size", "4", "--cfg", "1.5", "--top-k", "0", "50"]
    assert mergevq_cli(*argv, *extra) == 0

    with np.load(out / "samples.npz") as data:
        images, labels = data["arr_0"], data["labels"]
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [1, 1, 1, 7, 7, 7]
    assert (out / "grid.png").is_file()
    assert (out / "merge_maps.png").is_file() == (kind in ("mergear", "randar"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_images"] == 6 and summary["generator_kind"] == kind
    assert (summary["peak_cache_bytes"] > 0) == (kind != "maskgit")  # MaskGIT is bidirectional: no KV cache
    assert summary["speed"]["end_to_end_images_per_s"] > 0
    assert summary["speed"]["forward_passes_per_image"] == passes
    distinct = summary["distinct_groups"]
    # An untrained MergeAR ignores its merge instruction (up to L groups); RandAR places exactly K codes.
    most = requested if kind == "randar" else 64
    assert len(distinct["per_image"]) == 6 and 1 <= distinct["min"] <= distinct["max"] <= most
    assert distinct["requested"] == requested

    # Same seed, same images: the command is reproducible.
    again = tmp_path / "again"
    assert mergevq_cli(*argv[:6], again, *argv[7:], *extra) == 0
    with np.load(again / "samples.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], images)


def test_sample_errors_are_one_line(tiny_tokenizer_dir, mergevq_cli, tmp_path, capsys) -> None:
    gen_dir = _generator_dir(tmp_path, tiny_tokenizer_dir, kind="mergear")
    base = ["sample", "--generator", gen_dir, "--tokenizer", tiny_tokenizer_dir, "--output", tmp_path / "o"]
    cases = [
        (["--num-tokens", "36"], "trained with K in (16, 32)"),
        (["--classes", "12"], "outside [0, 10)"),
        (["--top-k", "1", "2", "3"], "one per bit group"),
        (["--tome-ratio", "0.5"], "applies to MaskGIT"),
    ]
    for extra, message in cases:
        assert mergevq_cli(*base, *extra) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err

    other = _generator_dir(tmp_path / "other", tiny_tokenizer_dir, kind="ar", codebook_bits=12)
    assert mergevq_cli("sample", "--generator", other, "--tokenizer", tiny_tokenizer_dir, "--output", tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert "different tokenizers" in err and "codebook_bits" in err and len(err.splitlines()) == 1

    run_dir = tmp_path / "run"
    (run_dir / "export").mkdir(parents=True)
    (run_dir / "export" / "config.json").write_text("{}")
    assert mergevq_cli("sample", "--generator", run_dir, "--tokenizer", tiny_tokenizer_dir, "--output", tmp_path) == 2
    assert "try --generator" in capsys.readouterr().err
