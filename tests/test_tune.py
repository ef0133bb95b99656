"""Validation splits and `cl tune`: carved from training data only, the test set sealed during search."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cl.config import BenchmarkConfig, _specialise, parse_run_config
from cl.data.benchmark import SealedDataError, build_benchmark
from tests.conftest import tiny_config, write_yaml
from tests.test_trust import cli, one_line_error


def _bench(tmp: Path, **validation):
    raw = {"dataset": {"name": "synthetic", "n_classes": 6, "train_per_class": 30, "test_per_class": 10, "image_size": 8},
           "n_experiences": 3, "validation": validation or None}
    return _specialise(BenchmarkConfig, raw).model_validate(raw)


def test_the_validation_split_is_carved_from_training_data_per_class(tmp: Path):
    bench = build_benchmark(_bench(tmp, fraction=0.2, seed=1), tmp, seed=0)
    seen_val: set[int] = set()
    for exp in bench.experiences:
        train, val = set(exp.train_ids.tolist()), set(exp.val_ids.tolist())
        assert not train & val and not seen_val & val  # disjoint from training and across experiences
        seen_val |= val
        assert torch.equal(exp.val.x, bench.source.x_train[exp.val_ids])  # rows of the *training* pool
        for c in exp.classes:  # stratified: round(0.2 * 30) = 6 of each class's 30
            assert int((exp.val.y == c).sum()) == 6 and int((exp.train.y == c).sum()) == 24
    assert sum(len(e.test) for e in bench.experiences) == 60  # test untouched


def test_the_validation_split_is_deterministic_and_independent_of_the_run_seed(tmp: Path):
    a = build_benchmark(_bench(tmp, per_class=5, seed=3), tmp, seed=0)
    b = build_benchmark(_bench(tmp, per_class=5, seed=3), tmp, seed=7)  # another class order
    c = build_benchmark(_bench(tmp, per_class=5, seed=4), tmp, seed=0)
    rows = lambda bench: sorted(i for e in bench.experiences for i in e.val_ids.tolist())  # noqa: E731
    assert rows(a) == rows(b) and rows(a) != rows(c)
    assert all(int((e.val.y == cls).sum()) == 5 for e in a.experiences for cls in e.classes)


@pytest.mark.parametrize("validation, message", [
    ({"fraction": 0.2, "per_class": 3}, "give exactly one of 'fraction' and 'per_class'"),
    ({"seed": 1}, "give exactly one of 'fraction' and 'per_class'"),
    ({"fraction": 1.0}, "less than 1"),
    ({"per_class": 30}, "has 30 training samples, too few to hold out 30 and keep one"),
])
def test_impossible_validation_splits_are_one_line(tmp: Path, shared_cache: Path, capsys, validation, message):
    config = tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "simplecil"}, benchmark={"validation": validation})
    code, _, err = cli(capsys, "run", str(write_yaml(tmp / "cfg.yaml", config)))
    one_line_error(code, err, message)
    assert not (tmp / "runs").exists()


def test_a_run_with_validation_reports_both_splits_and_says_which_is_which(tmp: Path, shared_cache: Path, capsys):
    config = tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "er", "memory_size": 24}, benchmark={"validation": {"fraction": 0.2}})
    assert cli(capsys, "run", str(write_yaml(tmp / "cfg.yaml", config)))[0] == 0
    m = json.loads((tmp / "runs" / "tiny" / "er" / "seed0" / "metrics.json").read_text())
    assert m["split"] == "test" and m["n_test_per_task"] == [20, 20, 20] and m["n_val_per_task"] == [12, 12, 12]
    assert len(m["acc_matrix_val"]) == 3 and m["validation"]["final_acc"] is not None
    from cl.analysis.metrics import summarize

    assert m["validation"]["avg_incremental_acc"] == pytest.approx(summarize(m["acc_matrix_val"], m["n_val_per_task"])["avg_incremental_acc"])


def test_a_trial_that_reads_test_data_fails(tmp: Path, shared_cache: Path, monkeypatch):
    from cl.engine.loop import TrialLoop, prepare_inputs, prepare_trial
    from cl.strategies.er import ER

    cfg = parse_run_config(tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "er", "memory_size": 24},
                                       benchmark={"validation": {"fraction": 0.2}}))
    inputs = prepare_inputs(cfg, want_features=True)
    assert TrialLoop(prepare_trial(inputs, cfg, None)).run(None)["split"] == "val"  # an honest strategy is fine
    peek = ER.before_experience
    monkeypatch.setattr(ER, "before_experience", lambda self, exp: (len(exp.test), peek(self, exp)))
    with pytest.raises(SealedDataError, match="test data of experience 0 was read during hyper-parameter search"):
        TrialLoop(prepare_trial(inputs, cfg, None)).run(None)


def test_first_k_trials_never_see_later_experiences(tmp: Path, shared_cache: Path, monkeypatch):
    from cl.engine.loop import TrialLoop, prepare_inputs, prepare_trial
    from cl.strategies.er import ER

    cfg = parse_run_config(tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "er", "memory_size": 24},
                                       benchmark={"validation": {"fraction": 0.2}}))
    seen = []
    peek = ER.before_experience
    monkeypatch.setattr(ER, "before_experience", lambda self, exp: (seen.append(exp.index), peek(self, exp)))
    metrics = TrialLoop(prepare_trial(prepare_inputs(cfg, want_features=True), cfg, 2)).run(None)
    assert seen == [0, 1] and len(metrics["acc_matrix"]) == 2


def _tune_files(tmp: Path, cache: Path, **extra) -> Path:
    write_yaml(tmp / "base.yaml", tiny_config(tmp, cache_dir=str(cache), strategy={"name": "er", "memory_size": 24}))
    return write_yaml(tmp / "tune.yaml", {"tune": "t", "config": "base.yaml", "validation": {"fraction": 0.2}, "protocol": {"first_k": 2},
                                          "trials": 4, "space": {"strategy.lr": {"log_uniform": [0.001, 0.5]}}, **extra})


def test_the_search_finds_the_optimum_of_a_toy_objective(tmp: Path, shared_cache: Path, monkeypatch, capsys):
    from cl.engine import tune as T

    def toy(base, params, seeds, first_k, objective, inputs, report=None):
        x, k = params["strategy.lr"], params["strategy.memory_size"]
        value = -((x - 0.3) ** 2) - 0.01 * abs(k - 12)
        return value, [value]

    monkeypatch.setattr(T, "run_trial", toy)
    path = _tune_files(tmp, shared_cache, trials=40, pruner="none",
                       space={"strategy.lr": {"uniform": [0.01, 1.0]}, "strategy.memory_size": {"integer": [6, 24], "step": 6}})
    assert cli(capsys, "tune", str(path))[0] == 0
    best = json.loads((tmp / "runs" / "tune" / "t" / "tune.json").read_text())["studies"]["t"]["best_params"]
    assert abs(best["strategy.lr"] - 0.3) < 0.05 and best["strategy.memory_size"] == 12


def test_a_tuned_config_runs_unchanged_and_an_interrupted_study_resumes(tmp: Path, shared_cache: Path, capsys):
    path = _tune_files(tmp, shared_cache)
    out = tmp / "runs" / "tune" / "t"
    assert cli(capsys, "tune", str(path), "--trials", "2")[0] == 0  # stopped after two trials ...
    first = (out / "trials.csv").read_text().splitlines()[1:3]
    assert cli(capsys, "tune", str(path))[0] == 0  # ... resumed up to the file's four
    rows = (out / "trials.csv").read_text().splitlines()[1:]
    assert len(rows) == 4 and rows[:2] == first
    for name in ("best.yaml", "trials.md", "trials.png", "study.db", "tune.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "tune.json").read_text())
    assert summary["test_data"].startswith("sealed") and summary["objective"] == "validation avg_incremental_acc"
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["strategy"]["lr"] == summary["studies"]["t"]["best_params"]["strategy.lr"] and best["run_name"] == "er,tuned=t"
    code, stdout, _ = cli(capsys, "run", str(out / "best.yaml"))
    assert code == 0 and "tiny/er,tuned=t/seed0" in stdout
    saved = yaml.safe_load((tmp / "runs" / "tiny" / "er,tuned=t" / "seed0" / "config.yaml").read_text())
    assert saved["strategy"]["lr"] == best["strategy"]["lr"] and saved["benchmark"]["validation"] is None  # final runs train on all training data


def test_a_changed_study_is_refused_then_restarted_with_overwrite(tmp: Path, shared_cache: Path, capsys):
    path = _tune_files(tmp, shared_cache, trials=2)
    assert cli(capsys, "tune", str(path))[0] == 0
    _tune_files(tmp, shared_cache, trials=2, space={"strategy.lr": {"log_uniform": [0.01, 0.5]}})
    code, _, err = cli(capsys, "tune", str(path))
    one_line_error(code, err, "study t was started with another config, space, objective, protocol or seeds; pass --overwrite")
    assert cli(capsys, "tune", str(path), "--overwrite")[0] == 0


@pytest.mark.parametrize("change, message", [
    ({"space": {"strategy.lr": {"uniform": [0.5, 0.1]}}}, "need low < high"),
    ({"space": {"strategy.lr": {"uniform": [0.1, 0.5], "choices": [1]}}}, "give exactly one of choices"),
    ({"space": {"strategy.lrr": {"choices": [0.1]}}}, "strategy.lrr=0.1: unknown key 'strategy.lrr' for strategy 'er'"),
    ({"space": {"strategy.memory_size": {"choices": [-1]}}}, "strategy.memory_size=-1: 'strategy.memory_size': Input should be greater than or equal to 0"),
    ({"space": {}}, "give the search 'space'"),
    ({"validation": None}, "has no benchmark.validation; give 'validation'"),
    ({"tune": "../x"}, "is not a safe folder name"),
    ({"objective": "avg_incremantal_acc"}, "'objective': Input should be"),
    ({"objective": "wall_time_s"}, "'objective': Input should be"),
    ({"objective": "avg_anytime_acc"}, "'avg_anytime_acc' is measured on online streams only"),
    ({"space": {"strategy.memory_size": {"integer": [10, 20], "step": 100}}}, "is not a whole number of steps of 100"),
    ({"protocol": {"first_k": 50}}, "protocol.first_k is 50 but study t's stream has 3 experiences"),
    ({"validation": {"per_class": 30}}, "too few to hold out 30 and keep one"),
    ({"validation": {"fraction": 0.99}}, "too few to hold out"),
    ({"objective": "forgetting", "protocol": {"first_k": 1}}, "objective 'forgetting' needs at least 2 experiences"),
])
def test_bad_tuning_files_are_one_line(tmp: Path, shared_cache: Path, capsys, change, message):
    path = _tune_files(tmp, shared_cache)
    write_yaml(path, {**yaml.safe_load(path.read_text()), **change})
    code, _, err = cli(capsys, "tune", str(path))
    one_line_error(code, err, message)
    assert not (tmp / "runs").exists()


def test_tuning_the_entries_of_a_suite_writes_a_suite_sweep_accepts(tmp: Path, shared_cache: Path, capsys):
    write_yaml(tmp / "base.yaml", tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "finetune"}))
    write_yaml(tmp / "suite.yaml", {"suite": "s", "config": "base.yaml", "seeds": [0, 1], "strategies": [
        {"name": "ft", "overrides": {"strategy": {"name": "finetune", "lr": 0.01}}},
        {"name": "er", "overrides": {"strategy": {"name": "er", "lr": 0.01, "memory_size": 24}}},
        {"name": "ncm", "overrides": {"strategy": {"name": "simplecil"}}},
    ]})
    path = write_yaml(tmp / "tune.yaml", {"tune": "st", "suite": "suite.yaml", "validation": {"per_class": 5}, "trials": 2,
                                          "strategies": {"ft": {"strategy.lr": {"log_uniform": [0.001, 0.5]}},
                                                         "er": {"strategy.lr": {"log_uniform": [0.001, 0.5]}}}})
    assert cli(capsys, "tune", str(path))[0] == 0
    out = tmp / "runs" / "tune" / "st"
    summary = json.loads((out / "tune.json").read_text())["studies"]
    tuned = yaml.safe_load((out / "suite.yaml").read_text())
    lrs = {e["name"]: (e.get("overrides") or {}).get("strategy", {}).get("lr") for e in tuned["strategies"]}
    assert lrs == {"ft": summary["ft"]["best_params"]["strategy.lr"], "er": summary["er"]["best_params"]["strategy.lr"], "ncm": None}
    assert (out / "ft_trials.png").is_file() and (out / "er_trials.md").is_file()
    code, stdout, _ = cli(capsys, "sweep", str(out / "suite.yaml"), "--dry-run")
    assert code == 0 and stdout.count("run ") == 6 and "s,tuned=st/ft/seed0" in stdout


def test_a_fault_of_the_base_config_is_not_blamed_on_the_search_space(tmp: Path, shared_cache: Path, capsys):
    path = _tune_files(tmp, shared_cache)
    code, _, err = cli(capsys, "tune", str(path), "--set", "train.epochs=-1")
    one_line_error(code, err, "study t: 'train.epochs': Input should be greater than or equal to 1")
    assert "strategy.lr=" not in err and not (tmp / "runs").exists()


@pytest.mark.parametrize("damage", ["garbage", "directory", "foreign_sqlite", "symlink"])
def test_a_damaged_or_foreign_study_database_is_refused(tmp: Path, shared_cache: Path, capsys, damage):
    import sqlite3

    path = _tune_files(tmp, shared_cache, trials=1)
    db = tmp / "runs" / "tune" / "t" / "study.db"
    db.parent.mkdir(parents=True)
    outside = tmp / "outside.db"
    if damage == "garbage":
        db.write_bytes(b"not a database at all" * 100)
    elif damage == "directory":
        db.mkdir()
    else:
        with sqlite3.connect(outside) as con:
            con.execute("CREATE TABLE mine (x INTEGER)")
        if damage == "symlink":
            db.symlink_to(outside)
        else:
            db.write_bytes(outside.read_bytes())
    before = outside.read_bytes() if outside.exists() else None
    code, _, err = cli(capsys, "tune", str(path))
    message = {"garbage": "is not a study database of cl tune; pass --overwrite", "directory": "is not a regular file",
               "foreign_sqlite": "is not a study database of cl tune", "symlink": "is a symlink; refusing"}[damage]
    one_line_error(code, err, message)
    assert (outside.read_bytes() if outside.exists() else None) == before  # nothing outside out_dir touched
    if damage in ("garbage", "foreign_sqlite"):  # ours by place: --overwrite starts the search again
        assert cli(capsys, "tune", str(path), "--overwrite")[0] == 0 and (db.parent / "tune.json").is_file()


def test_a_point_the_data_cannot_hold_fails_its_trial_and_the_search_goes_on(tmp: Path, shared_cache: Path, capsys):
    path = _tune_files(tmp, shared_cache, trials=6, pruner="none", space={"strategy.memory_size": {"choices": [24, 5000]}})
    code, stdout, _ = cli(capsys, "tune", str(path))
    assert code == 0 and "failed {'strategy.memory_size': 5000}" in stdout
    out = tmp / "runs" / "tune" / "t"
    summary = json.loads((out / "tune.json").read_text())["studies"]["t"]
    assert summary["best_params"] == {"strategy.memory_size": 24} and summary["trials"] == 6 and summary["complete"] < 6
    assert "| failed: " in (out / "trials.md").read_text()
    path = _tune_files(tmp, shared_cache, tune="u", trials=2, space={"strategy.memory_size": {"choices": [5000, 6000]}})
    code, _, err = cli(capsys, "tune", str(path))
    one_line_error(code, err, "study u: no trial completed, so there is no best value (2 failed, 0 pruned; first failure:")
    path = _tune_files(tmp, shared_cache, tune="v", trials=2, pruner="none", space={"strategy.lr": {"choices": [1.0e37, 1.0e38]}})
    code, stdout, err = cli(capsys, "tune", str(path))  # a diverging point is a failed trial, not a crash
    one_line_error(code, err, "study v: no trial completed")
    assert "failed {'strategy.lr': 1e+37}: training diverged: loss term" in stdout and "checkpoint" not in stdout


def test_an_interrupted_trial_is_not_left_running_nor_counted(tmp: Path, shared_cache: Path, monkeypatch, capsys):
    import optuna

    from cl.engine import tune as T

    real, calls = T.run_trial, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "run_trial", flaky)
    path = _tune_files(tmp, shared_cache, trials=3)
    assert cli(capsys, "tune", str(path))[0] == 130
    assert cli(capsys, "tune", str(path))[0] == 0
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp / 'runs' / 'tune' / 't' / 'study.db'}")
    states = [t.state.name for t in study.trials]
    assert states.count("RUNNING") == 0 and states.count("COMPLETE") + states.count("PRUNED") == 3 and states.count("FAIL") == 1
    assert len((tmp / "runs" / "tune" / "t" / "trials.csv").read_text().splitlines()) == 4  # header + the 3 counted trials


def test_the_best_config_carries_what_every_trial_ran_with(tmp: Path, shared_cache: Path, capsys):
    path = _tune_files(tmp, shared_cache, trials=1, validation=None,
                       overrides={"train": {"batch_size": 8}, "run_name": "er", "seed": 5, "benchmark": {"validation": {"fraction": 0.3}}})
    assert cli(capsys, "tune", str(path), "--set", "train.epochs=1", "--set", "strategy.memory_size=6", "--set", "seed=3")[0] == 0
    out = tmp / "runs" / "tune" / "t"
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["train"] == {"batch_size": 8, "epochs": 1} and best["strategy"]["memory_size"] == 6
    assert "seed" not in best and best["run_name"] == "er,tuned=t" and best["benchmark"] == {"validation": None}  # final runs: all training data
    assert json.loads((out / "tune.json").read_text())["cli_overrides"] == ["train.epochs=1", "strategy.memory_size=6", "seed=3"]
    code, stdout, _ = cli(capsys, "run", str(out / "best.yaml"), "--dry-run")
    assert code == 0 and "epochs: 1" in stdout and "memory_size: 6" in stdout


def test_overwrite_starts_the_whole_search_again(tmp: Path, shared_cache: Path, capsys):
    write_yaml(tmp / "base.yaml", tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "finetune"}))
    write_yaml(tmp / "suite.yaml", {"suite": "s", "config": "base.yaml", "seeds": [0], "strategies": [
        {"name": "ft", "overrides": {"strategy": {"name": "finetune", "lr": 0.01}}},
        {"name": "er", "overrides": {"strategy": {"name": "er", "lr": 0.01, "memory_size": 24}}}]})
    space = {"strategy.lr": {"log_uniform": [0.001, 0.5]}}
    tune = {"tune": "st", "suite": "suite.yaml", "benchmark": "nosuch", "validation": {"per_class": 5}, "trials": 1, "strategies": {"ft": space, "er": space}}
    path = write_yaml(tmp / "tune.yaml", tune)
    code, _, err = cli(capsys, "tune", str(path))
    one_line_error(code, err, "benchmark: 'nosuch' is not a benchmark of the suite")
    del tune["benchmark"]
    write_yaml(path, tune)
    assert cli(capsys, "tune", str(path))[0] == 0
    out = tmp / "runs" / "tune" / "st"
    assert (out / "er_trials.csv").is_file()
    write_yaml(path, {**tune, "strategies": {"ft": space}})
    code, _, err = cli(capsys, "tune", str(path))
    assert code == 0 and "also holds studies not in this file (er)" in err
    assert cli(capsys, "tune", str(path), "--overwrite")[0] == 0
    assert not (out / "er_trials.csv").exists() and (out / "ft_trials.csv").is_file()
    assert list(json.loads((out / "tune.json").read_text())["studies"]) == ["ft"]


def test_a_suite_search_reports_every_study_and_refuses_changes_before_any_trial(tmp: Path, shared_cache: Path, capsys):
    write_yaml(tmp / "base.yaml", tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "finetune"}))
    write_yaml(tmp / "suite.yaml", {"suite": "s", "config": "base.yaml", "seeds": [0], "strategies": [
        {"name": "ft", "overrides": {"strategy": {"name": "finetune", "lr": 0.01}}},
        {"name": "er", "overrides": {"strategy": {"name": "er", "lr": 0.01, "memory_size": 24}}},
        {"name": "ncm", "overrides": {"strategy": {"name": "simplecil"}}}]})
    lr = {"strategy.lr": {"log_uniform": [0.001, 0.5]}}
    tune = {"tune": "st", "suite": "suite.yaml", "validation": {"per_class": 5}, "trials": 2,
            "strategies": {"er": {"strategy.memory_size": {"choices": [5000, 6000]}}, "ft": lr}}
    path = write_yaml(tmp / "tune.yaml", tune)
    code, _, err = cli(capsys, "tune", str(path))
    one_line_error(code, err, "study er: no trial completed")
    out = tmp / "runs" / "tune" / "st"
    assert (out / "ft_trials.csv").is_file() and not (out / "suite.yaml").exists()  # ft still searched; no partial suite
    assert list(json.loads((out / "tune.json").read_text())["failed_studies"]) == ["er"]
    tune["strategies"] = {"er": lr}
    write_yaml(path, {**tune, "overrides": {"strategy": {"memory_size": 12}}})
    assert cli(capsys, "tune", str(path), "--overwrite")[0] == 0
    code, _, err = cli(capsys, "tune", str(path), "--set", "train.epochs=1")  # changes every study: refused before any trial
    before = (out / "er_trials.csv").read_text()
    one_line_error(code, err, "study er was started with another config")
    assert (out / "er_trials.csv").read_text() == before
    tuned = {e["name"]: e.get("overrides", {}) for e in yaml.safe_load((out / "suite.yaml").read_text())["strategies"]}
    assert tuned["er"]["strategy"]["memory_size"] == 12 and "memory_size" not in tuned["ft"].get("strategy", {})  # tuned entries only
    assert cli(capsys, "sweep", str(out / "suite.yaml"), "--dry-run")[0] == 0


def test_overwrite_removes_only_the_files_of_the_search(tmp: Path, shared_cache: Path, capsys):
    path = _tune_files(tmp, shared_cache, trials=1)
    assert cli(capsys, "tune", str(path))[0] == 0
    out = tmp / "runs" / "tune" / "t"
    for name in ("my_notes_trials.csv", "README_trials.md", "notes.txt"):
        (out / name).write_text("mine")
    assert cli(capsys, "tune", str(path), "--overwrite")[0] == 0
    assert all((out / name).read_text() == "mine" for name in ("my_notes_trials.csv", "README_trials.md", "notes.txt"))


def test_the_best_config_finds_its_base_through_a_linked_out_dir(tmp: Path, shared_cache: Path, capsys):
    (tmp / "store" / "deep").mkdir(parents=True)
    (tmp / "link").symlink_to(tmp / "store" / "deep")
    path = _tune_files(tmp, shared_cache, trials=1)
    assert cli(capsys, "tune", str(path), "--out", str(tmp / "link"))[0] == 0
    assert cli(capsys, "run", str(tmp / "link" / "tune" / "t" / "best.yaml"), "--dry-run")[0] == 0
