"""Suites: expansion, validation before any run, skipping finished runs, comparison outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from cl.cli import main
from cl.config import ConfigError
from cl.engine.sweep import plan_suite
from tests.conftest import tiny_config, write_yaml


def suite_files(tmp: Path, cache: Path, strategies: list[dict], **extra) -> Path:
    write_yaml(tmp / "base.yaml", tiny_config(tmp, cache_dir=str(cache)))
    return write_yaml(tmp / "suite.yaml", {"suite": "s", "config": "base.yaml", "seeds": [0, 1], "strategies": strategies, **extra})


def test_plan_expands_benchmarks_strategies_seeds(tmp: Path, shared_cache: Path):
    path = suite_files(
        tmp, shared_cache,
        [{"name": "ft", "overrides": {"strategy": {"name": "finetune"}}}, {"name": "ncm", "overrides": {"strategy": {"name": "simplecil"}}}],
        benchmarks=[{"name": "b0"}, {"name": "b2", "overrides": {"benchmark": {"base_classes": 2, "n_experiences": 3}}}],
    )
    _, planned = plan_suite(path)
    assert len(planned) == 8
    dirs = {str(p.cfg.run_dir().relative_to(tmp / "runs")) for p in planned}
    assert "s/b2/ncm/seed1" in dirs and "s/b0/ft/seed0" in dirs


def test_a_bad_entry_fails_before_anything_runs(tmp: Path, shared_cache: Path):
    path = suite_files(tmp, shared_cache, [{"name": "ok", "overrides": {"strategy": {"name": "finetune"}}},
                                           {"name": "bad", "overrides": {"strategy": {"name": "er", "memory_size": "lots"}}}])
    with pytest.raises(ConfigError, match="strategy bad, seed 0: 'strategy.memory_size': Input should be a valid integer"):
        plan_suite(path)
    assert main(["sweep", str(path)]) == 2
    assert not (tmp / "runs").exists()


def test_sweep_runs_compares_and_skips_finished_runs(tmp: Path, shared_cache: Path, capsys):
    path = suite_files(tmp, shared_cache, [{"name": "ft", "overrides": {"strategy": {"name": "finetune"}}},
                                           {"name": "ncm", "overrides": {"strategy": {"name": "simplecil"}}}])
    assert main(["sweep", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ft " in out and "ncm " in out and "± " in out  # two seeds -> mean ± std
    root = tmp / "runs" / "s"
    assert (root / "summary.md").is_file() and (root / "summary.csv").is_file() and (root / "forgetting_curves.png").is_file()
    stamp = (root / "ft" / "seed0" / "metrics.json").stat().st_mtime_ns
    assert main(["sweep", str(path)]) == 0
    assert (root / "ft" / "seed0" / "metrics.json").stat().st_mtime_ns == stamp
