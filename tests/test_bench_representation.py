"""``benchmarks/bench_representation.py``: the table built from stored probe JSON files (nothing is trained)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"max_train": 100, "max_test": 50, "epochs": 3}


@pytest.fixture
def bench(monkeypatch, tmp_path: Path):
    """The script as a module, writing its results under tmp_path and refusing to start a probe subprocess."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # sys.path is restored afterwards
    script = ROOT / "benchmarks" / "bench_representation.py"
    spec = importlib.util.spec_from_file_location("bench_representation", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_representation", module)  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys.modules["common"], "RESULTS_DIR", tmp_path / "results")

    def refuse(*args, **kwargs):
        raise AssertionError(f"a probe ran instead of reusing its stored JSON: {args}")

    monkeypatch.setattr(module, "subprocess", SimpleNamespace(run=refuse))
    return module


def _export(root: Path, name: str, *, alignment: str) -> Path:
    """A fake run folder: ``<name>/config.yaml`` (the recipe) and ``<name>/export/config.json``."""
    export = root / name / "export"
    export.mkdir(parents=True)
    (export / "config.json").write_text(json.dumps({"name": "tiny-32", "image_size": 32}))
    (root / name / "config.yaml").write_text(f"alignment:\n  kind: {alignment}\nloss:\n  alignment_weight: 1.0\n")
    return export


def _fake_probe(path: Path, *, data: Path, model_dir: Path | None, accuracy: dict, max_train: int = 100) -> None:
    """A probe JSON with the real schema; ``accuracy`` maps K (None: pixels) → kind → (linear, k-NN) top-1."""
    source = ["--pixels", "--image-size", "32"] if model_dir is None else ["--model", str(model_dir)]
    command = ["mergevq", "evaluate", "probe", *source, "--train", str(data / "train"), "--test", str(data / "test")]
    command += ["--max-train", str(max_train), "--max-test", "50", "--output", str(path), "--epochs", "3"]
    kinds = sorted({kind for per_kind in accuracy.values() for kind in per_kind})
    entry = {"dim": 128, "linear_top5": None, "linear_train_top1": 1.0, "linear_final_loss": 0.1}
    path.write_text(
        json.dumps(
            {
                "kind": "probe_eval",
                "features": "pixels" if model_dir is None else "encoder",
                "feature_kinds": kinds,
                "command": shlex.join(command),
                "model": None if model_dir is None else {"source": str(model_dir), "config": {"image_size": 32}},
                "input": {"image_size": 32},
                "train": {"root": str(data / "train"), "num_images": max_train},
                "test": {"root": str(data / "test"), "num_images": 50},
                "num_tokens": None if model_dir is None else list(accuracy),
                "linear_probe": {"epochs": 3, "lr": 1e-3, "batch_size": 1024},
                "results": [
                    {"num_tokens": k}
                    | {kind: entry | {"linear_top1": lin, "knn_top1": knn} for kind, (lin, knn) in per_kind.items()}
                    for k, per_kind in accuracy.items()
                ],
            }
        )
    )


def _both_k(cls: tuple[float, float], mean: tuple[float, float], *, shift: float = 0.0) -> dict:
    return {k: {"cls": (cls[0] + shift, cls[1]), "mean_tokens": mean} for k in (16, 64)}


@pytest.fixture
def setup(tmp_path: Path) -> SimpleNamespace:
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "test").mkdir()
    runs = tmp_path / "runs"
    merged = [_export(runs, f"merged-s{i}", alignment="ema") for i in range(2)]
    noalign = _export(runs, "noalign-s0", alignment="none")
    work = tmp_path / "work"
    work.mkdir()
    argv = [
        "--models", f"merged={merged[0]},{merged[1]}", f"noalign={noalign}", "--num-tokens", "16", "64",
        "--max-train", "100", "--max-test", "50", "--epochs", "3", "--data", str(data), "--work-dir", str(work),
        "--name", "repr",
    ]  # fmt: skip
    return SimpleNamespace(
        data=data, merged=merged, noalign=noalign, work=work, argv=argv, results=tmp_path / "results"
    )


def _write_probes(setup: SimpleNamespace, *, merged_cls: tuple[float, float], noalign_cls: float) -> None:
    for i, (directory, linear) in enumerate(zip(setup.merged, merged_cls, strict=True)):
        accuracy = _both_k((linear, 0.40 + 0.02 * i), (0.33, 0.30))
        _fake_probe(setup.work / f"merged-{i}.json", data=setup.data, model_dir=directory, accuracy=accuracy)
    accuracy = _both_k((noalign_cls, 0.31), (0.32, 0.29))
    _fake_probe(setup.work / "noalign-0.json", data=setup.data, model_dir=setup.noalign, accuracy=accuracy)
    pixels = {None: {"pixels": (0.30, 0.25)}}
    _fake_probe(setup.work / "pixels.json", data=setup.data, model_dir=None, accuracy=pixels)


def test_table_averages_seeds_and_gains_over_pixels(bench, setup: SimpleNamespace, capsys) -> None:
    _write_probes(setup, merged_cls=(0.44, 0.46), noalign_cls=0.36)
    assert bench.main(setup.argv) == 0
    out = capsys.readouterr().out
    assert "[1/4] merged seed 0" in out and "reusing" in out and "[4/4] raw pixels" in out

    result = json.loads((setup.results / "repr.json").read_text())
    rows = result["rows"]
    assert len(rows) == 1 + 2 * 2 * 2  # pixels, then 2 models × 2 K × (CLS, mean of merged)
    pixels = rows[0]
    assert (pixels["features"], pixels["K"], pixels["feature kind"]) == ("pixels", "-", "pixels")
    assert pixels["linear top-1 (%)"] == pytest.approx(30.0) and pixels["linear std (pts)"] is None
    by_key = {(r["features"], r["K"], r["feature kind"]): r for r in rows}
    merged_cls = by_key["merged", 16, "CLS"]
    assert merged_cls["seeds"] == 2
    assert merged_cls["linear top-1 (%)"] == pytest.approx(45.0)
    assert merged_cls["linear std (pts)"] == pytest.approx(np.std([44.0, 46.0], ddof=1))
    assert merged_cls["k-NN top-1 (%)"] == pytest.approx(41.0)
    assert merged_cls["linear gain vs pixels (pts)"] == pytest.approx(15.0)
    assert merged_cls["k-NN gain vs pixels (pts)"] == pytest.approx(16.0)
    noalign_mean = by_key["noalign", 64, "mean of merged"]
    assert noalign_mean["seeds"] == 1 and noalign_mean["linear std (pts)"] is None
    assert noalign_mean["linear gain vs pixels (pts)"] == pytest.approx(2.0)

    extra = result["extra"]
    assert extra["target_met"] is True and extra["alignment"] == {"merged": "ema", "noalign": "none"}
    assert "the target is met" in extra["verdict"] and "+15.0 points over raw pixels" in extra["verdict"]
    assert extra["reproduce"].startswith("python benchmarks/bench_representation.py --models merged=")
    markdown = (setup.results / "repr.md").read_text()
    assert ">= 10 points of linear top-1 over raw pixels" in markdown and "Verdict: the target is met" in markdown
    assert f"Reproduce: `{extra['reproduce']}`" in markdown
    assert "| pixels | - | pixels | 1 | 30 |" in markdown


@pytest.mark.parametrize(
    ("merged_cls", "noalign_cls", "reason"),
    [
        ((0.38, 0.39), 0.30, "misses the >= 10-point target"),  # +8.5 over pixels
        ((0.44, 0.46), 0.445, "no visible gain"),  # +15 over pixels, but within the seed spread of `none`
    ],
)
def test_verdict_says_when_the_target_is_not_met(
    bench, setup: SimpleNamespace, merged_cls: tuple[float, float], noalign_cls: float, reason: str
) -> None:
    _write_probes(setup, merged_cls=merged_cls, noalign_cls=noalign_cls)
    assert bench.main(setup.argv) == 0
    extra = json.loads((setup.results / "repr.json").read_text())["extra"]
    assert extra["target_met"] is False
    assert reason in extra["verdict"] and "the target is NOT met" in extra["verdict"]
    assert "Verdict: the target is NOT met" in (setup.results / "repr.md").read_text()


def test_verdict_without_an_aligned_model_or_a_baseline(bench) -> None:
    def row(name: str, linear: float) -> dict:
        return {"features": name, "K": 16, "feature kind": "CLS", "linear top-1 (%)": linear,
                "linear std (pts)": None, "linear gain vs pixels (pts)": linear - 30.0}  # fmt: skip

    rows = [row("pixels", 30.0), row("a", 50.0)]
    met, text = bench.verdict(rows=rows, alignment={"a": "none"})
    assert met is None and "cannot be judged: no model trained with alignment" in text
    met, text = bench.verdict(rows=rows, alignment={"a": "dinov2"})
    assert met is None and "no `alignment: none` model" in text and "the pixel half is met" in text
    met, text = bench.verdict(rows=rows, alignment={"a": None})
    assert met is None and "Alignment unknown" in text


def test_stale_probe_is_run_again(bench, setup: SimpleNamespace, monkeypatch) -> None:
    _write_probes(setup, merged_cls=(0.44, 0.46), noalign_cls=0.36)
    stale = setup.work / "noalign-0.json"
    fresh = stale.read_text()
    _fake_probe(stale, data=setup.data, model_dir=setup.noalign, accuracy=_both_k((0.9, 0.9), (0.9, 0.9)), max_train=7)
    commands = []

    def run(command, **kwargs):
        commands.append(command)
        stale.write_text(fresh)  # what the probe would write
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(bench, "subprocess", SimpleNamespace(run=run))
    assert bench.main(setup.argv) == 0
    [command] = commands
    assert command[1:5] == ["-m", "mergevq", "evaluate", "probe"] and "--model" in command
    assert command[command.index("--max-train") + 1] == "100"
    rows = json.loads((setup.results / "repr.json").read_text())["rows"]
    assert all(r["linear top-1 (%)"] < 90 for r in rows if r["features"] == "noalign")


def test_pixel_command_writes_a_reusable_file(bench, mergevq_cli, tmp_path: Path, monkeypatch) -> None:
    # The command the script starts is a valid `evaluate probe` call, and its output passes the reuse check.
    data = tmp_path / "images"
    for split in ("train", "test"):
        for name, value in (("dark", 40), ("light", 220)):
            (data / split / name).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (value + i, value, value)).save(data / split / name / f"{i}.png")
    settings = bench.Settings(
        train=data / "train", test=data / "test", num_tokens=(16,), max_train=6, max_test=6, epochs=2
    )
    output = tmp_path / "pixels.json"
    command = bench.probe_command(output=output, settings=settings, model_dir=None, image_size=8, device="cpu")
    assert command[:3] == [sys.executable, "-m", "mergevq"]
    monkeypatch.chdir(ROOT)  # the script runs its probes from the repository root
    assert mergevq_cli(*command[3:]) == 0
    stored = json.loads(output.read_text())
    assert bench.matches(data=stored, settings=settings, model_dir=None, image_size=8)
    assert not bench.matches(data=stored, settings=settings, model_dir=None, image_size=32)
    other = dataclasses.replace(settings, max_test=5)
    assert not bench.matches(data=stored, settings=other, model_dir=None, image_size=8)


def test_models_argument_is_checked(bench, setup: SimpleNamespace, capsys) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--models", "merged"])
    assert "expected NAME=DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--models", f"pixels={setup.noalign}"])
    assert "raw-pixel row" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not a tokenizer export"):
        bench.main(["--models", f"x={setup.data}", "--data", str(setup.data)])
