"""Comparing runs: aggregate every scalar of metrics.json over seeds, tables, plots and an HTML report.

``cl compare RUN_DIR...`` (and the end of every ``cl sweep``) finds run directories below the given
paths, groups them by experiment and run name, and writes:

* ``summary.md``: the headline metrics, mean ± std over seeds with the 95% confidence interval
  (Student t), one table per experiment; ``summary.csv``: the same as numbers (accuracies as
  fractions), one column per statistic (``final_acc_mean``, ``final_acc_std``, ``final_acc_n``,
  ``final_acc_ci95_low``, ...), for pandas or a spreadsheet;
* ``metrics_long.csv``: every numeric scalar of metrics.json (``task_aware.*`` included) with n,
  mean, std and CI;
* ``plots/``: forgetting curves with seed bands, mean accuracy-matrix heatmaps, anytime accuracy
  (online), layer-wise CKA over experiences (runs with probes), accuracy vs trainable parameters and
  vs stored bytes;
* ``report.html``: all of it in one self-contained file (plots embedded).

Unfinished and failed runs, and groups missing seeds, are listed rather than silently dropped.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from cl.analysis.metrics import incremental_accs
from cl.config import PLACEMENT_KEYS, VOLATILE_KEYS, flatten

# (column title, metrics key, scale, format)
HEADLINE = [
    ("final acc (%)", "final_acc", 100.0, ".1f"),
    ("avg inc acc (%)", "avg_incremental_acc", 100.0, ".1f"),
    ("old / new acc (%)", "final_old_acc", 100.0, ".1f"),  # stability / plasticity: rendered as one cell
    ("forgetting (%)", "forgetting", 100.0, ".1f"),
    ("BWT (%)", "bwt", 100.0, ".1f"),
    ("wall time (s)", "wall_time_s", 1.0, ".1f"),
]
ANYTIME = ("avg anytime acc (%)", "avg_anytime_acc", 100.0, ".1f")
COST = [("trainable params", "trainable_params", 1.0, ".0f"), ("stored bytes", "stored_bytes_total", 1.0, ".0f")]


@dataclass
class RunRecord:
    """One run directory (or a failed run that never got one)."""

    path: Path
    experiment: str
    name: str
    seed: int | None
    metrics: dict[str, Any] | None = None
    status: str = "finished"  # finished | unfinished | failed
    error: str | None = None
    config: dict[str, Any] | None = None  # what the result depends on, without seed and placement


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _run_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's result config (from run.json, else config.yaml), without placement keys."""
    config: Any = None
    marker = run_dir / "run.json"
    if marker.is_file():
        data = _read_json(marker)
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise ValueError("run.json holds no config")
        config = dict(data["config"])
        identity = data.get("identity") or {}
        config["data_fingerprint"] = identity.get("data")
        source = ((config.get("backbone") or {}).get("weights") or {}).get("source")
        if source in ("file", "hub"):  # given weights are identified by content (paths are not in the config)
            config["weights_sha256"] = identity.get("weights")
    elif (run_dir / "config.yaml").is_file():
        config = _read_yaml(run_dir / "config.yaml")
        if isinstance(config, dict):
            config = {k: v for k, v in config.items() if k not in VOLATILE_KEYS}
    if not isinstance(config, dict):
        return None
    return {k: v for k, v in config.items() if k not in PLACEMENT_KEYS}  # compare pools what differs only in these


def run_config_or_none(run_dir: Path) -> dict[str, Any] | None:
    """:func:`_run_config`, or None for a directory whose config cannot be read (a report still lists it)."""
    try:
        return _run_config(run_dir)
    except Exception:  # noqa: BLE001
        return None


def _read_yaml(path: Path) -> Any:
    from cl.yamlio import parse_yaml_text  # bounded: a hostile file is an error, not a hang

    return parse_yaml_text(path.read_text(encoding="utf-8"), str(path))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_metrics(m: Any) -> dict[str, Any]:
    """A metrics.json object with the types and shapes the report relies on, or ValueError naming what is off."""
    if not isinstance(m, dict):
        raise ValueError("metrics.json is not an object")
    n_test = m.get("n_test_per_task")
    if not isinstance(n_test, list) or not n_test or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in n_test):
        raise ValueError("n_test_per_task is not a list of positive counts")
    T = len(n_test)
    n_train = m.get("n_train_per_task")  # absent in runs made before it was recorded
    if n_train is not None and not (isinstance(n_train, list) and len(n_train) == T
                                    and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in n_train)):
        raise ValueError("n_train_per_task is not a list of positive counts, one per experience")
    for key in ("acc_matrix", "acc_matrix_task_aware"):
        R = m.get(key)
        if key == "acc_matrix" and R is None:
            raise ValueError("no acc_matrix")
        if R is not None and not (
            isinstance(R, list) and len(R) == T
            and all(isinstance(row, list) and len(row) == T and all(v is None or _is_number(v) for v in row) for row in R)
        ):
            raise ValueError(f"{key} is not a {T} x {T} matrix of accuracies")
    for key in ("experiment", "run", "scenario"):
        if key in m and not isinstance(m[key], str):
            raise ValueError(f"{key} is not a string")
    for key, value in m.items():
        if key in ("final_acc", "avg_incremental_acc", "forgetting", "bwt", "fwt", "wall_time_s", "trainable_params", "memory_bytes",
                   "avg_anytime_acc", "task_inference_acc") and not (value is None or _is_number(value)):
            raise ValueError(f"{key} is not a number")
    if "task_aware" in m and not (isinstance(m["task_aware"], dict) and all(v is None or _is_number(v) for k, v in m["task_aware"].items() if k in ("final_acc", "avg_incremental_acc", "forgetting", "bwt", "fwt"))):
        raise ValueError("task_aware is not an object of numbers")
    stored = m.get("stored_bytes")
    if stored is not None and not (isinstance(stored, list) and all(_is_number(b) for b in stored)):
        raise ValueError("stored_bytes is not a list of numbers")
    anytime = m.get("anytime")
    if anytime is not None:
        parts = [anytime.get(k) for k in ("samples", "acc", "experience")] if isinstance(anytime, dict) else [None]
        if not all(isinstance(p, list) and all(_is_number(v) for v in p) for p in parts) or len({len(p) for p in parts}) != 1:
            raise ValueError("anytime is not three lists of numbers of one length")
    return m


def _derive(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics added after a run was made, computed from its accuracy matrices the same way."""
    from cl.analysis.metrics import final_old_new_acc

    if "final_old_acc" in metrics:
        return metrics
    try:
        for where, key in ((metrics, "acc_matrix"), (metrics.get("task_aware"), "acc_matrix_task_aware")):
            if isinstance(where, dict) and metrics.get(key):
                old, new = final_old_new_acc(metrics[key], metrics["n_test_per_task"])
                where["final_old_acc"], where["final_new_acc"] = old, new
    except (KeyError, TypeError, ValueError):
        pass
    return metrics


def _record_from_dir(run_dir: Path) -> RunRecord:
    metrics = None
    if (run_dir / "metrics.json").is_file():
        metrics = _derive(check_metrics(_read_json(run_dir / "metrics.json")))
    cfg: dict[str, Any] = {}
    if (run_dir / "config.yaml").is_file():
        cfg = _read_yaml(run_dir / "config.yaml") or {}
        if not isinstance(cfg, dict):
            raise ValueError("config.yaml is not a mapping")
    experiment = (metrics or {}).get("experiment") or cfg.get("experiment") or run_dir.parent.parent.name
    name = (metrics or {}).get("run") or cfg.get("run_name") or (cfg.get("strategy") or {}).get("name") or run_dir.parent.name
    seed = (metrics or {}).get("seed", cfg.get("seed"))
    if not all(isinstance(v, str) for v in (experiment, name)) or not (seed is None or isinstance(seed, int)):
        raise ValueError("experiment, run name or seed of the wrong type")
    return RunRecord(run_dir, experiment, name, seed, metrics, "finished" if metrics else "unfinished", config=_run_config(run_dir))


def _unreadable(path: Path, err: Exception) -> None:
    warnings.warn(f"skipping {path}: unreadable ({type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''})", stacklevel=3)


def discover_runs(paths: Iterable[str | Path]) -> list[RunRecord]:
    """Run directories (holding config.yaml or metrics.json) below ``paths``, plus failures listed
    in sweep ``outcomes.json`` files. Each directory counts once however often it is reached;
    unreadable ones are skipped with one warning line each."""
    found: dict[Path, RunRecord] = {}
    failures: list[dict[str, Any]] = []
    for root in map(Path, paths):
        candidates = [root] if (root / "config.yaml").is_file() or (root / "metrics.json").is_file() else []
        # not below hidden folders (OUT_DIR/.wandb holds W&B's own config.yaml files) nor checkpoints
        found_below = [p.parent for name in ("config.yaml", "metrics.json") for p in root.rglob(name)]
        candidates += [d for d in found_below if not any(part.startswith(".") or part == "ckpt" for part in d.relative_to(root).parts)]
        for run_dir in candidates:
            key = run_dir.resolve()
            if key in found:
                continue
            try:
                found[key] = _record_from_dir(run_dir)
            except Exception as err:  # noqa: BLE001 - one bad directory must not hide the others
                found[key] = None  # type: ignore[assignment]
                _unreadable(run_dir, err)
        for outcomes in root.rglob("outcomes.json"):
            try:
                listed = _read_json(outcomes)
                if not isinstance(listed, list) or not all(isinstance(o, dict) and isinstance(o.get("run_dir"), str) for o in listed):
                    raise ValueError("not a list of run outcomes")
            except Exception as err:  # noqa: BLE001
                _unreadable(outcomes, err)
                continue
            failures += [o for o in listed if not o.get("ok")]
    records = {k: v for k, v in found.items() if v is not None}
    for f in failures:
        path = Path(f["run_dir"]).resolve()
        if path in found and found[path] is None:
            continue
        rec = records.get(path)
        if rec is None:  # failed before its directory was created
            seed = f.get("seed") if isinstance(f.get("seed"), int) else None
            rec = records[path] = RunRecord(path, str(f.get("experiment") or path.parent.parent.name), str(f.get("run") or path.parent.name), seed, status="unfinished")
        if rec.status != "finished":
            rec.status, rec.error = "failed", str(f.get("error"))
    return sorted(records.values(), key=lambda r: (r.experiment, r.name, r.seed if r.seed is not None else -1, str(r.path)))


def scalars(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Every numeric scalar of a metrics dict, nested keys joined with dots (lists are skipped)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or key in ("seed", "n_experiences"):
            continue
        if isinstance(value, (int, float)):
            out[prefix + key] = float(value)
        elif isinstance(value, dict) and key not in ("backbone", "anytime"):
            out.update(scalars(value, f"{prefix}{key}."))
    if not prefix and isinstance(metrics.get("stored_bytes"), list) and metrics["stored_bytes"]:
        out["stored_bytes_total"] = float(metrics["stored_bytes"][-1] + metrics.get("memory_bytes", 0))
    return out


@dataclass
class Stats:
    values: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.values)) if self.values else None

    @property
    def std(self) -> float | None:
        if self.n == 0:
            return None
        return float(np.std(self.values, ddof=1)) if self.n > 1 else 0.0

    @property
    def ci95(self) -> tuple[float, float] | None:
        """Student-t 95% interval of the mean; None with fewer than two values."""
        if self.n < 2:
            return None
        from scipy import stats

        half = float(stats.t.ppf(0.975, self.n - 1)) * self.std / math.sqrt(self.n)  # type: ignore[operator]
        return self.mean - half, self.mean + half  # type: ignore[operator]

    def format(self, scale: float = 1.0, fmt: str = ".3f", ci: bool = False) -> str:
        if self.mean is None:
            return "-"
        text = f"{self.mean * scale:{fmt}}"
        if self.n > 1:
            text += f" ± {self.std * scale:{fmt}}"  # type: ignore[operator]
            if ci and self.ci95:
                lo, hi = self.ci95
                text += f" [{lo * scale:{fmt}}, {hi * scale:{fmt}}]"
        return text


def metric_key(key: str, task_aware: bool, metrics: dict[str, Any]) -> str:
    """Task-incremental runs are compared on their task-aware accuracies."""
    return f"task_aware.{key}" if task_aware and key in metrics.get("task_aware", {}) else key


def aggregate(records: Sequence[RunRecord]) -> dict[str, Stats]:
    out: dict[str, Stats] = {}
    for rec in records:
        if rec.metrics is None:
            continue
        for key, value in scalars(rec.metrics).items():
            if not math.isnan(value):
                out.setdefault(key, Stats()).values.append(value)
    return out


def _config_key(rec: RunRecord) -> str | None:
    if rec.config is None:
        return None
    return hashlib.sha256(json.dumps(rec.config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differing_keys(flats: dict[Any, dict[str, Any]]) -> list[str]:
    """The flattened keys whose values are not the same in every config (absent counts as a value)."""
    return sorted({k for f in flats.values() for k in f if len({json.dumps(g.get(k), default=str) for g in flats.values()}) > 1})


def _labels(configs: dict[str | None, dict[str, Any] | None], name: str) -> dict[str | None, str]:
    """A row label per config of one run name: the name plus the keys in which the configs differ."""
    if len(configs) < 2:
        return {key: name for key in configs}
    flats = {key: flatten(cfg or {}) for key, cfg in configs.items()}
    keys = differing_keys(flats)
    labels = {}
    for key, flat in flats.items():
        shown = ", ".join(f"{k.removeprefix('strategy.')}={json.dumps(flat.get(k), default=str) if not isinstance(flat.get(k), str) else flat.get(k)}" for k in keys[:3])
        more = f", +{len(keys) - 3} keys" if len(keys) > 3 else ""
        labels[key] = f"{name} [{shown}{more}]" if configs[key] is not None else f"{name} [config unknown]"
    return labels


def group_runs(records: Sequence[RunRecord]) -> dict[str, dict[str, list[RunRecord]]]:
    """experiment -> row label -> records (all statuses), in discovery order.

    Runs are pooled only when their resolved configs agree (seed and placement aside): two configs
    that share a run name become two rows, labelled by the keys in which they differ. A seed that
    occurs twice in one row (the same run copied into two places) counts once, with a warning.
    """
    by_name: dict[tuple[str, str], dict[str | None, list[RunRecord]]] = {}
    configs: dict[tuple[str, str], dict[str | None, dict[str, Any] | None]] = {}
    for rec in records:
        key = _config_key(rec)
        by_name.setdefault((rec.experiment, rec.name), {}).setdefault(key, []).append(rec)
        configs.setdefault((rec.experiment, rec.name), {})[key] = rec.config
    groups: dict[str, dict[str, list[RunRecord]]] = {}
    for (experiment, name), per_config in by_name.items():
        labels = _labels(configs[(experiment, name)], name)
        for key, recs in per_config.items():
            kept: dict[Any, RunRecord] = {}
            for rec in recs:
                slot = rec.seed if rec.seed is not None and rec.status == "finished" else id(rec)
                if slot in kept:
                    warnings.warn(f"{labels[key]} seed {rec.seed}: {rec.path} duplicates {kept[slot].path}; counted once", stacklevel=2)
                    continue
                kept[slot] = rec
            groups.setdefault(experiment, {})[labels[key]] = list(kept.values())
    return groups


def _scenario(recs: Sequence[RunRecord]) -> str | None:
    done = [r.metrics for r in recs if r.metrics]
    return done[0].get("scenario") if done else None


def headline_numbers(runs: dict[str, list[RunRecord]]) -> tuple[list[str], list[list[Any]]]:
    """The headline table as numbers (for ``summary.csv``): per row the seeds and, per metric in
    its own units (accuracies as fractions), ``mean``, ``std``, ``n``, ``ci95_low``, ``ci95_high``;
    empty where undefined. ``accuracy`` says whether the row reports task-aware or class-incremental
    accuracies."""
    keys = [c[1] for c in HEADLINE] + ["final_new_acc", ANYTIME[1]] + [c[1] for c in COST]
    header = ["strategy", "seeds", "accuracy"] + [f"{k}_{s}" for k in keys for s in ("mean", "std", "n", "ci95_low", "ci95_high")]
    rows = []
    for name, recs in runs.items():
        agg = aggregate(recs)
        done = [r for r in recs if r.metrics]
        task_aware = _scenario(recs) == "task_incremental"
        row: list[Any] = [name, len(done), "task-aware" if task_aware else "class-incremental"]
        for key in keys:
            st = agg.get(metric_key(key, task_aware, done[0].metrics) if done else key, Stats())  # type: ignore[arg-type]
            lo, hi = st.ci95 or (None, None)
            row += [_num(st.mean), _num(st.std), st.n or "", _num(lo), _num(hi)]
        rows.append(row)
    return header, rows


def _num(value: float | None) -> Any:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def headline_table(runs: dict[str, list[RunRecord]], ci: bool = False) -> tuple[list[str], list[list[str]]]:
    """One row per run group. Task-incremental rows report task-aware accuracy; when an experiment
    mixes scenarios, an ``accuracy`` column says which accuracy each row reports."""
    scenarios = {name: _scenario(recs) for name, recs in runs.items()}
    kinds = {s for s in scenarios.values() if s is not None}
    mixed = len({s == "task_incremental" for s in kinds}) > 1
    columns = HEADLINE + ([ANYTIME] if "online" in kinds else []) + COST
    header = ["strategy", "seeds"] + (["accuracy"] if mixed else []) + [c[0] for c in columns]
    rows = []
    for name, recs in runs.items():
        agg = aggregate(recs)
        done = [r for r in recs if r.metrics]
        task_aware = scenarios[name] == "task_incremental"
        cells = []
        for _, key, scale, fmt in columns:
            k = metric_key(key, task_aware, done[0].metrics) if done else key  # type: ignore[arg-type]
            st = agg.get(k, Stats())
            if key == "final_old_acc":  # one cell: accuracy on earlier tasks / on the last task's classes
                new = agg.get(metric_key("final_new_acc", task_aware, done[0].metrics) if done else "final_new_acc", Stats())
                cells.append(" / ".join("-" if m.mean is None else f"{m.mean * scale:{fmt}}" for m in (st, new)))
                continue
            # a metric missing or NaN in some finished runs: say over how many it is taken
            cells.append(st.format(scale, fmt, ci and key in ("final_acc", "avg_incremental_acc", "forgetting")) + (f" (n={st.n})" if 0 < st.n < len(done) else ""))
        which = (["task-aware" if task_aware else "class-incremental"] if mixed else [])
        rows.append([name, str(len(done))] + which + cells)
    return header, rows


CI_CAPTION = ("Cells: mean ± std over seeds; final acc, avg inc acc and forgetting add [low, high], the Student-t 95% "
              "confidence interval of the mean (two or more seeds).")
MAX_CONFIG_KEYS = 40


def config_table(runs: dict[str, list[RunRecord]], report_dir: Path) -> tuple[list[str], list[list[str]], list[list[tuple[str, str]]]]:
    """The keys in which the rows' resolved configs differ (one column each), and per row the links
    (seed label, path relative to ``report_dir``) to its run folders."""
    from cl.config import flatten

    flats = {name: flatten(next((r.config for r in recs if r.config is not None), None) or {}) for name, recs in runs.items()}
    keys = differing_keys(flats)
    if len(keys) > MAX_CONFIG_KEYS:
        keys = keys[:MAX_CONFIG_KEYS]
    header = ["strategy", *keys]
    rows, links = [], []
    for name, recs in runs.items():
        rows.append([name, *("-" if k not in flats[name] else _cell(flats[name][k]) for k in keys)])
        links.append([(f"seed{r.seed}" if r.seed is not None else r.path.name, os.path.relpath(r.path.absolute(), report_dir.absolute()))
                      for r in sorted(recs, key=lambda r: (r.seed is None, r.seed or 0))])
    return header, rows, links


def _cell(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


PAIRED = [("final acc (pts)", "final_acc", 100.0), ("avg inc acc (pts)", "avg_incremental_acc", 100.0), ("forgetting (pts)", "forgetting", 100.0)]


def paired_table(runs: dict[str, list[RunRecord]], baseline: str) -> tuple[list[str], list[list[str]]]:
    """Each row minus ``baseline`` on the seeds both finished (a seed fixes the class order, so the
    difference is paired): mean and Student-t 95% interval, in points. An interval that excludes
    zero is marked ``*``; with fewer than two shared seeds there is no interval."""
    base = {r.seed: r.metrics for r in runs[baseline] if r.metrics is not None and r.seed is not None}
    base_scenario = _scenario(runs[baseline])
    header = ["strategy", "paired seeds"] + [f"Δ {label} [95% CI]" for label, _, _ in PAIRED]
    rows = []
    for name, recs in runs.items():
        if name == baseline:
            continue
        mine = {r.seed: r.metrics for r in recs if r.metrics is not None and r.seed is not None}
        seeds = sorted(set(mine) & set(base))
        scenario = _scenario(recs)
        if seeds and (scenario == "task_incremental") != (base_scenario == "task_incremental"):
            # the headline reports task-aware accuracy for one and class-incremental for the other
            rows.append([name, "0", f"not comparable: {scenario} vs {base_scenario}"] + [""] * (len(PAIRED) - 1))
            continue
        cells = []
        task_aware = scenario == "task_incremental"
        for _, key, scale in PAIRED:
            diffs = [mine[s].get(metric_key(key, task_aware, mine[s])) for s in seeds]
            refs = [base[s].get(metric_key(key, task_aware, base[s])) for s in seeds]
            st = Stats([a - b for a, b in zip(diffs, refs) if _is_number(a) and _is_number(b) and not math.isnan(a - b)])
            if st.mean is None:
                cells.append("-")
                continue
            text = f"{st.mean * scale:+.1f}"
            if st.n < len(seeds):
                text += f" (n={st.n})"
            if st.ci95:
                lo, hi = st.ci95
                text += f" [{lo * scale:+.1f}, {hi * scale:+.1f}]" + (" *" if lo > 0 or hi < 0 else "")
            cells.append(text)
        rows.append([name, str(len(seeds))] + cells)
    return header, rows


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plain(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def problems(runs: dict[str, list[RunRecord]]) -> list[str]:
    """Human-readable notes: unfinished and failed runs, strategies missing seeds."""
    notes = []
    all_seeds = {r.seed for recs in runs.values() for r in recs if r.seed is not None}
    for name, recs in runs.items():
        for r in recs:
            if r.status != "finished":
                notes.append(f"{name} seed {r.seed}: {r.status}" + (f" ({r.error})" if r.error else "") + f" — {r.path}")
        have = {r.seed for r in recs if r.status == "finished"}
        missing = sorted(s for s in all_seeds - have if s is not None)
        if missing:
            notes.append(f"{name}: aggregated over {len(have)} seed(s); missing seed(s) {', '.join(map(str, missing))}")
    return notes


def mean_curves(seeds: list[dict[str, Any]], task_aware: bool = False) -> tuple[tuple[list[float], list[float]], tuple[list[float], list[float]]]:
    """((mean acc on seen classes, mean acc on task 1), (their stds)) per experience over seeds."""
    key = "acc_matrix_task_aware" if task_aware else "acc_matrix"
    seen = np.array([incremental_accs(m[key], m["n_test_per_task"]) for m in seeds])
    first = np.array([[row[0] for row in m[key]] for m in seeds], dtype=np.float64)
    return (seen.mean(0).tolist(), first.mean(0).tolist()), (seen.std(0).tolist(), first.std(0).tolist())


def _nanmean(stack: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():  # entries never evaluated (upper triangle) stay NaN, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(stack, axis=0)


def _png_data(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _experiment_plots(experiment: str, runs: dict[str, list[RunRecord]], plots: Path) -> list[tuple[str, Path]]:
    from cl.analysis import plots as P

    done = {name: [r.metrics for r in recs if r.metrics] for name, recs in runs.items()}
    done = {k: v for k, v in done.items() if v}
    if not done:
        return []
    slug = experiment.replace("/", "_")
    task_aware = {name: seeds[0].get("scenario") == "task_incremental" for name, seeds in done.items()}
    out: list[tuple[str, Path]] = []
    curves, bands = {}, {}
    for name, seeds in done.items():
        curves[name], bands[name] = mean_curves(seeds, task_aware[name])
    multi = any(len(s) > 1 for s in done.values())
    kinds = set(task_aware.values())
    kind = "task-aware" if kinds == {True} else "class-incremental" if kinds == {False} else "task-aware for task-incremental runs"
    out.append(("Forgetting curves", P.compare_curves(curves, plots / f"{slug}_forgetting_curves.png",
                                                      f"{experiment} ({kind}{'; mean ± std over seeds' if multi else ''})", bands)))
    mats = {name: _nanmean(np.array([[[np.nan if v is None else v for v in row]
                                      for row in m["acc_matrix_task_aware" if task_aware[name] else "acc_matrix"]] for m in seeds], dtype=float))
            for name, seeds in done.items()}
    out.append(("Accuracy matrices (mean over seeds)", P.heatmap_grid(mats, plots / f"{slug}_acc_matrices.png", f"{experiment}: {kind} accuracy (%)")))
    anytime = {name: [m["anytime"] for m in seeds if m.get("anytime")] for name, seeds in done.items()}
    anytime = {k: v for k, v in anytime.items() if v}
    if anytime:
        # experience boundaries when every run says how long its experiences were and they agree
        sizes = {tuple(m["n_train_per_task"]) if isinstance(m.get("n_train_per_task"), list) else None for seeds in done.values() for m in seeds}
        bounds = list(np.cumsum(next(iter(sizes)))[:-1]) if len(sizes) == 1 and None not in sizes else []
        out.append(("Anytime accuracy", P.anytime_compare(anytime, plots / f"{slug}_anytime.png", f"{experiment}: anytime accuracy", bounds)))
    summaries = {name: _shift_summaries(recs) for name, recs in runs.items()}
    shift = {name: curves_ for name in runs if (curves_ := _guarded(_cka_curves, summaries[name], name))}
    if shift:
        out.append(("Layer-wise CKA", P.cka_compare(shift, plots / f"{slug}_cka.png", f"{experiment}: CKA of old tasks' features vs right after learning them")))
    bn = {name: errs for name in runs if (errs := _guarded(_bn_errors, summaries[name], name))}
    if bn:
        out.append(("BatchNorm statistics of old tasks at test time", P.bn_error_compare(bn, plots / f"{slug}_bn_error.png",
                                                                                          f"{experiment}: BN running-mean error on old tasks")))
    points = {}
    for name, seeds in done.items():
        agg = aggregate([r for r in runs[name] if r.metrics])
        acc_key = metric_key("final_acc", task_aware[name], seeds[0])
        points[name] = (agg.get(acc_key, Stats()).mean, agg.get("trainable_params", Stats()).mean, agg.get("stored_bytes_total", Stats()).mean)
    out.append(("Accuracy vs cost", P.cost_scatter(points, plots / f"{slug}_cost.png", f"{experiment}: final accuracy vs cost")))
    return out


def _shift_summaries(records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """Shift summaries of the finished runs that saved probes (``shift/shift.json`` if already
    computed); a run whose probes or summary cannot be read is skipped with a warning."""
    from cl.analysis.shift import load_probes, shift_tables, summarize_shift

    out = []
    for r in records:
        if r.metrics is None or not (r.path / "probes").is_dir():
            continue
        cached = r.path / "shift" / "shift.json"
        try:
            if cached.is_file():
                summary = _read_json(cached)
            else:
                probes, order = load_probes(r.path)
                summary = summarize_shift(shift_tables(probes), order) if probes else None
            if summary is not None and not (isinstance(summary, dict) and isinstance(summary.get("cka_curve"), dict)):
                raise ValueError("not a shift summary")
        except Exception as err:  # noqa: BLE001 - one damaged run must not sink the report
            _unreadable(r.path / "probes", err)
            continue
        if summary is not None:
            out.append(summary)
    return out


def _guarded(fn: Any, summaries: list[dict[str, Any]], name: str) -> Any:
    """``fn(summaries)``, or None with a warning when seeds' summaries do not fit together."""
    try:
        return fn(summaries)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        warnings.warn(f"{name}: shift summaries of its seeds do not fit together ({type(err).__name__}: {err}); left out", stacklevel=2)
        return None


def _bn_errors(all_summaries: list[dict[str, Any]]) -> dict[str, dict[str, float]] | None:
    """variant -> BN layer -> error of old tasks' running means (mean over seeds); "used" is what the run used."""
    summaries = [s for s in all_summaries if s.get("bn")]
    if not summaries:
        return None
    out: dict[str, dict[str, float]] = {}
    layers = list(summaries[0]["bn"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out["used"] = {l: float(np.nanmean([np.nan if s["bn"][l]["old_tasks"] is None else s["bn"][l]["old_tasks"] for s in summaries])) for l in layers}
        for variant in summaries[0].get("bn_variants", {}):
            out[variant] = {l: float(np.nanmean([np.nan if s["bn_variants"][variant][l] is None else s["bn_variants"][variant][l] for s in summaries])) for l in layers}
    return out


def _cka_curves(summaries: list[dict[str, Any]]) -> dict[str, list[float]] | None:
    """Mean over seeds of each layer's CKA curve, for runs that saved probes."""
    curves = [s["cka_curve"] for s in summaries]
    if not curves:
        return None
    layers = list(curves[0])
    return {l: _nanmean(np.array([[np.nan if v is None else v for v in c[l]] for c in curves], dtype=float)).tolist() for l in layers}


def write_report(records: Sequence[RunRecord], out_dir: str | Path, title: str = "Comparison", baseline: str | None = None,
                 formats: Sequence[str] = ()) -> str:
    """All tables, plots and the HTML report for ``records``; returns a plain-text summary. With a
    ``baseline`` row name, also every row's paired difference to it (``paired.csv``); ``formats``
    (``svg``, ``pdf``): every figure also in those formats, beside its PNG."""
    from cl.analysis.plots import also_save_as

    with also_save_as(formats):
        return _write_report(records, out_dir, title, baseline)


def _write_report(records: Sequence[RunRecord], out_dir: str | Path, title: str, baseline: str | None) -> str:
    from cl.errors import UserError
    from cl.utils import atomic_write_text

    out = Path(out_dir)
    groups = group_runs(records)
    if baseline is not None and not any(baseline in runs for runs in groups.values()):
        names = sorted({name for runs in groups.values() for name in runs})
        raise UserError(f"--baseline: no row named '{baseline}' (rows: {', '.join(names)[:300]})")
    plots = out / "plots"
    if plots.is_symlink():  # every file below is written by replacing, never through, a symlink
        raise UserError(f"{plots} is a symlink; refusing to write the report through it")
    plots.mkdir(parents=True, exist_ok=True)
    paired_rows: list[list[str]] = []
    texts, md, html_parts = [], [f"# {title}\n"], [f"<h1>{html.escape(title)}</h1>"]
    csv_rows: list[list[Any]] = []
    csv_header: list[str] = []
    long_rows: list[list[Any]] = []
    for experiment, runs in groups.items():
        header, rows = headline_table(runs, ci=True)
        notes = problems(runs)
        texts.append(f"== {experiment} ==\n" + plain(*headline_table(runs)) + "".join(f"\n  note: {n}" for n in notes))
        heading = experiment != title or len(groups) > 1  # a suite's report is titled by its one experiment already
        md.append((f"\n## {experiment}\n\n" if heading else "\n") + markdown(header, rows) + f"\n{CI_CAPTION}\n"
                  + "".join(f"\n- {n}" for n in notes) + "\n")
        csv_header, numbers = headline_numbers(runs)
        csv_rows += [[experiment] + r for r in numbers]
        for name, recs in runs.items():
            for key, st in sorted(aggregate(recs).items()):
                lo, hi = st.ci95 or (None, None)
                long_rows.append([experiment, name, key, st.n, st.mean, st.std, lo, hi])
        html_parts.append((f"<h2>{html.escape(experiment)}</h2>" if heading else "") + _html_table(header, rows)
                          + f"<p class='caption'>{html.escape(CI_CAPTION)}</p>")
        c_header, c_rows, links = config_table(runs, out)
        md.append("\n### Configurations and run folders\n\n" + markdown(
            c_header + ["runs"], [r + [" ".join(f"[{label}]({href})" for label, href in l)] for r, l in zip(c_rows, links)])
            + ("\n(the columns are the keys in which the rows' configs differ)\n" if len(c_header) > 1 else "\n"))
        html_parts.append("<h3>Configurations and run folders</h3>" + _html_table(c_header, c_rows, links)
                          + ("<p class='caption'>The columns are the keys in which the rows' resolved configs differ; the links open each seed's run folder.</p>"
                             if len(c_header) > 1 else ""))
        if baseline is not None and baseline in runs:
            p_header, p_rows = paired_table(runs, baseline)
            caption = f"Paired difference to {baseline} (same seeds; * = the 95% interval excludes 0)"
            texts.append(f"-- {experiment}: {caption} --\n" + plain(p_header, p_rows))
            md.append(f"\n### {caption}\n\n" + markdown(p_header, p_rows) + "\n")
            html_parts.append(f"<h3>{html.escape(caption)}</h3>" + _html_table(p_header, p_rows))
            paired_rows += [[experiment, baseline] + r for r in p_rows]
        elif baseline is not None:
            note = f"no row named '{baseline}' in {experiment}: no paired differences"
            texts.append(f"-- {experiment}: {note} --")
            md.append(f"\n- {note}\n")
            html_parts.append(f"<p>{html.escape(note)}</p>")
        if notes:
            html_parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
        for caption, path in _experiment_plots(experiment, runs, plots):
            md.append(f"\n![{caption}](plots/{path.name})\n")
            html_parts.append(f"<h3>{html.escape(caption)}</h3><img src='{_png_data(path)}' style='max-width:100%'>")
    atomic_write_text(out / "summary.md", "".join(md))
    _write_csv(out / "summary.csv", ["experiment"] + csv_header, csv_rows)
    if baseline is not None:
        _write_csv(out / "paired.csv", ["experiment", "baseline", "strategy", "paired seeds"] + [f"delta {k} (pts) [95% CI]" for _, k, _ in PAIRED], paired_rows)
    _write_csv(out / "metrics_long.csv", ["experiment", "run", "metric", "n", "mean", "std", "ci95_low", "ci95_high"], long_rows)
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}.caption{color:#555;font-size:90%}")
    atomic_write_text(out / "report.html", f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>" + "".join(html_parts) + "</body></html>\n")
    return "\n\n".join(texts) + f"\n\n(report: {out / 'report.html'})"


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], links: Sequence[Sequence[tuple[str, str]]] | None = None) -> str:
    """A table; with ``links``, a last column of (label, relative href) links per row."""
    from urllib.parse import quote

    head = "".join(f"<th>{html.escape(h)}</th>" for h in [*header, *(["runs"] if links is not None else [])])
    body = ""
    for k, r in enumerate(rows):
        cells = "".join(f"<td>{html.escape(c)}</td>" for c in r)
        if links is not None:
            cells += "<td>" + " ".join(f"<a href='{html.escape(quote(href))}/'>{html.escape(label)}</a>" for label, href in links[k]) + "</td>"
        body += f"<tr>{cells}</tr>"
    return f"<table><tr>{head}</tr>{body}</table>"


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from cl.utils import atomic_write_text

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
