"""``benchmarks/bench_quality.py``: the per-run configs of the four-way comparison, the aggregation over seeds, the
verdict text, run reuse, the job queue, and one end-to-end smoke run on a few CIFAR-10 images."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_quality as bq  # noqa: E402
import common  # noqa: E402

BASE = yaml.safe_load(bq.BASE_CONFIG.read_text())


def _config(run: str, *, seed: int = 0, tmp_path: Path, **kwargs) -> dict:
    kwargs = {"steps": 1500, "batch_size": 32, "overrides": {}, **kwargs}
    return bq.build_config(run=run, seed=seed, base=BASE, data=tmp_path / "cifar", work_dir=tmp_path / "w", **kwargs)


def _k_distribution(cfg: dict, path: Path) -> dict[int, float]:
    path.write_text(yaml.safe_dump(cfg))
    return bq.training_k_distribution(path)


# ----------------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------------


def test_every_run_gets_the_same_budget_its_own_seed_and_output_dir(tmp_path):
    overrides = {"loss.perceptual_weight": 0.7}
    configs = {
        (run, seed): _config(run, seed=seed, tmp_path=tmp_path, overrides=overrides)
        for run in bq.RUNS
        for seed in (0, 1)
    }
    for (run, seed), cfg in configs.items():
        assert cfg["seed"] == seed
        assert (cfg["max_steps"], cfg["batch_size"], cfg["grad_accum"]) == (1500, 32, 1)
        assert cfg["threads"] == 1 and cfg["checkpoint_every"] == 250
        assert cfg["output_dir"] == str(tmp_path / "w" / f"{run}-s{seed}")
        assert cfg["data"]["train"] == str(tmp_path / "cifar" / "train")
        assert cfg["loss"]["perceptual_weight"] == 0.7  # --overrides reach every run
        assert cfg["loss"]["alignment_weight"] == BASE["loss"]["alignment_weight"]  # the rest of the base is kept
    assert len({cfg["output_dir"] for cfg in configs.values()}) == len(configs)


def test_run_configs_differ_only_where_the_comparison_says(tmp_path):
    merged = _config("merged", tmp_path=tmp_path)
    assert merged["merge"] == BASE["merge"] and merged["model"] == BASE["model"]

    grid = _config("grid", tmp_path=tmp_path)
    assert grid["model"]["overrides"]["merge_policy"] == "grid"
    assert _k_distribution(grid, tmp_path / "grid.yaml") == {16: 0.5, 64: 0.5}  # only K that tile the 8×8 grid
    assert set(bq.RUNS["grid"].eval_k) == {16, 64}

    coarse = _config("coarse", tmp_path=tmp_path)
    assert coarse["model"]["overrides"]["channel_mult"] == [1, 2, 4, 4]
    assert coarse["model"]["overrides"]["learned_recovery"] is False
    assert _k_distribution(coarse, tmp_path / "coarse.yaml") == {16: 1.0}
    assert bq.RUNS["coarse"].eval_k == (16,) and bq.RUNS["coarse"].grid_tokens == 16

    full = _config("full", tmp_path=tmp_path)
    assert _k_distribution(full, tmp_path / "full.yaml") == {64: 1.0}
    assert bq.RUNS["full"].eval_k == (64,)

    merged_k = _k_distribution(merged, tmp_path / "merged.yaml")
    assert sorted(merged_k) == [16, 25, 36, 49, 64]
    assert set(bq.RUNS["merged"].eval_k) == {16, 36, 64}

    assert _config("merged-resplit", tmp_path=tmp_path)["model"]["overrides"] == {"merge_split": "resplit"}
    assert _config("merged-window", tmp_path=tmp_path)["model"]["overrides"] == {"merge_split": "window"}
    assert _config("merged-noalign", tmp_path=tmp_path)["alignment"]["kind"] == "none"
    for run in ("merged-resplit", "merged-window", "merged-noalign"):  # valid for the trainer's loader too
        assert _k_distribution(_config(run, tmp_path=tmp_path), tmp_path / f"{run}.yaml") == merged_k
    assert set(bq.DEFAULT_RUNS) == {"merged", "grid", "coarse", "full"}


def test_cli_defaults_and_checks():
    args = bq.parse_args([])
    assert (args.steps, args.batch_size, args.seeds, args.jobs, args.eval_images) == (1500, 32, [0, 1], 2, 1000)
    assert args.runs == list(bq.DEFAULT_RUNS) and args.name == "quality"
    assert args.base_config == bq.BASE_CONFIG
    args = bq.parse_args(["--overrides", "loss.perceptual_weight=0.7", "optim.betas=[0.5,0.9]"])
    assert args.override_values == {"loss.perceptual_weight": 0.7, "optim.betas": [0.5, 0.9]}
    assert "--overrides loss.perceptual_weight=0.7" in bq.reproduce_command(args)
    for bad in (["--seeds", "0"], ["--seeds", "3", "3"], ["--overrides", "nokey"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            bq.parse_args(bad)


def test_finished_runs_are_reused_only_with_the_same_recipe(tmp_path):
    cfg = _config("merged", tmp_path=tmp_path)
    out = Path(cfg["output_dir"])
    assert not bq.is_done(out=out, cfg=cfg)
    (out / "export").mkdir(parents=True)
    (out / bq.DONE_MARKER).write_text(json.dumps({"recipe": bq._recipe_key(cfg)}))
    assert bq.is_done(out=out, cfg=cfg)
    moved = _config("merged", tmp_path=tmp_path / "elsewhere")  # data somewhere else: same run
    assert bq.is_done(out=out, cfg={**moved, "output_dir": cfg["output_dir"]})
    assert not bq.is_done(out=out, cfg=_config("merged", tmp_path=tmp_path, steps=3000))
    assert not bq.is_done(out=out, cfg=_config("merged", tmp_path=tmp_path, overrides={"loss.entropy_weight": 0.2}))
    (out / "checkpoints" / "step_00000250").mkdir(parents=True)
    (out / "checkpoints" / "step_00001500").mkdir()
    (out / "checkpoints" / ".tmp-step_00001750-1").mkdir()
    assert bq.newest_checkpoint(out) == 1500

    result = bq.eval_path(out=out, ks=(16, 64), images=1000)
    assert result.name == "eval-n1000-k16-64.json"
    result.write_text("{}")
    assert bq.eval_is_fresh(result, out=out)
    (out / bq.DONE_MARKER).unlink()
    assert not bq.eval_is_fresh(result, out=out)


def test_job_queue_runs_all_and_stops_starting_after_a_failure(tmp_path, capsys):
    done = []
    ok = [
        bq.Job(
            label=f"ok{i}", command=[sys.executable, "-c", "pass"], log=tmp_path / f"ok{i}.log", on_success=done.append
        )
        for i in range(3)
    ]
    assert bq.run_jobs(ok, parallel=2, env={}, start=0.0, poll_s=0.02) == []
    assert len(done) == 3
    bad = bq.Job(label="bad", command=[sys.executable, "-c", "print('boom'); raise SystemExit(3)"], log=tmp_path / "b")
    later = bq.Job(label="later", command=[sys.executable, "-c", "pass"], log=tmp_path / "later.log")
    assert bq.run_jobs([bad, later], parallel=1, env={}, start=0.0, poll_s=0.02) == ["bad"]
    assert not (tmp_path / "later.log").exists()
    out = capsys.readouterr().out
    assert "FAILED bad (exit 3)" in out and "boom" in out


def test_an_interrupted_queue_stops_its_running_jobs(tmp_path):
    def interrupt(_wall: float) -> None:
        raise KeyboardInterrupt

    quick = bq.Job(label="quick", command=[sys.executable, "-c", "pass"], log=tmp_path / "q.log", on_success=interrupt)
    slow = bq.Job(label="slow", command=[sys.executable, "-c", "import time; time.sleep(120)"], log=tmp_path / "s")
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        bq.run_jobs([quick, slow], parallel=2, env={}, start=0.0, poll_s=0.02)
    assert time.monotonic() - t0 < 60  # the sleeping job got SIGTERM instead of being waited for


# ----------------------------------------------------------------------------------------------------------------------
# Aggregation and verdict
# ----------------------------------------------------------------------------------------------------------------------


def _result(model, seed, k, psnr, *, lpips=0.3, steps=1500, batch=32, grid=64):
    return {
        "model": model, "seed": seed, "K": k, "psnr": psnr, "ssim": 0.5 + seed / 10, "lpips": lpips,
        "usage": 0.1, "steps": steps, "batch_size": batch, "grid_tokens": grid,
    }  # fmt: skip


def test_aggregate_means_and_spread_per_model_and_k():
    results = [
        _result("merged", 1, 64, 16.0),
        _result("merged", 0, 16, 14.0),
        _result("merged", 1, 16, 15.0),
        _result("merged", 0, 64, 17.0),
        _result("coarse", 0, 16, 13.0, grid=16),
        _result("coarse", 1, 16, 13.5, grid=16),
        _result("coarse", 2, 16, 14.5, grid=16, lpips=None),
    ]
    rows = bq.aggregate(results)
    assert [(r["model"], r["K"]) for r in rows] == [("merged", 16), ("merged", 64), ("coarse", 16)]
    m16 = rows[0]
    assert m16["PSNR"] == pytest.approx(14.5)
    assert (m16["PSNR min"], m16["PSNR max"]) == (14.0, 15.0)
    assert m16["PSNR sd"] == pytest.approx(0.5**0.5)
    assert m16["SSIM"] == pytest.approx(0.55)
    assert (m16["seeds"], m16["steps"], m16["batch"], m16["train images"]) == (2, 1500, 32, 48000)
    coarse = rows[2]
    assert coarse["grid tokens L"] == 16 and coarse["seeds"] == 3
    assert coarse["PSNR"] == pytest.approx(13.666666, abs=1e-5)
    assert coarse["LPIPS"] == pytest.approx(0.3)  # a missing LPIPS is left out of the mean
    with pytest.raises(ValueError, match="different budgets"):
        bq.aggregate([_result("grid", 0, 16, 14.0), _result("grid", 1, 16, 14.0, steps=1000)])


def _rows(merged, grid, coarse):
    results = []
    for model, values, lp in (("merged", merged, 0.30), ("grid", grid, 0.32), ("coarse", coarse, 0.35)):
        results += [_result(model, seed, 16, v, lpips=lp) for seed, v in enumerate(values)]
    return bq.aggregate(results)


def test_verdict_when_merging_wins_beyond_the_seed_spread():
    text = bq.verdict(_rows([15.0, 15.2], [14.0, 14.3], [13.0, 13.1]))
    assert text.startswith("**Verdict at K = 16:** the merged tokens keep more than grid and coarse")
    assert "the paper's claim holds at this scale and budget; every gap is beyond the seed spread." in text
    assert "merged 15.10 dB (seeds 15.00–15.20), grid 14.15 dB" in text  # ranked by PSNR
    assert "- merged − grid = +0.95 dB, beyond the seed spread" in text
    assert "- merged − coarse = +2.05 dB, beyond the seed spread" in text
    assert "0.300 vs 0.320 agrees" in text and "not hold" not in text


def test_verdict_when_merging_loses_or_the_gap_is_within_the_spread():
    text = bq.verdict(_rows([13.0, 13.4], [14.0, 14.3], [13.3, 15.1]))
    assert "keep less than grid and coarse with the same 16 tokens: the paper's claim does not hold" in text
    assert "only the gap to grid is beyond the seed spread" in text
    assert "merged − grid = -0.95 dB, beyond the seed spread" in text
    assert "merged − coarse = -1.00 dB, within the seed spread (the seed ranges overlap)" in text
    assert "disagrees" in text  # merged's lower LPIPS points the other way than its PSNR

    text = bq.verdict(_rows([14.0, 14.6], [14.1, 14.3], [13.0, 13.1]))
    assert "claim holds at this scale" in text and "only the gap to coarse is beyond the seed spread" in text
    assert "merged − grid = +0.10 dB, within the seed spread" in text

    text = bq.verdict(_rows([14.0, 14.2], [14.1, 14.6], [13.9, 14.1]))
    assert "more than coarse but less than grid" in text and "holds only in part" in text
    assert "no gap is beyond the seed spread, so these seeds do not separate the models" in text
    assert "one seed only" in bq.verdict(_rows([14.0], [13.0], [12.0]))
    assert bq.verdict(_rows([14.0, 14.2], [], [])).startswith("No verdict at K = 16")


def test_figure_has_one_series_per_model(tmp_path):
    rows = _rows([15.0, 15.2], [14.0, 14.3], [13.0, 13.1])
    path = bq.plot_psnr_vs_k(rows, path=tmp_path / "fig.png", title="t")
    assert path.stat().st_size > 1000


# ----------------------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_run_trains_evaluates_and_reuses(cifar10_root, tmp_path, monkeypatch, capsys):
    data = tmp_path / "cifar"  # a few images per class: listing all 60k CIFAR files would dominate the run
    for split, count in (("train", 8), ("test", 4)):
        for name in ("cat", "dog", "ship", "truck"):
            (data / split / name).mkdir(parents=True)
            for source in sorted((cifar10_root / split / name).iterdir())[:count]:
                shutil.copy(source, data / split / name / source.name)
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(bq, "FIGURES_DIR", tmp_path / "figures")
    monkeypatch.setattr(bq, "DIAG_IMAGES", 8)
    argv = ["--steps", "2", "--batch-size", "4", "--eval-images", "8", "--seeds", "0", "1", "--runs", "merged", "grid"]
    argv += ["--data", str(data), "--work-dir", str(tmp_path / "work"), "--name", "quality_smoke", "--jobs", "2"]
    bq.main(argv)
    first = capsys.readouterr().out
    assert first.count("finished train") == 4 and first.count("finished evaluate") == 4

    payload = json.loads((tmp_path / "results" / "quality_smoke.json").read_text())
    assert [(r["model"], r["K"], r["seeds"]) for r in payload["rows"]] == [
        ("merged", 16, 2), ("merged", 36, 2), ("merged", 64, 2), ("grid", 16, 2), ("grid", 64, 2),
    ]  # fmt: skip
    assert all(r["steps"] == 2 and r["train images"] == 8 for r in payload["rows"])
    assert len(payload["extra"]["per_seed"]) == 10
    assert set(payload["extra"]["merge_diagnostics"]) == {"merged"}
    assert set(payload["extra"]["merge_diagnostics"]["merged"]["0"]) == {"16", "36"}
    md = (tmp_path / "results" / "quality_smoke.md").read_text()
    assert "**Verdict at K = 16:**" in md and "python benchmarks/bench_quality.py --steps 2" in md
    assert (tmp_path / "figures" / "quality_smoke_psnr_vs_k.png").is_file()

    bq.main(argv)  # everything finished: nothing is trained or evaluated again
    second = capsys.readouterr().out
    assert second.count("reusing") == 4 and "started" not in second
