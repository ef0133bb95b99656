"""``--dry-run --estimate``: the extrapolation's arithmetic, and the command line around it."""

from __future__ import annotations

from pathlib import Path

import pytest

from cl.config import parse_run_config
from tests.conftest import tiny_config, write_yaml
from tests.test_hostile import cli


def test_estimate_extrapolates_per_sample_timings_to_the_run(tmp: Path, shared_cache: Path, monkeypatch: pytest.MonkeyPatch):
    from cl.engine import estimate as E

    monkeypatch.setattr(E, "_per_sample", lambda make, full, n, device, budget_s=4.0: (1e-3, 8))
    monkeypatch.setattr(E, "_timed", lambda fn, device: 8e-3)  # decoding (not streamed here: unused)
    cfg = parse_run_config(tiny_config(tmp, cache_dir=str(shared_cache), train={"eval_future_tasks": False}))
    est = E.estimate_run(cfg)
    # 6 classes x (30 train + 10 test), 3 experiences of 2 classes; ER trains on features, 2 epochs
    assert est.samples == {"feature extraction": 240, "training": 2 * 180, "evaluation": 20 * 3 + 20 * 2 + 20 * 1}
    assert est.seconds == pytest.approx({"feature extraction": 0.24, "training": 0.36, "evaluation": 0.12})
    assert est.total_s == pytest.approx(0.72)
    assert est.disk_gb["feature cache"] == pytest.approx(240 * 96 * 4 / 2**30)  # test_resnet: 96 features, float32
    assert not (tmp / "runs").exists()  # nothing written


def test_future_tasks_and_validation_are_evaluated_too(tmp: Path, shared_cache: Path, monkeypatch: pytest.MonkeyPatch):
    from cl.engine import estimate as E

    monkeypatch.setattr(E, "_per_sample", lambda make, full, n, device, budget_s=4.0: (1e-3, 8))
    cfg = parse_run_config(tiny_config(tmp, cache_dir=str(shared_cache), train={"eval_future_tasks": True},
                                       benchmark={"validation": {"per_class": 5}}))
    est = E.estimate_run(cfg)
    assert est.samples["evaluation"] == 60 * 4 + 30 * 3  # every test set before and after each experience; validation after each
    assert est.samples["training"] == 2 * 150


def test_dry_run_estimate_from_the_command_line(tmp: Path, shared_cache: Path, capsys: pytest.CaptureFixture):
    path = write_yaml(tmp / "c.yaml", tiny_config(tmp, cache_dir=str(shared_cache)))
    code, out, _ = cli(capsys, "run", str(path), "--dry-run", "--estimate")
    assert code == 0 and "# estimate (timed on cpu, fp32" in out and "#   total" in out and "feature extraction" in out
    assert not (tmp / "runs").exists()
    code, _, err = cli(capsys, "run", str(path), "--estimate")
    assert code == 2 and err.strip() == "error: --estimate goes with --dry-run"


def test_sweep_estimate_sums_the_entries(tmp: Path, shared_cache: Path, capsys: pytest.CaptureFixture):
    write_yaml(tmp / "base.yaml", tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "simplecil"}))
    write_yaml(tmp / "suite.yaml", {"suite": "s", "config": "base.yaml", "seeds": [0, 1],
                                    "strategies": [{"name": "er", "overrides": {"strategy": {"name": "er", "memory_size": 24}}}, {"name": "ncm"}]})
    code, out, _ = cli(capsys, "sweep", str(tmp / "suite.yaml"), "--dry-run", "--estimate")
    lines = [line for line in out.splitlines() if line.startswith("# ")]
    assert code == 0 and any(line.startswith("# er:") and "per seed x 2" in line for line in lines)
    assert any(line.startswith("# ncm:") for line in lines) and lines[-1].startswith("# estimated total:")
