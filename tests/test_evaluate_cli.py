"""``mergevq evaluate tokenizer|generator|probe`` and ``mergevq benchmark`` on real CIFAR-10 images."""

from __future__ import annotations

import json
import math
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mergevq.cli
from mergevq import MergeVQ
from mergevq.commands import benchmark, evaluate, evaluate_generator, evaluate_tokenizer
from mergevq.eval.fid import InceptionFeatures, load_statistics, save_statistics
from mergevq.eval.report import load_results, render_results_page
from mergevq.eval.tokenizer_eval import GaussianAccumulator

COMMAND_MODULES = ("mergevq.commands.evaluate", "mergevq.commands.benchmark")


class _PooledFeatures(torch.nn.Module):
    """A cheap stand-in for the FID Inception (48-d pooled pixels): the pipeline is the same, FID takes ms."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


_INCEPTION_USERS = (evaluate_tokenizer, evaluate_generator)  # the sub-commands that build an Inception network


def _pooled_inception(*, weights, device, batch_size) -> InceptionFeatures:
    return InceptionFeatures(network=_PooledFeatures(), device=device, batch_size=batch_size)


@pytest.fixture
def pooled_features(monkeypatch) -> None:
    for module in _INCEPTION_USERS:
        monkeypatch.setattr(module, "_inception", _pooled_inception)


@pytest.fixture(scope="module")
def tokenizer_runs(mergevq_cli, cifar10_root: Path, tiny_tokenizer_dir: Path, tmp_path_factory) -> dict[int, dict]:
    """The same 8 test images evaluated at K = 16, 64 with batch sizes 3 and 8 (stand-in FID features)."""
    out = tmp_path_factory.mktemp("tokenizer")
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        for module in _INCEPTION_USERS:
            patch.setattr(module, "_inception", _pooled_inception)
        for batch_size in (3, 8):
            path = out / f"batch{batch_size}.json"
            rc = mergevq_cli(
                "evaluate", "tokenizer", "--model", tiny_tokenizer_dir, "--data", cifar10_root / "test",
                "--num-tokens", "16", "64", "--max-images", "8", "--batch-size", batch_size, "--output", path,
            )  # fmt: skip
            assert rc == 0
            runs[batch_size] = json.loads(path.read_text())
    return runs


# ----------------------------------------------------------------------------------------------------------------------
# evaluate tokenizer
# ----------------------------------------------------------------------------------------------------------------------


def test_tokenizer_json_contents(tokenizer_runs: dict[int, dict], tiny_tokenizer_dir: Path) -> None:
    data = tokenizer_runs[3]
    assert data["kind"] == "tokenizer_eval"
    assert data["command"].startswith("mergevq evaluate tokenizer --model ")
    assert data["model"]["preset"] == "tiny-32" and data["model"]["weights"] == "pretrained"
    assert data["model"]["config"]["image_size"] == 32
    assert data["data"]["num_images"] == 8 and data["data"]["image_size"] == 32
    assert data["num_tokens"] == [16, 64]
    assert {"psnr", "ssim", "lpips", "rfid", "codebook_usage", "codebook_perplexity"} <= set(data["definitions"])
    assert "data range [-1,1]" in data["definitions"]["psnr"]
    assert any("biased upward" in w for w in data["warnings"])  # 8 images < 2048
    assert {"total", "inception_originals"} <= set(data["timings"])
    assert data["machine"]["torch"] == torch.__version__
    for row, k in zip(data["results"], (16, 64)):
        assert row["num_tokens"] == k and row["merged_tokens"] == k
        assert math.isfinite(row["psnr"]) and row["psnr_num_finite"] == 8 and row["psnr_num_inf"] == 0
        assert -1.0 <= row["ssim"] <= 1.0
        assert row["lpips"] >= 0.0
        assert math.isfinite(row["rfid"]) and row["rfid"] > 0.0
        assert 0.0 < row["codebook_usage"] <= 1.0
        assert row["codebook_size"] == 2**18
        assert 1 <= row["codebook_used_codes"] <= 8 * k
        assert row["codebook_usage"] == pytest.approx(row["codebook_used_codes"] / 2**18)
        assert 1.0 <= row["codebook_perplexity"] <= row["codebook_used_codes"] + 1e-6
        assert {"encode", "decode", "metrics", "inception"} <= set(row["seconds"])


def test_tokenizer_with_the_real_inception(
    mergevq_cli, cifar10_root: Path, tiny_tokenizer_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "real.json"
    rc = mergevq_cli(
        "evaluate", "tokenizer", "--model", tiny_tokenizer_dir, "--data", cifar10_root / "test", "--num-tokens", "16",
        "--max-images", "4", "--no-lpips", "--output", out,
    )  # fmt: skip
    assert rc == 0
    row = json.loads(out.read_text())["results"][0]
    assert math.isfinite(row["rfid"]) and row["rfid"] > 1.0  # reconstructions of an untrained model are far off
    assert row["lpips"] is None


def test_tokenizer_metrics_match_a_direct_computation(
    tokenizer_runs: dict[int, dict], tiny_tokenizer_dir, cifar10_root
):
    """PSNR is the mean of per-image PSNRs of the clamped reconstructions; rFID the Fréchet distance of the
    features of originals and reconstructions (here the stand-in features, batch of 8 as in the run)."""
    from mergevq.data.images import ImageDataset
    from mergevq.data.transforms import eval_transform
    from mergevq.eval.fid import compute_statistics, frechet_distance
    from mergevq.eval.metrics import psnr

    dataset = ImageDataset(cifar10_root / "test", transform=eval_transform(32), max_images=8)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    model = MergeVQ.from_pretrained(tiny_tokenizer_dir).eval()
    with torch.inference_mode():
        reconstruction = model.decode(model.encode(images, num_tokens=16)).clamp(-1, 1)
    row = tokenizer_runs[8]["results"][0]
    assert row["psnr"] == pytest.approx(float(psnr(reconstruction, images).mean()), abs=1e-4)
    extractor = _pooled_inception(weights=None, device="cpu", batch_size=8)
    a, b = compute_statistics(extractor(images)), compute_statistics(extractor(reconstruction))
    assert row["rfid"] == pytest.approx(frechet_distance(a.mu, a.sigma, b.mu, b.sigma), rel=1e-6)


def test_tokenizer_metrics_do_not_depend_on_batch_size(tokenizer_runs: dict[int, dict]) -> None:
    for small, large in zip(tokenizer_runs[3]["results"], tokenizer_runs[8]["results"]):
        for key in ("psnr", "ssim", "lpips", "codebook_usage", "codebook_perplexity"):
            assert small[key] == pytest.approx(large[key], abs=1e-5), key
        assert small["codebook_used_codes"] == large["codebook_used_codes"]
        assert small["rfid"] == pytest.approx(large["rfid"], rel=1e-5)


def test_streaming_covariance_matches_numpy() -> None:
    rows = np.random.default_rng(0).normal(3.0, 2.0, size=(23, 5))
    accumulator = GaussianAccumulator(5)
    for chunk in np.split(rows, [1, 4, 11, 11]):  # uneven chunks, one empty
        accumulator.update(torch.from_numpy(chunk))
    stats = accumulator.statistics()
    assert stats.num_images == 23
    np.testing.assert_allclose(stats.mu, rows.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(rows, rowvar=False), rtol=1e-10)


def test_tokenizer_preset_prints_notice_and_table(mergevq_cli, cifar10_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sub" / "preset.json"
    rc = mergevq_cli(
        "evaluate", "tokenizer", "--preset", "tiny-32", "--data", cifar10_root / "test", "--num-tokens", "8",
        "--max-images", "4", "--no-fid", "--no-lpips", "--output", out,
    )  # fmt: skip
    assert rc == 0
    captured = capsys.readouterr()
    assert "randomly initialised" in captured.err
    assert "| K | merged | PSNR (dB) |" in captured.out
    data = json.loads(out.read_text())
    assert data["model"]["weights"].startswith("random")
    row = data["results"][0]
    assert row["rfid"] is None and row["lpips"] is None and math.isfinite(row["psnr"])
    assert not any("biased" in w for w in data["warnings"])  # no FID, no FID warning


def test_tokenizer_errors_are_one_line(
    mergevq_cli, cifar10_root: Path, tiny_tokenizer_dir: Path, tmp_path: Path, capsys
) -> None:
    rc = mergevq_cli(
        "evaluate", "tokenizer", "--model", tiny_tokenizer_dir, "--data", cifar10_root / "test", "--num-tokens", "65",
        "--output", tmp_path / "x.json",
    )  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mergevq evaluate tokenizer: error:") and "K=65" in err and "\n" not in err
    rc = mergevq_cli(
        "evaluate",
        "tokenizer",
        "--model",
        tiny_tokenizer_dir,
        "--data",
        tmp_path / "none",
        "--output",
        tmp_path / "x.json",
    )
    assert rc == 2 and "--data" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_command_line_reparses_to_the_same_arguments(tokenizer_runs: dict[int, dict]) -> None:
    command = tokenizer_runs[8]["command"]
    argv = shlex.split(command)
    assert argv[0] == "mergevq"
    parsed = mergevq.cli.build_parser().parse_args(argv[1:])
    assert evaluate.command_line(parsed) == command
    assert parsed.batch_size == 8 and parsed.num_tokens == [16, 64] and parsed.max_images == 8


# ----------------------------------------------------------------------------------------------------------------------
# evaluate generator
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_sets(cifar10_root: Path, tmp_path_factory) -> dict[str, Path]:
    """Six test images as a folder (in class sub-folders) and as an ADM npz; six training images as a folder."""
    root = tmp_path_factory.mktemp("generator")
    arrays = []
    # Class folders in sorted order, so the npz rows follow the folder's (sorted, recursive) file order.
    for i, name in enumerate(("bird", "cat", "frog", "horse", "ship", "truck")):
        source = sorted((cifar10_root / "test" / name).iterdir())[i]
        (root / "a" / name).mkdir(parents=True)
        shutil.copy(source, root / "a" / name / source.name)
        arrays.append(np.asarray(Image.open(source).convert("RGB")))
        other = sorted((cifar10_root / "train" / name).iterdir())[i]
        (root / "b").mkdir(exist_ok=True)
        shutil.copy(other, root / "b" / f"{name}.jpg")
    np.savez(root / "a.npz", arr_0=np.stack(arrays))
    return {"a": root / "a", "a_npz": root / "a.npz", "b": root / "b", "root": root}


def _generator(mergevq_cli, samples: Path, reference: Path, output: Path, *extra: str | Path) -> dict:
    assert (
        mergevq_cli("evaluate", "generator", "--samples", samples, "--reference", reference, "--output", output, *extra)
        == 0
    )
    return json.loads(output.read_text())


def test_fid_of_a_set_with_itself_is_zero(mergevq_cli, image_sets: dict[str, Path], tmp_path: Path) -> None:
    stats = tmp_path / "a_stats.npz"
    data = _generator(
        mergevq_cli, image_sets["a"], image_sets["a_npz"], tmp_path / "same.json", "--save-reference-stats", stats
    )
    metrics = data["metrics"]
    assert abs(metrics["fid"]) < 1e-6  # the folder's JPEGs and the npz hold the same pixels
    assert metrics["precision"] == 1.0 and metrics["recall"] == 1.0 and metrics["nearest_k"] == 3
    assert metrics["inception_score"] is None and "classifier head" in metrics["unavailable"]["inception_score"]
    assert data["samples"]["format"] == "folder" and data["reference"]["format"] == "npz"
    assert data["samples"]["num_images"] == data["reference"]["num_images"] == 6
    assert stats.is_file() and load_statistics(stats).num_images == 6


def test_fid_is_symmetric_and_positive_and_stats_reference_works(
    mergevq_cli, image_sets, tmp_path: Path, pooled_features
) -> None:
    b_stats = tmp_path / "b.npz"
    ab = _generator(
        mergevq_cli, image_sets["a_npz"], image_sets["b"], tmp_path / "ab.json", "--save-reference-stats", b_stats
    )
    ba = _generator(mergevq_cli, image_sets["b"], image_sets["a_npz"], tmp_path / "ba.json")
    assert ab["metrics"]["fid"] > 1.0
    assert ab["metrics"]["fid"] == pytest.approx(ba["metrics"]["fid"], rel=1e-6)
    assert 0.0 <= ab["metrics"]["precision"] <= 1.0 and 0.0 <= ab["metrics"]["recall"] <= 1.0
    assert ab["metrics"]["precision"] == pytest.approx(ba["metrics"]["recall"])  # the roles swap

    # The cache keeps the reference features, so precision/recall need no second Inception pass over it.
    stats = _generator(mergevq_cli, image_sets["a_npz"], b_stats, tmp_path / "stats.json")
    assert stats["reference"]["format"] == "stats"
    assert stats["metrics"]["fid"] == pytest.approx(ab["metrics"]["fid"], rel=1e-9)
    assert stats["metrics"]["precision"] == pytest.approx(ab["metrics"]["precision"])
    assert stats["metrics"]["recall"] == pytest.approx(ab["metrics"]["recall"])

    # Plain mu/sigma (e.g. published statistics): FID only, with the reason for the missing precision/recall.
    plain = load_statistics(b_stats)
    plain.features = None
    save_statistics(tmp_path / "plain.npz", plain)
    only_fid = _generator(mergevq_cli, image_sets["a_npz"], tmp_path / "plain.npz", tmp_path / "plain.json")
    assert only_fid["metrics"]["fid"] == pytest.approx(ab["metrics"]["fid"], rel=1e-9)
    assert only_fid["metrics"]["precision"] is None and only_fid["metrics"]["recall"] is None
    assert "statistics" in only_fid["metrics"]["unavailable"]["precision_recall"]


def test_generator_max_images_takes_a_strided_subset(mergevq_cli, image_sets, tmp_path: Path, pooled_features) -> None:
    data = _generator(mergevq_cli, image_sets["a"], image_sets["a_npz"], tmp_path / "sub.json", "--max-images", "4")
    assert data["samples"]["num_images"] == 4 and data["samples"]["available"] == 6
    assert data["reference"]["num_images"] == 4
    assert abs(data["metrics"]["fid"]) < 1e-6  # the same rule picks the same images from folder and npz
    assert evaluate.strided_subset(6, 4) == [0, 1, 3, 4] and evaluate.strided_subset(3, None) == [0, 1, 2]


def test_generator_input_errors(mergevq_cli, image_sets: dict[str, Path], tmp_path: Path, capsys) -> None:
    stats = tmp_path / "s.npz"
    np.savez(stats, mu=np.zeros(3), sigma=np.eye(3))
    rc = mergevq_cli(
        "evaluate", "generator", "--samples", stats, "--reference", image_sets["a"], "--output", tmp_path / "x.json"
    )
    assert rc == 2 and "samples must be images" in capsys.readouterr().err
    rc = mergevq_cli(
        "evaluate", "generator", "--samples", tmp_path / "missing.npz", "--reference", image_sets["a"],
        "--output", tmp_path / "x.json",
    )  # fmt: skip
    assert rc == 2 and "not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# evaluate probe
# ----------------------------------------------------------------------------------------------------------------------


def test_probe_reports_accuracies(mergevq_cli, cifar10_root: Path, tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    rc = mergevq_cli(
        "evaluate", "probe", "--model", tiny_tokenizer_dir, "--train", cifar10_root / "train",
        "--test", cifar10_root / "test", "--num-tokens", "16", "64", "--max-train", "60", "--max-test", "30",
        "--epochs", "5", "--output", out,
    )  # fmt: skip
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["kind"] == "probe_eval" and data["num_tokens"] == [16, 64] and data["knn_k"] == 20
    assert data["train"]["num_images"] == 60 and data["test"]["num_images"] == 30 and len(data["classes"]) == 10
    for row in data["results"]:
        for name in ("cls", "mean_tokens"):
            features = row[name]
            assert features["dim"] == 128
            for key in ("linear_top1", "linear_top5", "linear_train_top1", "knn_top1"):
                assert 0.0 <= features[key] <= 1.0, key
            assert features["linear_top5"] >= features["linear_top1"]


def test_probe_needs_labels_and_defaults_to_all_tokens(
    mergevq_cli, cifar10_root: Path, tiny_tokenizer_dir: Path, tmp_path: Path, capsys
):
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(sorted((cifar10_root / "test" / "cat").iterdir())[0], flat / "a.jpg")
    out = tmp_path / "p.json"
    rc = mergevq_cli(
        "evaluate", "probe", "--model", tiny_tokenizer_dir, "--train", flat, "--test", flat, "--output", out
    )
    assert rc == 2 and "no class sub-folders" in capsys.readouterr().err
    args = mergevq.cli.build_parser().parse_args(
        ["evaluate", "probe", "--model", "m", "--train", "a", "--test", "b", "--output", "o"]
    )
    assert args.num_tokens is None  # resolved to L (all tokens, the paper's probing protocol) at run time


@pytest.fixture(scope="module")
def colour_folders(tmp_path_factory) -> Path:
    """A labelled ImageFolder pair whose two classes differ in colour (noisy red vs noisy blue, 20×24 PNGs)."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, count in (("train", 10), ("test", 6)):
        for name, colour in (("blue", (40, 40, 200)), ("red", (200, 40, 40))):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.asarray(colour, dtype=np.float64) + rng.normal(0, 40, (20, 24, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


def _probe(mergevq_cli, folders: Path, out: Path, *source: str) -> dict:
    rc = mergevq_cli(
        "evaluate", "probe", *source, "--train", folders / "train", "--test", folders / "test", "--epochs", "10",
        "--output", out,
    )  # fmt: skip
    assert rc == 0
    return json.loads(out.read_text())


def test_probe_pixels_baseline_end_to_end(mergevq_cli, colour_folders: Path, tmp_path: Path, capsys) -> None:
    data = _probe(mergevq_cli, colour_folders, tmp_path / "pixels.json", "--pixels")
    assert data["kind"] == "probe_eval" and data["features"] == "pixels" and data["feature_kinds"] == ["pixels"]
    assert data["model"] is None and data["num_tokens"] is None and data["input"]["image_size"] == 32
    assert data["classes"] == ["blue", "red"] and data["train"]["num_images"] == 20 and data["knn_k"] == 20
    assert shlex.split(data["command"])[:4] == ["mergevq", "evaluate", "probe", "--pixels"]
    assert "--image-size 32" in data["command"]  # the default is spelled out, so the command reproduces the run
    [row] = data["results"]
    assert row["num_tokens"] is None and row["pixels"]["dim"] == 3 * 32 * 32
    # The classes differ in colour only: a linear probe and a k-NN on raw pixels must separate them.
    assert row["pixels"]["linear_top1"] == 1.0 and row["pixels"]["knn_top1"] == 1.0
    assert "| - | raw pixels | 100.00 |" in capsys.readouterr().out

    small = _probe(mergevq_cli, colour_folders, tmp_path / "small.json", "--pixels", "--image-size", "8")
    assert small["results"][0]["pixels"]["dim"] == 3 * 8 * 8 and small["input"]["image_size"] == 8

    # The results page renders the baseline as its own probe section.
    page = render_results_page(
        results=load_results([tmp_path / "pixels.json"]),
        output=tmp_path / "RESULTS.md",
        figures_dir=tmp_path / "figures",
        base=tmp_path,
    )
    assert "### Linear probe and k-NN: raw pixels (baseline)" in page and "untrained" not in page


def test_probe_pixels_has_the_model_schema(mergevq_cli, colour_folders: Path, tmp_path: Path) -> None:
    pixels = _probe(mergevq_cli, colour_folders, tmp_path / "pixels.json", "--pixels")
    model = _probe(mergevq_cli, colour_folders, tmp_path / "model.json", "--preset", "tiny-32", "--num-tokens", "16")
    assert model["features"] == "encoder" and model["feature_kinds"] == ["cls", "mean_tokens"]
    assert model["input"]["image_size"] == 32
    assert set(pixels) == set(model)
    assert set(pixels["input"]) == set(model["input"]) and set(pixels["train"]) == set(model["train"])
    [pixel_row] = pixels["results"]
    [model_row] = model["results"]
    assert set(pixel_row) == {"num_tokens", *pixels["feature_kinds"]}
    assert set(model_row) == {"num_tokens", *model["feature_kinds"]}
    entry_keys = set(pixel_row["pixels"])
    assert all(set(model_row[kind]) == entry_keys for kind in model["feature_kinds"])
    assert pixels["linear_probe"] == model["linear_probe"]  # the same protocol


def test_probe_pixels_excludes_model_and_tokens(mergevq_cli, colour_folders: Path, tmp_path: Path, capsys) -> None:
    parser = mergevq.cli.build_parser()
    common = ["--train", "a", "--test", "b", "--output", "o.json"]
    for source in (["--pixels", "--preset", "tiny-32"], ["--pixels", "--model", "m"]):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(["evaluate", "probe", *source, *common])
        assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "probe", *common])
    assert "one of the arguments --model --preset --pixels is required" in capsys.readouterr().err

    folders = ["--train", colour_folders / "train", "--test", colour_folders / "test"]
    out = tmp_path / "p.json"
    rc = mergevq_cli("evaluate", "probe", "--pixels", "--num-tokens", "16", *folders, "--output", out)
    assert rc == 2 and "--num-tokens does not apply to --pixels" in capsys.readouterr().err
    rc = mergevq_cli("evaluate", "probe", "--preset", "tiny-32", "--image-size", "64", *folders, "--output", out)
    assert rc == 2 and "--image-size applies to --pixels only" in capsys.readouterr().err
    assert not out.exists()


def test_probe_help_documents_the_pixel_baseline(capsys) -> None:
    parser = mergevq.cli.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "probe", "--help"])
    text = capsys.readouterr().out
    assert "(--model DIR | --preset NAME | --pixels)" in text and "mergevq evaluate probe --pixels" in text
    assert "--image-size S" in text and "default: 32" in text
    evaluate_parser = parser._subparsers._group_actions[0].choices["evaluate"]  # type: ignore[union-attr]
    probe = evaluate_parser._subparsers._group_actions[0].choices["probe"]  # type: ignore[union-attr]
    for action in probe._actions:
        assert action.help, f"{action.option_strings} has no help"


# ----------------------------------------------------------------------------------------------------------------------
# benchmark
# ----------------------------------------------------------------------------------------------------------------------


def test_benchmark_writes_positive_throughputs(mergevq_cli, tmp_path: Path, capsys) -> None:
    out = tmp_path / "speed.json"
    rc = mergevq_cli(
        "benchmark", "--preset", "tiny-32", "--batch-size", "2", "--num-tokens", "16", "64", "--repeats", "2",
        "--warmup", "1", "--threads", "1", "--output", out,
    )  # fmt: skip
    assert rc == 0
    assert "| K | encode img/s" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["kind"] == "benchmark" and data["command"].startswith("mergevq benchmark --preset tiny-32")
    assert data["settings"]["batch_size"] == 2 and data["settings"]["repeats"] == 2
    assert {"python", "torch", "cpu", "torch_threads", "malloc_env"} <= set(data["machine"])
    assert any("generation speed" in note for note in data["notes"])
    assert [row["num_tokens"] for row in data["rows"]] == [16, 64]
    for row in data["rows"]:
        assert set(row["phases"]) == {"encode", "decode", "encode_decode", "train_step"}
        for timing in row["phases"].values():
            assert len(timing["times_ms"]) == 2 and timing["warmup"] == 1
            assert 0 < timing["min_ms"] <= timing["median_ms"] <= timing["max_ms"]
            rate = timing["items_per_s"]
            assert 0 < rate["min"] <= rate["median"] <= rate["max"]
            assert rate["median"] == pytest.approx(2 / (timing["median_ms"] / 1e3))


def test_benchmark_help_says_generation_is_not_measured(capsys) -> None:
    with pytest.raises(SystemExit):
        mergevq.cli.build_parser().parse_args(["benchmark", "--help"])
    assert "stage-2 generators" in capsys.readouterr().out
    model = MergeVQ.from_preset("tiny-32")
    assert benchmark.default_num_tokens(model=model) == [8, 16, 36, 64]


def test_modules_plug_into_the_main_cli(monkeypatch, capsys) -> None:
    missing = tuple(m for m in COMMAND_MODULES if m not in mergevq.cli._COMMAND_MODULES)
    monkeypatch.setattr(mergevq.cli, "_COMMAND_MODULES", mergevq.cli._COMMAND_MODULES + missing)
    assert mergevq.cli.main(["evaluate"]) == 2
    assert "tokenizer" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        mergevq.cli.main(["evaluate", "generator", "--help"])
    assert "--save-reference-stats" in capsys.readouterr().out
