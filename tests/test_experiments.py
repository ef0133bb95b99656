"""Every experiment YAML shipped in experiments/ validates (runs and suites), so none rots silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from cl.config import load_run_config, read_yaml
from cl.engine.sweep import plan_suite

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
FILES = sorted(p for p in EXPERIMENTS.rglob("*.yaml") if p.name != "base.yaml")


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_experiment_file_validates(path: Path):
    if "suite" in read_yaml(path):
        _, planned = plan_suite(path)
        assert planned
    else:
        load_run_config(path)
