"""Every experiment YAML shipped in experiments/ validates (runs and suites) and its backbone and PEFT
modules can be built, so none rots silently."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from cl.config import load_run_config, read_yaml
from cl.models.backbone import create_model
from cl.peft import build_peft
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
        for run in planned:
            builds(run.cfg)
        return
    overrides = []
    if raw.get("benchmark", {}).get("dataset", {}).get("name") == "image_folder":  # its class count needs the folder
        for c in range(200):
            (tmp_path / "train" / f"class{c:03d}").mkdir(parents=True)
        overrides.append(f"benchmark.dataset.root={tmp_path}")
    builds(load_run_config(path, overrides))


@functools.lru_cache(maxsize=None)
def _model(name: str, kwargs: str) -> torch.nn.Module:
    return create_model(name, json.loads(kwargs))


def builds(cfg) -> None:  # noqa: ANN001
    """The backbone architecture of a validated config can be built (no weights) and so can the
    PEFT modules its strategy puts on it: a suite whose kwargs no longer fit its backbone fails here."""
    model = _model(cfg.backbone.name, json.dumps(cfg.backbone.kwargs, sort_keys=True))
    for key in ("peft", "first_session"):
        section = getattr(cfg.strategy, key, None)
        if section is not None:
            build_peft(section, model)


RESULTS = EXPERIMENTS / "tuning" / "results"


def _at(data: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


@pytest.mark.parametrize("tune_json", sorted(RESULTS.glob("*/tune.json")), ids=lambda p: p.parent.name)
def test_suite_values_are_the_committed_tuning_results(tune_json: Path):
    """Every tuned value in a suite is the one `cl tune` selected on validation (learning rates rounded
    to two significant digits), so a hand edit cannot drift from the committed search."""
    import json

    result = json.loads(tune_json.read_text())
    tuning = read_yaml(EXPERIMENTS / "tuning" / f"{result['tune']}.yaml")
    suite = read_yaml((EXPERIMENTS / "tuning" / tuning["suite"]).resolve())
    entries = {e["name"]: e.get("overrides") or {} for e in suite["strategies"]}
    assert set(result["studies"]) == set(tuning["strategies"])
    for name, study in result["studies"].items():
        for key, best in study["best_params"].items():
            used = _at(entries[name], key)
            assert used is not None, f"{name}: {key} is not set in the suite"
            if isinstance(best, float) and not isinstance(used, str):
                assert used == pytest.approx(best, rel=0.05), f"{name}: {key}"
            else:
                assert used == best, f"{name}: {key}"
