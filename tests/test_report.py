"""Aggregation over seeds on fake run directories, including a missing seed and a failed run."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from cl.analysis.report import Stats, aggregate, discover_runs, scalars, write_report
from cl.cli import main


def fake_run(root: Path, name: str, seed: int, final_acc: float | None, scenario: str = "class_incremental") -> Path:
    run_dir = root / "exp" / name / f"seed{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"experiment": "exp", "run_name": name, "seed": seed, "strategy": {"name": name}}))
    if final_acc is not None:
        R = [[0.9, None], [final_acc - 0.1, final_acc + 0.1]]
        metrics = {
            "experiment": "exp", "run": name, "strategy": name, "seed": seed, "scenario": scenario,
            "acc_matrix": R, "acc_matrix_task_aware": R, "n_test_per_task": [10, 10],
            "final_acc": final_acc, "avg_incremental_acc": (0.9 + final_acc) / 2, "forgetting": 1.0 - final_acc,
            "bwt": final_acc - 1.0, "fwt": None, "wall_time_s": 2.0 + seed, "trainable_params": 100, "stored_bytes": [10, 20],
            "memory_bytes": 5, "task_aware": {"final_acc": final_acc + 0.05}, "backbone": {"sha256": "x"},
        }
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


def test_stats_mean_std_ci_by_hand():
    s = Stats([0.5, 0.6, 0.7])
    assert s.mean == pytest.approx(0.6) and s.std == pytest.approx(0.1)
    lo, hi = s.ci95
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t_{0.975, 2}
    assert (lo, hi) == (pytest.approx(0.6 - half), pytest.approx(0.6 + half))
    assert Stats([0.4]).ci95 is None and Stats([0.4]).format(100, ".1f") == "40.0"
    assert Stats([0.5, 0.7]).format(100, ".1f") == "60.0 ± 14.1"


def test_scalars_flatten_nested_and_skip_lists():
    flat = scalars({"final_acc": 0.5, "task_aware": {"final_acc": 0.7, "fwt": None}, "acc_matrix": [[1]], "seed": 3, "backbone": {"n": 1},
                    "stored_bytes": [4, 9], "memory_bytes": 1})
    assert flat == {"final_acc": 0.5, "task_aware.final_acc": 0.7, "memory_bytes": 1.0, "stored_bytes_total": 10.0}


def test_discovery_aggregation_missing_seed_and_failed_run(tmp: Path):
    for seed, acc in ((0, 0.6), (1, 0.7), (2, 0.8)):
        fake_run(tmp, "er", seed, acc)
    fake_run(tmp, "ft", 0, 0.2)
    fake_run(tmp, "ft", 1, 0.3)
    fake_run(tmp, "ft", 2, None)  # started, never finished
    (tmp / "outcomes.json").write_text(json.dumps([
        {"run_dir": str(tmp / "exp" / "ft" / "seed2"), "experiment": "exp", "run": "ft", "seed": 2, "ok": False, "error": "DataError: boom"},
        {"run_dir": str(tmp / "exp" / "ncm" / "seed0"), "experiment": "exp", "run": "ncm", "seed": 0, "ok": False, "error": "ConfigError: nope"},
    ]))
    records = discover_runs([tmp])
    status = {(r.name, r.seed): r.status for r in records}
    assert status[("er", 2)] == "finished" and status[("ft", 2)] == "failed" and status[("ncm", 0)] == "failed"
    er = aggregate([r for r in records if r.name == "er"])
    assert er["final_acc"].mean == pytest.approx(0.7) and er["final_acc"].n == 3
    assert er["task_aware.final_acc"].mean == pytest.approx(0.75)
    text = write_report(records, tmp / "report", "fake")
    summary = (tmp / "report" / "summary.md").read_text()
    assert "| er | 3 | 70.0 ± 10.0 [" in summary
    assert "ft: aggregated over 2 seed(s); missing seed(s) 2" in summary
    assert "ft seed 2: failed (DataError: boom)" in summary and "ncm seed 0: failed (ConfigError: nope)" in summary
    assert "er " in text
    rows = {(r["run"], r["metric"]): r for r in csv.DictReader(open(tmp / "report" / "metrics_long.csv"))}
    assert rows[("er", "final_acc")]["n"] == "3" and float(rows[("er", "final_acc")]["mean"]) == pytest.approx(0.7)
    assert float(rows[("er", "final_acc")]["ci95_low"]) == pytest.approx(0.7 - 4.302652729911275 * 0.1 / math.sqrt(3))
    for name in ("report.html", "summary.csv", "plots/exp_forgetting_curves.png", "plots/exp_cost.png"):
        assert (tmp / "report" / name).is_file(), name
    # summary.csv: numbers, one column per statistic, readable by any CSV reader
    summary_rows = {r["strategy"]: r for r in csv.DictReader(open(tmp / "report" / "summary.csv"))}
    er_row, ft_row = summary_rows["er"], summary_rows["ft"]
    assert er_row["experiment"] == "exp" and er_row["seeds"] == "3" and er_row["accuracy"] == "class-incremental"
    assert float(er_row["final_acc_mean"]) == pytest.approx(0.7) and float(er_row["final_acc_std"]) == pytest.approx(0.1)
    assert float(er_row["final_acc_ci95_high"]) == pytest.approx(0.7 + 4.302652729911275 * 0.1 / math.sqrt(3))
    assert float(er_row["forgetting_mean"]) == pytest.approx(0.3) and float(er_row["final_new_acc_mean"]) == pytest.approx(0.8)
    assert float(er_row["wall_time_s_mean"]) == pytest.approx(3.0) and float(er_row["stored_bytes_total_mean"]) == 25  # last stored_bytes + memory_bytes
    assert ft_row["seeds"] == "2" and float(ft_row["final_acc_mean"]) == pytest.approx(0.25)
    assert er_row["avg_anytime_acc_mean"] == "" and er_row["avg_anytime_acc_n"] == ""  # not an online run: empty, not 0


def test_task_incremental_runs_are_compared_task_aware(tmp: Path):
    fake_run(tmp, "a", 0, 0.5, scenario="task_incremental")
    text = write_report(discover_runs([tmp]), tmp / "r")
    assert "55.0" in text  # task_aware.final_acc = 0.55


def test_cli_compare(tmp: Path, capsys):
    fake_run(tmp / "runs", "er", 0, 0.6)
    assert main(["compare", str(tmp / "runs"), "--out", str(tmp / "rep")]) == 0
    assert (tmp / "rep" / "report.html").is_file()
    assert main(["compare", str(tmp / "nothing")]) == 2
    assert "no run directories found" in capsys.readouterr().err


def test_paired_difference_to_a_baseline_by_hand(tmp: Path, capsys):
    for seed, (er, ta) in enumerate([(0.60, 0.64), (0.70, 0.73), (0.80, 0.85)]):
        fake_run(tmp / "runs", "er", seed, er)
        fake_run(tmp / "runs", "ta", seed, ta)
    fake_run(tmp / "runs", "ft", 0, 0.2)  # one shared seed: a difference, no interval
    fake_run(tmp / "runs", "ft", 7, 0.3)  # a seed the baseline lacks is not paired
    assert main(["compare", str(tmp / "runs"), "--out", str(tmp / "rep"), "--baseline", "er"]) == 0
    rows = {r["strategy"]: r for r in csv.DictReader(open(tmp / "rep" / "paired.csv"))}
    # ta - er per seed: 4, 3, 5 points -> mean 4, std 1, half-width t_{0.975,2} * 1 / sqrt(3) = 2.48
    assert rows["ta"]["paired seeds"] == "3" and rows["ta"]["delta final_acc (pts) [95% CI]"] == "+4.0 [+1.5, +6.5] *"
    assert rows["ta"]["delta forgetting (pts) [95% CI]"] == "-4.0 [-6.5, -1.5] *"  # fake forgetting = 1 - final acc
    assert rows["ft"]["paired seeds"] == "1" and rows["ft"]["delta final_acc (pts) [95% CI]"] == "-40.0"
    assert "Paired difference to er" in (tmp / "rep" / "summary.md").read_text()
    capsys.readouterr()
    assert main(["compare", str(tmp / "runs"), "--out", str(tmp / "rep2"), "--baseline", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no row named 'nope'" in err and not (tmp / "rep2").exists()


def test_a_metric_missing_in_some_runs_says_over_how_many_it_is_taken(tmp: Path, capsys):
    for seed in range(3):
        fake_run(tmp / "runs", "er", seed, 0.6 + 0.1 * seed)
        fake_run(tmp / "runs", "ta", seed, 0.7)
    damaged = tmp / "runs" / "exp" / "ta" / "seed2" / "metrics.json"
    damaged.write_text(damaged.read_text().replace('"final_acc": 0.7,', '"final_acc": NaN,'))
    assert main(["compare", str(tmp / "runs"), "--out", str(tmp / "rep"), "--baseline", "er"]) == 0
    summary = (tmp / "rep" / "summary.md").read_text()
    assert "| ta | 3 | 70.0 ± 0.0 [70.0, 70.0] (n=2) |" in summary
    rows = {r["strategy"]: r for r in csv.DictReader(open(tmp / "rep" / "paired.csv"))}
    assert rows["ta"]["delta final_acc (pts) [95% CI]"].startswith("+5.0 (n=2) [")


def test_a_baseline_absent_from_one_experiment_is_noted(tmp: Path, capsys):
    fake_run(tmp / "runs", "er", 0, 0.6)
    other = fake_run(tmp / "runs2", "ta", 0, 0.7)
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    (other / "config.yaml").write_text(yaml.safe_dump({**cfg, "experiment": "exp2"}))
    metrics = json.loads((other / "metrics.json").read_text())
    (other / "metrics.json").write_text(json.dumps({**metrics, "experiment": "exp2"}))
    assert main(["compare", str(tmp / "runs"), str(tmp / "runs2"), "--out", str(tmp / "rep"), "--baseline", "er"]) == 0
    assert "no row named 'er' in exp2: no paired differences" in (tmp / "rep" / "summary.md").read_text()


def test_rows_of_another_scenario_are_not_paired_with_the_baseline(tmp: Path, capsys):
    fake_run(tmp / "runs", "ci", 0, 0.5)
    fake_run(tmp / "runs", "ti", 0, 0.5, scenario="task_incremental")
    assert main(["compare", str(tmp / "runs"), "--out", str(tmp / "rep"), "--baseline", "ci"]) == 0
    rows = {r["strategy"]: r for r in csv.DictReader(open(tmp / "rep" / "paired.csv"))}
    assert rows["ti"]["delta final_acc (pts) [95% CI]"] == "not comparable: task_incremental vs class_incremental"


def test_old_and_new_accuracy_are_shown_and_derived_for_runs_made_before_they_existed(tmp: Path):
    fake_run(tmp / "runs", "er", 0, 0.6)  # its metrics.json predates final_old_acc: derived from the matrix
    text = write_report(discover_runs([tmp / "runs"]), tmp / "rep")
    assert "old / new acc (%)" in text and "50.0 / 70.0" in text


@pytest.mark.parametrize("seeds", [[0], [0, 1, 2]])
def test_report_figures_tables_and_links_for_one_and_several_seeds(tmp: Path, seeds):
    import re
    import warnings

    for seed in seeds:
        fake_run(tmp / "runs", "er", seed, 0.6 + 0.01 * seed)
        zero = fake_run(tmp / "runs", "ncm", seed, 0.5)
        metrics = json.loads((zero / "metrics.json").read_text())
        (zero / "metrics.json").write_text(json.dumps({**metrics, "trainable_params": 0}))  # drawn at 0, not at 10^0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no matplotlib or numpy warning on one seed (no std, no CI) either
        write_report(discover_runs([tmp / "runs"]), tmp / "report", title="exp", formats=["svg", "pdf"])
    plots = sorted(p.name for p in (tmp / "report" / "plots").iterdir())
    for stem in ("exp_forgetting_curves", "exp_acc_matrices", "exp_cost"):
        assert {f"{stem}.png", f"{stem}.svg", f"{stem}.pdf"} <= set(plots)
    assert (tmp / "report" / "plots" / "exp_cost.svg").read_text().lstrip().startswith("<?xml")
    md = (tmp / "report" / "summary.md").read_text()
    assert md.count("exp") >= 1 and "\n## exp\n" not in md  # the title once, not again as the one experiment's heading
    assert "Student-t 95% confidence interval of the mean" in md
    # the configuration table: the key in which the rows differ, and a link per seed that leads to the run
    assert "| strategy | strategy.name | runs |" in md
    links = re.findall(r"\[seed(\d)\]\(([^)]+)\)", md)
    assert len(links) == 2 * len(seeds)
    for seed, href in links:
        target = (tmp / "report" / href).resolve()
        assert target.name == f"seed{seed}" and (target / "metrics.json").is_file()
    page = (tmp / "report" / "report.html").read_text()
    assert page.count("<h1>") == 1 and "<h2>" not in page and "href='../runs/exp/er/seed0/'" in page


def test_report_refuses_an_unknown_figure_format(tmp: Path):
    fake_run(tmp / "runs", "er", 0, 0.6)
    with pytest.raises(ValueError, match="unknown figure format 'jpg'"):
        write_report(discover_runs([tmp / "runs"]), tmp / "report", formats=["jpg"])
    assert main(["compare", str(tmp / "runs"), "--out", str(tmp / "r2"), "--format", "svg"]) == 0
    assert (tmp / "r2" / "plots" / "exp_cost.svg").is_file()


def test_online_comparison_marks_experience_boundaries_when_runs_agree(tmp: Path):
    import warnings

    for name in ("er", "gc"):
        run_dir = fake_run(tmp / "runs", name, 0, 0.6)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        metrics.update(scenario="online", n_train_per_task=[40, 20],
                       anytime={"samples": [10, 20, 30, 40, 50, 60], "acc": [0.9, 0.9, 0.8, 0.8, 0.7, 0.6], "experience": [0, 0, 0, 0, 1, 1]})
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    from cl.analysis import plots

    drawn = []
    original = plots._boundaries
    plots._boundaries = lambda ax, bounds: (drawn.append(list(bounds)), original(ax, bounds))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            write_report(discover_runs([tmp / "runs"]), tmp / "report")
    finally:
        plots._boundaries = original
    assert drawn == [[40]]  # the second experience starts after the first's 40 stream samples
    bad = json.loads((tmp / "runs" / "exp" / "gc" / "seed0" / "metrics.json").read_text())
    (tmp / "runs" / "exp" / "gc" / "seed0" / "metrics.json").write_text(json.dumps({**bad, "n_train_per_task": ["40", 20]}))
    with pytest.warns(UserWarning, match="n_train_per_task is not a list of positive counts"):
        discover_runs([tmp / "runs"])
