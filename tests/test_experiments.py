"""Every experiment YAML shipped in experiments/ validates (runs and suites), so none rots silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from cl.config import load_run_config, read_yaml
from cl.engine.sweep import plan_suite
from cl.engine.tune import load_tune

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
FILES = sorted(p for p in EXPERIMENTS.rglob("*.yaml") if p.name != "base.yaml")


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_experiment_file_validates(path: Path, tmp_path: Path):
    raw = read_yaml(path)
    if "tune" in raw:  # a tuning file: its suite or config and every trial's search space
        _, studies, _ = load_tune(path)
        assert studies and all(study.space for study in studies)
        return
    if "suite" in raw:
        _, planned = plan_suite(path)
        assert planned
        return
    overrides = []
    if raw.get("benchmark", {}).get("dataset", {}).get("name") == "image_folder":  # its class count needs the folder
        for c in range(200):
            (tmp_path / "train" / f"class{c:03d}").mkdir(parents=True)
        overrides.append(f"benchmark.dataset.root={tmp_path}")
    load_run_config(path, overrides)
