"""Loggers: TensorBoard, W&B (offline) and MLflow (local sqlite) mirror log.jsonl; each is read back
with its own library's reader (W&B's by its record format), and a failing one never ends a run."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from cl.api import load_config, run
from cl.config import parse_run_config
from cl.engine.loggers import scalars_of
from tests.conftest import tiny_config

LOGGERS = {"tensorboard": True, "wandb": {"project": "cltest"}, "mlflow": {}}


def test_scalars_of_each_event_hand_computed():
    assert scalars_of("epoch", {"experience": 2, "epoch": 1, "steps": 8, "loss": 0.5, "replay": 0.25}, epochs=3) == (
        {"train/loss": 0.5, "train/replay": 0.25}, 2 * 3 + 1)
    assert scalars_of("epoch", {"experience": 0, "epoch": 0, "steps": None}, epochs=3) is None  # trains_itself: no losses
    assert scalars_of("epoch", {"experience": 0, "epoch": 0, "steps": 4, "loss": float("nan"), "n": True}, epochs=1) is None
    assert scalars_of("eval", {"experience": 1, "acc_cil": [0.5, 0.25], "acc_seen_classes": 0.4, "val_acc_seen_classes": 0.45},
                      epochs=1) == ({"eval/acc_seen_classes": 0.4, "eval/val_acc_seen_classes": 0.45}, 2)
    assert scalars_of("anytime", {"samples": 500, "acc": 0.7, "experience": 0}, epochs=1) == ({"anytime/acc": 0.7}, 500)
    assert scalars_of("run_start", {"run_dir": "x"}, epochs=1) is None


def wandb_key(item) -> str:  # noqa: ANN001 - keys with '/' are stored as a nested key
    return item.key or "/".join(item.nested_key)


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B ``.wandb`` file: a 7-byte header, then 32 KiB blocks of records,
    each a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and its payload."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = payload if kind == 2 else buf + payload
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


@pytest.fixture
def quiet_home(tmp, monkeypatch):
    """HOME and the working directory are empty folders: a logger writing outside the run shows up there."""
    home, cwd = tmp / "home", tmp / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_DIR", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    yield home, cwd
    # (matplotlib's font cache and Avalanche's ~/.avalanche/config.json are written by those libraries
    # on import, loggers or not; README "Reliability" says so)
    strays = [str(p.relative_to(home)) for p in home.rglob("*") if any(w in p.name.lower() for w in ("wandb", "mlflow", "mlruns", "tensorboard", "netrc"))]
    assert not strays, strays
    assert not any(cwd.iterdir()), sorted(p.name for p in cwd.iterdir())


def test_three_loggers_read_back_what_log_jsonl_says(tmp, quiet_home):
    cfg = tiny_config(tmp, loggers=LOGGERS)
    metrics = run(cfg)
    run_dir = Path(metrics["run_dir"])
    events = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    epochs = [e for e in events if e["event"] == "epoch"]
    evals = [e for e in events if e["event"] == "eval"]
    expected_loss = {e["experience"] * 2 + e["epoch"]: e["loss"] for e in epochs}  # train.epochs = 2
    expected_acc = {e["experience"] + 1: e["acc_seen_classes"] for e in evals}
    assert len(expected_loss) == 6 and len(expected_acc) == 3

    # TensorBoard, by its own event reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert {s.step: pytest.approx(s.value) for s in acc.Scalars("train/loss")} == {k: pytest.approx(v) for k, v in expected_loss.items()}
    assert {s.step: s.value for s in acc.Scalars("eval/acc_seen_classes")} == pytest.approx(expected_acc)
    assert acc.Scalars("final/final_acc")[0].value == pytest.approx(metrics["final_acc"])

    # W&B offline: history rows and the summary, from the run file
    wandb_id = (run_dir / "wandb_run_id").read_text().strip()
    runs = list((tmp / "runs" / ".wandb" / "wandb").glob(f"offline-run-*-{wandb_id}/run-{wandb_id}.wandb"))
    assert len(runs) == 1
    history, summary, config = [], {}, {}
    for record in wandb_records(runs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({wandb_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({wandb_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "run":
            config.update({wandb_key(i): json.loads(i.value_json) for i in record.run.config.update})
    assert {h["step"]: h["train/loss"] for h in history if "train/loss" in h} == pytest.approx(expected_loss)
    assert {h["step"]: h["eval/acc_seen_classes"] for h in history if "eval/acc_seen_classes" in h} == pytest.approx(expected_acc)
    assert summary["final_acc"] == pytest.approx(metrics["final_acc"])
    assert config["strategy.name"] == "er" and config["seed"] == 0
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # pointed at OUT_DIR/.wandb for the run only
        assert var not in os.environ

    # MLflow: one sqlite database under out_dir
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    mrun = client.get_run(run_id)
    assert mrun.info.status == "FINISHED" and mrun.data.params["strategy.name"] == "er"
    assert mrun.data.tags["run_dir"] == str(run_dir.absolute())
    assert {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")} == pytest.approx(expected_loss)
    assert mrun.data.metrics["final/final_acc"] == pytest.approx(metrics["final_acc"])
    assert client.get_experiment(mrun.info.experiment_id).name == "tiny"

    # cl compare over the out_dir finds the run, not W&B's files in OUT_DIR/.wandb
    from cl.analysis.report import discover_runs

    assert [r.path for r in discover_runs([tmp / "runs"])] == [run_dir]


def test_loggers_are_not_part_of_a_runs_identity(tmp):
    from cl.engine.rundir import result_hash

    assert result_hash(parse_run_config(tiny_config(tmp, loggers=LOGGERS))) == result_hash(parse_run_config(tiny_config(tmp)))


def test_a_resumed_run_continues_the_same_tracker_runs(tmp, quiet_home):
    from cl.engine.loop import run as run_loop
    from mlflow.tracking import MlflowClient

    cfg = load_config(tiny_config(tmp, loggers={"mlflow": {}, "wandb": {}}))
    assert run_loop(cfg, stop_after=1) is None
    run_dir = cfg.run_dir()
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "KILLED"  # stopped, resumable
    run_loop(cfg, resume=True)
    assert (run_dir / "mlflow_run_id").read_text().strip() == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "eval/acc_seen_classes")) == [1, 2, 3]
    wandb_ids = {p.name.rsplit("-", 1)[-1] for p in (tmp / "runs" / ".wandb" / "wandb").glob("offline-run-*")}
    assert wandb_ids == {(run_dir / "wandb_run_id").read_text().strip()}  # one W&B run, written in two sittings


def test_a_failing_logger_warns_once_and_the_run_finishes(tmp, quiet_home, monkeypatch):
    from cl.engine import loggers

    def broken(self, values, step):
        raise RuntimeError("database is locked")

    monkeypatch.setattr(loggers.MLflow, "scalars", broken)
    with pytest.warns(UserWarning, match=r"logger mlflow failed \(RuntimeError: database is locked\); it is off for the rest of this run"):
        metrics = run(tiny_config(tmp, loggers={"mlflow": {}, "tensorboard": True}))
    run_dir = Path(metrics["run_dir"])
    events = [json.loads(line)["event"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert events.count("logger_failed") == 1 and events[-1] == "run_end"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert len(acc.Scalars("train/loss")) == 6  # the other logger kept going


def test_a_logger_that_is_not_installed_is_refused_before_anything_is_written(tmp, monkeypatch):
    import sys

    from cl.errors import ConfigError

    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # import fails as if absent
    with pytest.raises(ConfigError, match=r"^loggers.mlflow: mlflow.tracking is not installed \(pip install mlflow-skinny"):
        run(tiny_config(tmp, loggers={"mlflow": {}}))
    assert not (tmp / "runs").exists()


def test_logger_config_is_strict(tmp):
    from cl.errors import ConfigError

    with pytest.raises(ConfigError, match="loggers.wandb.mode"):
        parse_run_config(tiny_config(tmp, loggers={"wandb": {"mode": "cloud"}}))
    with pytest.raises(ConfigError, match="loggers.comet"):
        parse_run_config(tiny_config(tmp, loggers={"comet": True}))


def test_mlflow_writes_no_telemetry_into_home(tmp):
    """MLflow 3 records an installation id in ~/.config/mlflow unless told not to (it keeps quiet under
    pytest or CI by itself, so the run here is a subprocess with those variables removed)."""
    import subprocess
    import sys

    import yaml

    home, cwd = tmp / "home", tmp / "cwd"
    home.mkdir()
    cwd.mkdir()
    (tmp / "run.yaml").write_text(yaml.safe_dump(tiny_config(tmp, loggers={"mlflow": {}})))
    quiet = {"PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"}
    env = {k: v for k, v in os.environ.items() if k not in quiet and not k.startswith("PYTEST")}
    env["HOME"] = str(home)
    out = subprocess.run([sys.executable, "-m", "cl", "run", str(tmp / "run.yaml")], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    assert not [p for p in home.rglob("*") if "mlflow" in p.name.lower()]
    assert not any(cwd.iterdir())


def test_ctrl_c_marks_the_tracker_run_stopped_not_failed(tmp, quiet_home, monkeypatch):
    from mlflow.tracking import MlflowClient

    from cl.engine.loop import run as run_loop
    from cl.strategies.er import ER

    calls = {"n": 0}
    observe = ER.observe

    def interrupted(self, x, y, t):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return observe(self, x, y, t)

    monkeypatch.setattr(ER, "observe", interrupted)
    cfg = load_config(tiny_config(tmp, loggers={"mlflow": {}}))
    with pytest.raises(KeyboardInterrupt):
        run_loop(cfg)
    run_id = (cfg.run_dir() / "mlflow_run_id").read_text().strip()
    assert MlflowClient(tracking_uri=f"sqlite:///{tmp / 'runs' / 'mlflow.db'}").get_run(run_id).info.status == "KILLED"
