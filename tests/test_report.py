"""Result JSON → docs page: tables, matplotlib plots, and ``scripts/make_results.py`` on files written by the
commands."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mergevq.commands import evaluate_generator, evaluate_tokenizer
from mergevq.eval.fid import InceptionFeatures
from mergevq.eval.report import (
    format_value,
    line_plot,
    load_results,
    markdown_table,
    render_results_page,
    save_result,
)

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("make_results", ROOT / "scripts" / "make_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _PooledFeatures(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


@pytest.fixture(scope="module")
def results_dir(cifar10_root: Path, tmp_path_factory, mergevq_cli) -> Path:
    """One result file of every kind, written by the real commands on a few CIFAR-10 images (cheap settings)."""
    out = tmp_path_factory.mktemp("results")
    few = tmp_path_factory.mktemp("few")  # small class folders: listing all 60k CIFAR files would dominate the run
    for split, count in (("test", 3), ("train", 6)):
        for name in ("cat", "dog", "ship", "truck"):
            (few / split / name).mkdir(parents=True)
            for source in sorted((cifar10_root / split / name).iterdir())[:count]:
                shutil.copy(source, few / split / name / source.name)
    test, train = few / "test", few / "train"
    runs = [
        ("evaluate", "tokenizer", "--preset", "tiny-32", "--data", test, "--num-tokens", "8", "16", "64",
         "--no-lpips", "--output", out / "tokenizer.json"),
        ("evaluate", "probe", "--preset", "tiny-32", "--train", train, "--test", test, "--num-tokens", "16", "64",
         "--epochs", "2", "--output", out / "probe.json"),
        ("evaluate", "generator", "--samples", test, "--reference", train,
         "--output", out / "fid.json"),
        ("benchmark", "--preset", "tiny-32", "--batch-size", "2", "--num-tokens", "8", "64", "--repeats", "1",
         "--warmup", "0", "--output", out / "speed.json"),
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        # A stand-in for the FID Inception: the report only needs a well-formed generator result.
        for module in (evaluate_tokenizer, evaluate_generator):
            patch.setattr(
                module,
                "_inception",
                lambda *, weights, device, batch_size: InceptionFeatures(network=_PooledFeatures(), device=device),
            )
        for argv in runs:
            assert mergevq_cli(*argv) == 0
    shutil.copy(ROOT / "benchmarks" / "results" / "merge.json", out / "merge.json")
    return out


def _build(results_dir: Path, site: Path, *extra: str) -> tuple[int, str]:
    script = _load_script()
    rc = script.main(["--inputs", str(results_dir / "*.json"), "--output", str(site / "RESULTS.md"), *extra])
    page = (site / "RESULTS.md").read_text() if rc == 0 else ""
    return rc, page


def test_page_has_tables_figures_and_commands(results_dir: Path, tmp_path: Path) -> None:
    rc, page = _build(results_dir, tmp_path / "docs")
    assert rc == 0
    assert page.startswith("# MergeVQ results\n")
    assert "untrained (random initialisation)" in page
    for header in (
        "| K | merged | PSNR (dB) | SSIM | LPIPS | rFID |",
        "| K | features | linear top-1 (%)",
        "| FID | precision | recall | IS |",
        "| K | encode img/s (ms/batch)",
        "encode+decode speed vs K=64",
        "Token merging",  # the benchmarks/ script's title
    ):
        assert header in page, header
    assert "| 8 | 8 |" in page and "| 64 | 64 |" in page  # one tokenizer row per K

    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page)
    assert {Path(f).name for f in figures} == {
        "tokenizer_psnr.png",
        "tokenizer_rfid.png",
        "probe_probe.png",
        "speed_speed.png",
    }
    for figure in figures:
        path = tmp_path / "docs" / figure
        with Image.open(path) as image:
            image.load()
            assert image.format == "PNG" and image.size == (800, 440) and image.mode == "RGB"
            assert len(image.getcolors(maxcolors=1 << 16) or []) > 3  # more than a blank canvas
    # Every figure cites the command that produced its data, and the page lists them all for reproduction.
    for block in page.split("![")[1:]:
        caption = block.split("\n\n", 2)[1]
        assert caption.startswith("_Figure:") and "from `mergevq " in caption
    reproduce = page.split("## Reproduce", 1)[1]
    for name in ("tokenizer", "probe", "fid", "speed"):
        command = json.loads((results_dir / f"{name}.json").read_text())["command"]
        assert command in reproduce
    assert "python benchmarks/bench_merge.py" in reproduce
    assert "python scripts/make_results.py --inputs" in reproduce


def test_page_is_a_pure_function_of_the_results(results_dir: Path, tmp_path: Path) -> None:
    rc, first = _build(results_dir, tmp_path / "docs")
    figure = (tmp_path / "docs" / "figures" / "tokenizer_psnr.png").read_bytes()
    rc2, second = _build(results_dir, tmp_path / "docs")
    assert rc == rc2 == 0 and first == second
    assert (tmp_path / "docs" / "figures" / "tokenizer_psnr.png").read_bytes() == figure


def test_unavailable_metrics_are_explained(results_dir: Path, tmp_path: Path) -> None:
    _, page = _build(results_dir, tmp_path / "docs", "--note", "pipeline check only")
    assert "> pipeline check only" in page
    assert "`inception_score` not reported: unavailable" in page
    assert "biased upward" in page


def test_unknown_and_broken_inputs(tmp_path: Path, capsys) -> None:
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    page = render_results_page(
        results=load_results([tmp_path / "other.json"]),
        output=tmp_path / "RESULTS.md",
        figures_dir=tmp_path / "figures",
        base=tmp_path,
    )
    assert "_Skipped `other.json`: not a known result file._" in page
    (tmp_path / "broken.json").write_text("{not json")
    script = _load_script()
    assert script.main(["--inputs", str(tmp_path / "broken.json"), "--output", str(tmp_path / "R.md")]) == 2
    assert "not a JSON file" in capsys.readouterr().err
    assert script.main(["--inputs", str(tmp_path / "missing.json"), "--output", str(tmp_path / "R.md")]) == 2


def test_save_result_writes_plain_json(tmp_path: Path) -> None:
    path = save_result(
        tmp_path / "a" / "r.json",
        {"inf": math.inf, "nan": math.nan, "pair": (1, Path("x")), "np": np.float32(1.5), "nested": {3: -math.inf}},
    )
    assert json.loads(path.read_text()) == {
        "inf": None,
        "nan": None,
        "pair": [1, "x"],
        "np": 1.5,
        "nested": {"3": None},
    }


def test_format_and_markdown_table() -> None:
    assert format_value(None) == "n/a" and format_value(0.123456) == "0.1235" and format_value(123456.7) == "123,457"
    assert format_value(True) == "true" and format_value([1, 2.5]) == "1 2.5"
    table = markdown_table(header=["a", "b"], rows=[["x|y", 1.0], [None, 2]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 1 |", "| n/a | 2 |"]


def test_line_plot_gaps_and_log_axes(tmp_path: Path) -> None:
    path = line_plot(
        tmp_path / "p.png",
        title="t",
        x_label="K",
        y_label="img/s",
        series={"a": [(8, 1.0), (16, None), (32, 100.0), (64, 1000.0)], "b": [(8, 5.0), (64, math.nan)]},
        log_x=True,
        log_y=True,
        size=(400, 300),
    )
    with Image.open(path) as image:
        assert image.size == (400, 300)
        pixels = np.asarray(image.convert("RGB"))
    blue = np.all(pixels == (31, 119, 180), axis=-1).sum()
    red = np.all(pixels == (214, 39, 40), axis=-1).sum()
    assert blue > 50 and red > 10  # both series drawn (b as a lone marker)
    with pytest.raises(ValueError, match="nothing to plot"):
        line_plot(tmp_path / "q.png", title="t", x_label="x", y_label="y", series={"a": []})


def test_line_plot_curves_auto_ticks_and_lone_points(tmp_path: Path) -> None:
    # A training curve: many points, no markers; a second series with one point between gaps still shows it.
    curve = [(step, 1.0 / (1 + step)) for step in range(0, 400, 4)]
    lone = [(0, None), (200, 0.5), (300, None)]
    plot = dict(
        title="curve", x_label="optimizer step", y_label="loss", series={"loss": curve, "val": lone}, x_ticks="auto",
        markers=False,
    )  # fmt: skip
    path = line_plot(tmp_path / "c.png", **plot)
    with Image.open(path) as image:
        assert image.size == (800, 440) and image.mode == "RGB"
        pixels = np.asarray(image)
    blue = np.all(pixels == (31, 119, 180), axis=-1)
    red = np.all(pixels == (214, 39, 40), axis=-1)
    assert blue.sum() > 200 and red.sum() > 10
    # The curve falls from left to right: its top-most blue pixels lie in the left part of the axes.
    rows, cols = np.nonzero(blue[:, :650])
    assert cols[rows == rows.min()].mean() < 250
    same = line_plot(tmp_path / "d.png", **plot)
    assert same.read_bytes() == path.read_bytes()  # no date or version in the file: same data, same bytes
