"""Suites: expansion, validation before any run, executors (serial, process pool, Ray), resume, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cl.cli import main
from cl.config import ConfigError
from cl.engine.sweep import plan_suite
from tests.conftest import tiny_config, write_yaml

STRATS = [{"name": "ft", "overrides": {"strategy": {"name": "finetune"}}}, {"name": "ncm", "overrides": {"strategy": {"name": "simplecil"}}}]


def suite_files(tmp: Path, cache: Path, strategies: list[dict], **extra) -> Path:
    # the base names a strategy without options: entries switch it, and an option the new strategy
    # does not take would be an error (switching keeps the other keys)
    write_yaml(tmp / "base.yaml", tiny_config(tmp, cache_dir=str(cache), strategy={"name": "finetune"}))
    return write_yaml(tmp / "suite.yaml", {"suite": "s", "config": "base.yaml", "seeds": [0, 1], "strategies": strategies, **extra})


def test_plan_expands_benchmarks_strategies_seeds(tmp: Path, shared_cache: Path):
    path = suite_files(tmp, shared_cache, STRATS,
                       benchmarks=[{"name": "b0"}, {"name": "b2", "overrides": {"benchmark": {"base_classes": 2, "n_experiences": 3}}}])
    _, planned = plan_suite(path)
    assert len(planned) == 8
    dirs = {str(p.cfg.run_dir().relative_to(tmp / "runs")) for p in planned}
    assert "s/b2/ncm/seed1" in dirs and "s/b0/ft/seed0" in dirs
    assert planned[-1].cfg.benchmark.base_classes == 2 and planned[0].cfg.benchmark.base_classes is None


def test_a_bad_entry_fails_before_anything_runs(tmp: Path, shared_cache: Path):
    path = suite_files(tmp, shared_cache, [STRATS[0], {"name": "bad", "overrides": {"strategy": {"name": "er", "memory_size": "lots"}}}])
    with pytest.raises(ConfigError, match="strategy bad, seed 0: 'strategy.memory_size': Input should be a valid integer"):
        plan_suite(path)
    assert main(["sweep", str(path)]) == 2
    assert not (tmp / "runs").exists()


def test_sweep_compares_and_skips_finished_runs(tmp: Path, shared_cache: Path, capsys):
    path = suite_files(tmp, shared_cache, STRATS)
    assert main(["sweep", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ft " in out and "ncm " in out and "± " in out  # two seeds -> mean ± std
    root = tmp / "runs" / "s"
    for name in ("summary.md", "summary.csv", "metrics_long.csv", "report.html", "outcomes.json",
                 "plots/s_forgetting_curves.png", "plots/s_acc_matrices.png", "plots/s_cost.png"):
        assert (root / name).is_file(), name
    assert "data:image/png;base64," in (root / "report.html").read_text()
    stamp = (root / "ft" / "seed0" / "metrics.json").stat().st_mtime_ns
    assert main(["sweep", str(path)]) == 0  # resume: nothing re-runs
    assert (root / "ft" / "seed0" / "metrics.json").stat().st_mtime_ns == stamp


def test_one_failing_run_does_not_lose_the_others(tmp: Path, shared_cache: Path, capsys):
    # a backbone too small for its input fails at run time (only the run, not the plan)
    bad = {"name": "broken", "overrides": {"strategy": {"name": "finetune"}, "backbone": {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1}, "weights": {"source": "none", "pretrain": None}}}}
    path = suite_files(tmp, shared_cache, [STRATS[1], bad])
    assert main(["sweep", str(path)]) == 1
    out = capsys.readouterr().out
    assert "2 of 4 runs failed" in out and "cannot take" in out
    outcomes = json.loads((tmp / "runs" / "s" / "outcomes.json").read_text())
    assert [o["ok"] for o in outcomes] == [True, True, False, False]
    assert (tmp / "runs" / "s" / "ncm" / "seed1" / "metrics.json").is_file()
    assert "broken seed 0: failed" in (tmp / "runs" / "s" / "summary.md").read_text()


def test_parallel_local_executor_matches_serial(tmp: Path, shared_cache: Path):
    # Bit-equality across executors needs the same thread count: PyTorch's CPU reductions are only
    # reproducible for a fixed number of threads (it is recorded in env.json).
    path = suite_files(tmp, shared_cache, STRATS)
    assert main(["sweep", str(path), "--jobs", "2", "--out", str(tmp / "par"), "--set", "num_threads=1"]) == 0
    assert main(["sweep", str(path), "--out", str(tmp / "ser"), "--set", "num_threads=1"]) == 0
    for run in ("ft/seed0", "ncm/seed1"):
        par = json.loads((tmp / "par" / "s" / run / "metrics.json").read_text())
        ser = json.loads((tmp / "ser" / "s" / run / "metrics.json").read_text())
        assert par["acc_matrix"] == ser["acc_matrix"], run


def test_ray_executor_on_a_local_instance(tmp: Path, shared_cache: Path):
    pytest.importorskip("ray")
    path = suite_files(tmp, shared_cache, STRATS)
    assert main(["sweep", str(path), "--executor", "ray", "--jobs", "2"]) == 0
    outcomes = json.loads((tmp / "runs" / "s" / "outcomes.json").read_text())
    assert len(outcomes) == 4 and all(o["ok"] for o in outcomes)
    assert (tmp / "runs" / "s" / "report.html").is_file()
