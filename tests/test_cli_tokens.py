"""The ``reconstruct`` and ``encode`` sub-commands on real CIFAR-10 images with a small saved model."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import mergevq.cli
from mergevq import MergeVQ
from mergevq.commands import reconstruct
from mergevq.data.images import ImageDataset
from mergevq.data.tokens import TokenDataset, load_tokens
from mergevq.data.transforms import eval_transform

COMMAND_MODULES = ("mergevq.commands.reconstruct", "mergevq.commands.encode")


@pytest.fixture(scope="module")
def images_dir(cifar10_root: Path, tmp_path_factory) -> Path:
    """Three CIFAR-10 test images (one in a sub-folder) and one corrupt file."""
    root = tmp_path_factory.mktemp("images")
    (root / "more").mkdir()
    for name, target in (("cat", "cat.jpg"), ("ship", "ship.jpg"), ("frog", "more/frog.jpg")):
        source = sorted((cifar10_root / "test" / name).iterdir())[0]
        shutil.copy(source, root / target)
    (root / "broken.png").write_bytes(b"not an image at all")
    return root


# --------------------------------------------------------------------------------------------------------- reconstruct


def test_reconstruct_writes_panels_and_summary(mergevq_cli, tiny_tokenizer_dir, images_dir, tmp_path, capsys) -> None:
    out = tmp_path / "recon"
    rc = mergevq_cli("reconstruct", "--model", tiny_tokenizer_dir, "--input", images_dir, "--num-tokens", "8", "64",
                     "--output", out, "--device", "cpu", "--batch-size", "2")  # fmt: skip
    assert rc == 0
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "warning" in captured.err

    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_images"] == 3 and summary["num_skipped"] == 1
    assert summary["skipped"][0]["input"].endswith("broken.png")
    assert summary["num_tokens"] == [8, 64] and summary["num_positions"] == 64 and summary["grid"] == [8, 8]
    assert {Path(r["input"]).name for r in summary["images"]} == {"cat.jpg", "ship.jpg", "frog.jpg"}
    for record in summary["images"]:
        stem = Path(record["input"]).stem
        assert record["panel"] == f"{stem}.png"
        assert record["merged_tokens"] == {"8": 8, "64": 64}
        for k in ("8", "64"):
            assert math.isfinite(record["psnr"][k]) and record["psnr"][k] > 0
            with Image.open(out / record["reconstructions"][k]) as raw:
                assert raw.size == (32, 32) and raw.mode == "RGB"
        with Image.open(out / record["panel"]) as panel:
            panel.load()
            assert panel.size[0] > 5 * 32  # input + two (merge map, reconstruction) pairs
    for k in ("8", "64"):
        mean = sum(r["psnr"][k] for r in summary["images"]) / 3
        assert summary["mean_psnr"][k] == pytest.approx(mean)
    assert "K=8: mean PSNR" in captured.out


def test_reconstruct_rejects_k_above_l(mergevq_cli, tiny_tokenizer_dir, images_dir, tmp_path, capsys) -> None:
    out = tmp_path / "never"
    rc = mergevq_cli(
        "reconstruct", "--model", tiny_tokenizer_dir, "--input", images_dir, "--num-tokens", "8", "65", "--output", out
    )
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "K=65" in err and "L=64" in err
    assert not out.exists()


def test_reconstruct_missing_model_dir(mergevq_cli, images_dir, tmp_path, capsys) -> None:
    missing = tmp_path / "no-such-model"
    rc = mergevq_cli(
        "reconstruct", "--model", missing, "--input", images_dir, "--num-tokens", "8", "--output", tmp_path / "o"
    )
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model directory not found" in err and str(missing) in err

    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    rc = mergevq_cli("reconstruct", "--model", not_a_model, "--input", images_dir, "--output", tmp_path / "o")
    assert rc == 2
    assert "missing config.json" in capsys.readouterr().err


def test_reconstruct_preset_single_image_other_size(mergevq_cli, images_dir, tmp_path, capsys) -> None:
    out = tmp_path / "try"
    rc = mergevq_cli("reconstruct", "--preset", "tiny-32", "--input", images_dir / "cat.jpg", "--num-tokens", "4",
             "--output", out, "--size", "64", "--no-merge-maps")  # fmt: skip
    assert rc == 0
    assert "untrained" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["weights"].startswith("random") and summary["image_size"] == 64
    assert summary["images"][0]["merged_tokens"] == {"4": 16}  # K keeps its ratio to L at 64 px (L = 256)
    with Image.open(out / "cat_k4.png") as raw:
        assert raw.size == (64, 64)


def test_reconstruct_unique_output_names(tmp_path) -> None:
    for rel in ("a/x.png", "b/x.png", "a_x.png", "y.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    names = [item.name for item in reconstruct.find_inputs(tmp_path)]
    assert len(set(names)) == 4 and "y" in names and "a_x" in names and "b_x" in names


# --------------------------------------------------------------------------------------------------------------- encode


def test_encode_cifar_subset_is_deterministic(mergevq_cli, tiny_tokenizer_dir, cifar10_root, tmp_path) -> None:
    files = []
    for workers in ("0", "2"):  # worker processes change nothing but speed
        path = tmp_path / f"tokens_{workers}.safetensors"
        rc = mergevq_cli("encode", "--model", tiny_tokenizer_dir, "--data", cifar10_root / "test", "--num-tokens", "16",
                 "--output", path, "--max-images", "20", "--batch-size", "8", "--num-workers", workers,
                 "--device", "cpu", "--split-name", "val")  # fmt: skip
        assert rc == 0
        files.append(load_tokens(path))
    tokens, again = files
    assert tokens.indices.shape == (20, 16) and tokens.assignment.shape == (20, 64) and tokens.labels.shape == (20,)
    assert int(tokens.assignment.min()) == 0 and int(tokens.assignment.max()) < 16
    assert all(len(set(row.tolist())) == 16 for row in tokens.assignment)  # every merged token owns a position
    assert int(tokens.indices.max()) < 2**18
    assert set(tokens.labels.tolist()) == set(range(10))  # the strided subset keeps every class
    meta = tokens.meta
    assert tokens.num_tokens_available == (16,) and tokens.num_tokens == 16
    assert meta["tokenizer"] == "tiny-32" and meta["num_tokens"] == [16] and meta["num_positions"] == 64
    assert meta["grid"] == [8, 8] and meta["image_size"] == 32 and meta["vocab_size"] == 2**18
    assert meta["class_names"][:2] == ["airplane", "automobile"] and meta["num_classes"] == 10
    assert meta["dataset_root"] == str((cifar10_root / "test").resolve())
    assert meta["split"] == "val" and meta["num_skipped"] == 0 and meta["num_images"] == 20
    assert torch.equal(tokens.indices, again.indices)
    assert torch.equal(tokens.assignment, again.assignment)
    assert torch.equal(tokens.labels, again.labels)


def test_encode_skips_corrupt_files(mergevq_cli, tiny_tokenizer_dir, images_dir, tmp_path, capsys) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in images_dir.rglob("*.*"):
        shutil.copy(path, flat / path.name)
    (flat / "truncated.jpg").write_bytes((images_dir / "cat.jpg").read_bytes()[:200])
    out = tmp_path / "flat.safetensors"
    rc = mergevq_cli("encode", "--model", tiny_tokenizer_dir, "--data", flat, "--num-tokens", "8", "--output", out,
             "--num-workers", "0", "--batch-size", "2")  # fmt: skip
    assert rc == 0
    tokens = load_tokens(out)
    assert len(tokens) == 3 and tokens.labels.tolist() == [-1, -1, -1]  # flat folder: unlabelled
    assert tokens.meta["num_skipped"] == 2
    assert sorted(tokens.meta["skipped_files"]) == ["broken.png", "truncated.jpg"]
    assert tokens.meta["split"] == "flat" and tokens.meta["class_names"] == []
    assert "mergevq encode: warning: skipping unreadable image" in capsys.readouterr().err


def test_encode_several_k_matches_the_model(mergevq_cli, tiny_tokenizer_dir, cifar10_root, tmp_path, capsys) -> None:
    path = tmp_path / "multi.safetensors"
    data = cifar10_root / "test"
    rc = mergevq_cli("encode", "--model", tiny_tokenizer_dir, "--data", data, "--num-tokens", "64", "16",
                     "--output", path, "--max-images", "6", "--batch-size", "4", "--num-workers", "0",
                     "--device", "cpu")  # fmt: skip
    assert rc == 0
    assert "wrote 6 image(s) x K=16,64 tokens (L=64)" in capsys.readouterr().out
    tokens = load_tokens(path)
    assert tokens.num_tokens_available == (16, 64) and len(tokens) == 6 and tokens.num_positions == 64
    meta = tokens.meta
    assert meta["num_tokens"] == [16, 64] and meta["num_positions"] == 64 and meta["grid"] == [8, 8]
    assert meta["codebook_bits"] == 18 and meta["image_size"] == 32 and meta["tokenizer"] == "tiny-32"
    assert meta["tokenizer_config"]["name"] == "tiny-32" and meta["split"] == "test"
    with pytest.raises(ValueError, match=r"multi\.safetensors holds no K=32 tokens; available K: \[16, 64\]"):
        tokens.get(num_tokens=32)

    # The same images through the model directly, in the command's batches (4 + 2), agree token for token.
    model = MergeVQ.from_pretrained(tiny_tokenizer_dir).eval()
    dataset = ImageDataset(data, transform=eval_transform(32), max_images=6)
    images = torch.stack([dataset[i]["image"] for i in range(6)])
    assert tokens.labels.tolist() == [dataset[i]["label"] for i in range(6)]
    for k in (16, 64):
        with torch.inference_mode():
            encoded = [model.encode(chunk, num_tokens=k) for chunk in images.split(4)]
        indices = torch.cat([e.indices for e in encoded])
        assignment = torch.cat([e.assignment for e in encoded])
        got_indices, got_assignment = tokens.get(num_tokens=k)
        assert got_indices.shape == (6, k) and got_assignment.shape == (6, 64)
        assert torch.equal(got_indices, indices) and torch.equal(got_assignment, assignment)
        raster = got_indices.gather(1, got_assignment)  # what the decoder sees for each grid position
        assert torch.equal(raster, indices.gather(1, assignment))

    # The token dataset serves either K from the one file; gather gives the K-sparse raster target.
    dataset_k = TokenDataset(tokens)
    rows = torch.tensor([5, 0, 2])
    for k in (16, 64):
        batch = dataset_k.batch(rows, num_tokens=k)
        assert batch.indices.shape == (3, k) and batch.assignment.shape == (3, 64) and batch.labels.shape == (3,)
        expected = tokens.get(num_tokens=k)[0].gather(1, tokens.get(num_tokens=k)[1])[rows]
        assert torch.equal(batch.raster_indices(), expected)
        for raster_row, kept in zip(batch.raster_indices(), batch.indices):
            assert set(raster_row.tolist()) == set(kept.tolist())  # every merged token owns a position
    assert torch.equal(dataset_k.batch(rows, num_tokens=64).labels, tokens.labels[rows])


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--num-tokens", "65"], "K=65"),
        (["--num-tokens", "8", "65", "16"], "K=65"),
        (["--num-tokens", "0"], "K=0"),
    ],
)
def test_encode_argument_errors(mergevq_cli, tiny_tokenizer_dir, images_dir, tmp_path, capsys, extra, needle) -> None:
    out = tmp_path / "t.safetensors"
    rc = mergevq_cli("encode", "--model", tiny_tokenizer_dir, "--data", images_dir, "--output", out, *extra)
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------- help


RECONSTRUCT_OPTIONS = ("--model", "--preset", "--input", "--num-tokens", "--output", "--device", "--batch-size",
                       "--max-images", "--size", "--no-merge-maps")  # fmt: skip
ENCODE_OPTIONS = ("--model", "--data", "--num-tokens", "--output", "--batch-size", "--num-workers", "--max-images",
                  "--device", "--split-name")  # fmt: skip


@pytest.mark.parametrize(("command", "options"), [("reconstruct", RECONSTRUCT_OPTIONS), ("encode", ENCODE_OPTIONS)])
def test_help_mentions_every_option(monkeypatch, capsys, command, options) -> None:
    monkeypatch.setattr(mergevq.cli, "_COMMAND_MODULES", COMMAND_MODULES)
    with pytest.raises(SystemExit) as exit_info:
        mergevq.cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in options:
        assert option in text, f"{command} --help does not mention {option}"
    assert "examples:" in text and f"mergevq {command} --model" in text
    # Every registered option is documented (nothing added without help text).
    sub = mergevq.cli.build_parser()._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    for action in sub._actions:
        assert action.help, f"{action.option_strings} has no help"


def test_main_dispatches_to_registered_commands(monkeypatch, tiny_tokenizer_dir, images_dir, tmp_path) -> None:
    monkeypatch.setattr(mergevq.cli, "_COMMAND_MODULES", COMMAND_MODULES)
    rc = mergevq.cli.main(["reconstruct", "--model", str(tiny_tokenizer_dir), "--input", str(images_dir / "ship.jpg"),
                           "--num-tokens", "99", "--output", str(tmp_path / "x")])  # fmt: skip
    assert rc == 2
