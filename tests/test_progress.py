"""Live progress: one line per epoch and per experience when piped, bars on a terminal, nothing
with ``progress: false``; the log and the results do not depend on it."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from cl.config import parse_run_config
from cl.engine import progress
from cl.engine.loop import run
from cl.engine.progress import Progress
from cl.engine.sweep import execute
from tests.conftest import tiny_config


def _cfg(tmp: Path, shared_cache: Path, **kw):
    return tiny_config(tmp, cache_dir=str(shared_cache), **kw)


def test_piped_output_has_one_line_per_epoch_and_experience(tmp: Path, shared_cache: Path, capsys: pytest.CaptureFixture):
    metrics = run(parse_run_config(_cfg(tmp, shared_cache, progress=True, train={"epochs": 2, "batch_size": 16})))
    lines = capsys.readouterr().err.strip().splitlines()
    epoch = [line for line in lines if " epoch " in line]
    exps = [line for line in lines if re.search(r"experience \d/3: accuracy", line)]
    assert len(epoch) == 3 * 2 and len(exps) == 3
    # e.g. "[tiny/er/seed0] experience 2/3 epoch 1/2: 4 steps, loss 1.2345, 812 samples/s, 0.1 s"
    pattern = r"\[tiny/er/seed0\] experience (\d)/3 epoch (\d)/2: (\d+) steps, loss (\d+\.\d{4}), \d+ samples/s, \d+\.\d\d s"
    assert all(re.fullmatch(pattern, line) for line in epoch), epoch
    # the printed loss is the epoch's mean of the summed loss terms, as in log.jsonl
    run_dir = parse_run_config(_cfg(tmp, shared_cache)).run_dir()
    log = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    logged = [e for e in log if e["event"] == "epoch"]
    for line, entry in zip(epoch, logged):
        steps, loss = re.fullmatch(pattern, line).group(3, 4)  # type: ignore[union-attr]
        assert int(steps) == entry["steps"]
        terms = sum(v for k, v in entry.items() if k not in ("event", "time", "experience", "epoch", "steps"))
        assert float(loss) == pytest.approx(terms, abs=1e-4)
    evals = [e["acc_seen_classes"] for e in log if e["event"] == "eval"]
    assert [float(line.rsplit(" ", 1)[1]) for line in exps] == pytest.approx(evals, abs=1e-4)
    assert evals[-1] == pytest.approx(metrics["final_acc"], abs=1e-9)


def test_progress_false_prints_nothing_and_results_do_not_change(tmp: Path, shared_cache: Path, capsys: pytest.CaptureFixture):
    quiet = run(parse_run_config(_cfg(tmp / "a", shared_cache)))
    assert capsys.readouterr().err == ""
    loud = run(parse_run_config(_cfg(tmp / "b", shared_cache, progress=True)))
    assert capsys.readouterr().err.count("\n") >= 6
    assert quiet["final_acc"] == loud["final_acc"] and quiet["acc_matrix"] == loud["acc_matrix"]


def test_sweep_runs_are_quiet_when_piped_but_slurm_tasks_are_not(tmp: Path, shared_cache: Path, capsys: pytest.CaptureFixture):
    data = _cfg(tmp / "s", shared_cache, progress=True)
    assert execute(data)["ok"]
    assert capsys.readouterr().err == "" and progress.PIPED_LINES  # restored after the run
    data = _cfg(tmp / "t", shared_cache, progress=True)
    assert execute(data, lines=True)["ok"]
    assert "epoch 1/" in capsys.readouterr().err and progress.PIPED_LINES


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_nested_bars_with_loss_and_throughput():
    out = _Tty()
    p = Progress("x", 2, enabled=True, stream=out)
    p.start_epoch(0, 0, 1, steps=3)
    for loss in (3.0, 2.0, 1.0):
        p.step(8, {"ce": loss})
    shown = str(p.batch_bar)  # the running mean and throughput, updated on steps 1, 11, ... and the last
    assert p.batch_bar.n == 3 and "loss=2.0000" in shown and "samples_s=" in shown
    p.end_epoch()
    p.end_experience(0, 0.5)
    p.close()
    text = out.getvalue()
    assert "exp 1/2 epoch 1/1" in text and "acc=0.500" in text
    assert "[x]" not in text  # no piped lines on a terminal
