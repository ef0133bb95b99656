"""SLURM through submitit: the same runs as a serial sweep (served here by submitit's local
executor), requeue on preemption resumes instead of overwriting, and no SLURM = one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cl.cli import main
from tests.test_sweep import STRATS, suite_files

submitit = pytest.importorskip("submitit")


def test_slurm_executor_matches_a_serial_sweep(tmp: Path, shared_cache: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CL_SUBMITIT_CLUSTER", "local")
    path = suite_files(tmp, shared_cache, STRATS)
    assert main(["sweep", str(path), "--executor", "slurm", "--slurm-cpus", "1", "--out", str(tmp / "slurm"), "--set", "num_threads=1"]) == 0
    assert main(["sweep", str(path), "--out", str(tmp / "ser"), "--set", "num_threads=1"]) == 0
    for run in ("ft/seed0", "ft/seed1", "ncm/seed0", "ncm/seed1"):
        a = json.loads((tmp / "slurm" / "s" / run / "metrics.json").read_text())
        b = json.loads((tmp / "ser" / "s" / run / "metrics.json").read_text())
        assert a["acc_matrix"] == b["acc_matrix"], run
    jobs = tmp / "slurm" / "s" / ".submitit"
    assert jobs.is_dir() and any(jobs.rglob("*.out"))  # job files and logs stay inside the output directory
    outcomes = json.loads((tmp / "slurm" / "s" / "outcomes.json").read_text())
    assert len(outcomes) == 4 and all(o["ok"] for o in outcomes)


def test_a_preempted_run_is_requeued_as_a_resume():
    from cl.engine.slurm import _runner
    from cl.engine.sweep import execute

    runner = _runner(execute)
    again = runner.checkpoint({"experiment": "x"}, True, 4)  # preempted while overwriting
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert again.args == ({"experiment": "x"}, False, 4)  # resumes from its checkpoint, never overwrites again


def test_no_slurm_is_a_one_line_error(tmp: Path, shared_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    if shutil.which("sbatch"):
        pytest.skip("this machine has SLURM")
    monkeypatch.delenv("CL_SUBMITIT_CLUSTER", raising=False)
    path = suite_files(tmp, shared_cache, STRATS)
    assert main(["sweep", str(path), "--executor", "slurm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no SLURM here (sbatch not found)" in err[0]
    assert not (tmp / "runs").exists()
    assert main(["sweep", str(path), "--executor", "slurm", "--slurm-time", "0"]) == 2
    assert "--slurm-time" in capsys.readouterr().err
