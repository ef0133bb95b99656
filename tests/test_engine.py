"""The loop end to end: YAML -> CLI -> run directory with metrics, plots and provenance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cl.cli import main
from cl.errors import RunDirError
from cl.config import parse_run_config
from cl.engine.loop import prepare, run
from tests.conftest import tiny_config, write_yaml


def test_cli_run_writes_a_complete_run_directory(tmp: Path, shared_cache: Path, capsys):
    path = write_yaml(tmp / "cfg.yaml", tiny_config(tmp, cache_dir=str(shared_cache)))
    assert main(["run", str(path)]) == 0
    run_dir = tmp / "runs" / "tiny" / "er" / "seed0"
    assert str(run_dir) in capsys.readouterr().out
    for name in ("config.yaml", "env.json", "metrics.json", "log.jsonl", "plots/forgetting_curves.png", "plots/acc_matrix.png"):
        assert (run_dir / name).is_file(), name

    m = json.loads((run_dir / "metrics.json").read_text())
    R = m["acc_matrix"]
    assert len(R) == 3 and all(R[i][j] is None for i in range(3) for j in range(3) if j > i)
    assert all(0 <= R[i][j] <= 1 for i in range(3) for j in range(i + 1))
    assert len(m["acc_matrix_task_aware"]) == 3 and m["initial_acc_task_aware"] is not None
    for key in ("final_avg_acc", "final_acc", "avg_incremental_acc", "forgetting", "bwt", "trainable_params",
                "stored_bytes_per_task", "memory_size", "wall_time_s", "train_samples_per_s", "peak_rss_mb", "backbone"):
        assert key in m, key
    assert m["memory_size"] == 24 and m["memory_bytes"] > 0
    assert m["task_aware"]["fwt"] is not None  # defined task-aware: the head can score unseen tasks
    assert m["backbone"]["source"] == "pretrain" and len(m["backbone"]["sha256"]) == 64

    env = json.loads((run_dir / "env.json").read_text())
    assert env["seed"] == 0 and env["packages"]["torch"] == torch.__version__.split("+")[0]
    assert env["backbone"]["sha256"] == m["backbone"]["sha256"] and "git" in env
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["strategy"]["memory_policy"] == "auto" and saved["train"]["eval_batch_size"] == 64  # resolved, with defaults
    events = [json.loads(line)["event"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert events[0] == "run_start" and events[-1] == "run_end" and events.count("eval") == 3


def test_finished_run_is_not_overwritten(tmp: Path, shared_cache: Path, capsys):
    path = write_yaml(tmp / "cfg.yaml", tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "simplecil"}))
    assert main(["run", str(path)]) == 0
    metrics = tmp / "runs" / "tiny" / "simplecil" / "seed0" / "metrics.json"
    stamp = metrics.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["run", str(path)]) == 2
    assert "holds a finished run; --resume reports it (if config, data and weights match), --overwrite replaces it" in capsys.readouterr().err
    assert metrics.stat().st_mtime_ns == stamp
    assert main(["run", str(path), "--overwrite"]) == 0


@pytest.mark.parametrize("strategy", [{"name": "er", "memory_size": 24}, {"name": "finetune"}])
def test_stop_and_resume_gives_the_same_results(tmp: Path, shared_cache: Path, strategy: dict):
    base = tiny_config(tmp, cache_dir=str(shared_cache), strategy=strategy)
    full = run(parse_run_config({**base, "out_dir": str(tmp / "a")}))
    cfg = parse_run_config({**base, "out_dir": str(tmp / "b")})
    assert run(cfg, stop_after=1) is None
    assert not (cfg.run_dir() / "metrics.json").exists()
    with pytest.raises(Exception, match="unfinished run; pass --resume"):
        run(cfg)
    resumed = run(cfg, resume=True)
    for key in ("acc_matrix", "acc_matrix_task_aware", "initial_acc_task_aware", "stored_bytes"):
        assert resumed[key] == full[key], key
    events = [json.loads(line)["event"] for line in (cfg.run_dir() / "log.jsonl").read_text().splitlines()]
    assert events.count("eval") == 3 and "resume" in events


def test_resume_with_a_changed_config_is_refused(tmp: Path, shared_cache: Path):
    base = tiny_config(tmp, cache_dir=str(shared_cache))
    run(parse_run_config(base), stop_after=1)
    changed = parse_run_config({**base, "train": {**base["train"], "epochs": 3}})
    with pytest.raises(RunDirError, match=r"holds an unfinished run of another config \(train.epochs: 2 -> 3\); pass --overwrite"):
        run(changed, resume=True)


@pytest.mark.parametrize("strategy", ["er", "generative_classifier", "er_task_aware"])
def test_online_scenario_single_pass_and_anytime_accuracy(tmp: Path, shared_cache: Path, monkeypatch, strategy: str):
    cfg = parse_run_config(tiny_config(tmp, cache_dir=str(shared_cache), train={"epochs": 1}, strategy={"name": strategy, "memory_size": 24},
                                       benchmark={"scenario": "online", "online": {"batch_size": 10, "eval_every": 20, "eval_test_per_class": 5}}))
    from cl.registry import STRATEGIES

    cls = STRATEGIES.get(strategy)
    seen: list[torch.Tensor] = []
    original = cls.observe

    def spy(self, x, y, task_id):
        seen.append(x.clone())
        return original(self, x, y, task_id)

    monkeypatch.setattr(cls, "observe", spy)
    m = run(cfg)
    rows = torch.cat(seen)
    assert all(len(x) <= 10 for x in seen)
    assert len(rows) == 180  # 6 classes x 30 samples, each exactly once
    stream = torch.cat([e.train.x for e in prepare(cfg).bench.experiences])
    assert torch.equal(torch.unique(rows, dim=0), torch.unique(stream, dim=0))
    assert m["anytime"]["samples"] == list(range(20, 181, 20))
    assert m["avg_anytime_acc"] == pytest.approx(sum(m["anytime"]["acc"]) / 9)
    assert (cfg.run_dir() / "plots" / "anytime.png").is_file()


def test_task_incremental_scenario(tmp: Path, shared_cache: Path):
    m = run(parse_run_config(tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "finetune", "lr": 0.05},
                                         benchmark={"scenario": "task_incremental"})))
    assert m["scenario"] == "task_incremental"
    til, cil = m["acc_matrix_task_aware"], m["acc_matrix"]
    assert all(til[i][j] >= cil[i][j] - 1e-9 for i in range(3) for j in range(i + 1))  # a sub-argmax can only help


def test_cumulative_policy_feeds_all_seen_data(tmp: Path, shared_cache: Path, monkeypatch):
    from cl.strategies.joint import Joint

    labels: list[set[int]] = []

    def spy(self, x, y, task_id):
        labels[-1].update(y.tolist())
        return {"loss": 0.0}

    monkeypatch.setattr(Joint, "observe", spy)
    original_before = Joint.before_experience

    def before(self, exp):
        labels.append(set())
        original_before(self, exp)

    monkeypatch.setattr(Joint, "before_experience", before)
    run(parse_run_config(tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "joint"})))
    assert labels == [{0, 1}, {0, 1, 2, 3}, {0, 1, 2, 3, 4, 5}]


def test_nan_loss_stops_with_a_clear_error(tmp: Path, shared_cache: Path, monkeypatch, capsys):
    from cl.strategies.finetune import Finetune

    monkeypatch.setattr(Finetune, "observe", lambda self, x, y, t: {"loss": float("nan")})
    path = write_yaml(tmp / "cfg.yaml", tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "finetune"}))
    assert main(["run", str(path)]) == 1
    assert "loss term 'loss' became nan" in capsys.readouterr().err
    assert not (tmp / "runs" / "tiny" / "finetune" / "seed0" / "metrics.json").exists()


@pytest.mark.parametrize("keep, left", [("all", ["last.pt", "prev.pt"]), ("last", ["last.pt"]), ("none", [])])
def test_keep_checkpoints_prunes_only_after_the_run_finished(tmp: Path, shared_cache: Path, keep: str, left: list[str]):
    from cl.engine.rundir import planned_state

    data = tiny_config(tmp, cache_dir=str(shared_cache), train={"epochs": 1, "batch_size": 16, "keep_checkpoints": keep})
    cfg = parse_run_config(data)
    assert run(cfg, stop_after=2) is None  # unfinished: both checkpoints stay, whatever keep says
    assert sorted(p.name for p in (cfg.run_dir() / "ckpt").glob("*.pt")) == ["last.pt", "prev.pt"]
    metrics = run(cfg, resume=True)
    assert sorted(p.name for p in (cfg.run_dir() / "ckpt").glob("*.pt")) == left
    # the setting is not part of the run's identity: the finished run is the same run under any value
    for other in ("all", "last", "none"):
        again = parse_run_config({**data, "train": {**data["train"], "keep_checkpoints": other}})
        assert again.run_dir() == cfg.run_dir() and planned_state(again)[0] == "finished"
    assert run(cfg, resume=True)["final_acc"] == metrics["final_acc"]  # reported as is, checkpoints or not
