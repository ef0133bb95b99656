"""Comparison of runs: aggregate metrics over seeds into tables (Markdown, CSV) and curves."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from analysis.metrics import incremental_accs

# (column title, metrics key, scale, format): accuracies in %, times in s
COLUMNS_CIL = [
    ("final acc (%)", "final_acc", 100.0, ".1f"),
    ("avg inc acc (%)", "avg_incremental_acc", 100.0, ".1f"),
    ("forgetting (%)", "forgetting", 100.0, ".1f"),
    ("BWT (%)", "bwt", 100.0, ".1f"),
    ("wall time (s)", "wall_time_s", 1.0, ".1f"),
]
COLUMN_ANYTIME = ("avg anytime acc (%)", "avg_anytime_acc", 100.0, ".1f")


def metric_value(metrics: dict[str, Any], key: str, task_aware: bool = False) -> float | None:
    """A scalar from metrics.json; ``task_aware`` reads the task-aware summary for accuracy keys."""
    source = metrics.get("task_aware", {}) if task_aware and key in metrics.get("task_aware", {}) else metrics
    value = source.get(key)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


@dataclass
class Aggregate:
    """Mean, std and count of one metric over seeds (None values are skipped)."""

    values: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.values)) if self.values else None

    @property
    def std(self) -> float | None:
        return float(np.std(self.values, ddof=1)) if self.n > 1 else (0.0 if self.n == 1 else None)

    def format(self, scale: float, fmt: str) -> str:
        if self.mean is None:
            return "-"
        text = f"{self.mean * scale:{fmt}}"
        return text + (f" ± {self.std * scale:{fmt}}" if self.n > 1 and self.std is not None else "")


def aggregate(runs: dict[str, list[dict[str, Any]]], keys: Iterable[str], task_aware: bool = False) -> dict[str, dict[str, Aggregate]]:
    """run name -> metric -> Aggregate over that run's seeds."""
    out: dict[str, dict[str, Aggregate]] = {}
    for name, seeds in runs.items():
        out[name] = {}
        for key in keys:
            agg = Aggregate()
            for m in seeds:
                v = metric_value(m, key, task_aware)
                if v is not None:
                    agg.values.append(v)
            out[name][key] = agg
    return out


def results_table(runs: dict[str, list[dict[str, Any]]], task_aware: bool = False, online: bool = False) -> tuple[list[str], list[list[str]]]:
    columns = list(COLUMNS_CIL) + ([COLUMN_ANYTIME] if online else [])
    agg = aggregate(runs, [c[1] for c in columns], task_aware)
    header = ["strategy", "seeds"] + [c[0] for c in columns]
    rows = []
    for name, seeds in runs.items():
        rows.append([name, str(len(seeds))] + [agg[name][key].format(scale, fmt) for _, key, scale, fmt in columns])
    return header, rows


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plain(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def to_csv(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def mean_curves(seeds: list[dict[str, Any]], task_aware: bool = False) -> tuple[tuple[list[float], list[float]], tuple[list[float], list[float]]]:
    """((mean acc on seen classes, mean acc on task 1), (their stds)) per experience over seeds."""
    key = "acc_matrix_task_aware" if task_aware else "acc_matrix"
    seen = np.array([incremental_accs(m[key], m["n_test_per_task"]) for m in seeds])
    first = np.array([[row[0] for row in m[key]] for m in seeds], dtype=np.float64)
    return (seen.mean(0).tolist(), first.mean(0).tolist()), (seen.std(0).tolist(), first.std(0).tolist())


def write_comparison(runs: dict[str, list[dict[str, Any]]], out_dir: Path, title: str) -> str:
    """Table (.md, .csv) and forgetting-curve comparison plot; returns the plain-text table."""
    from analysis.plots import compare_curves

    if not runs:
        return "(no finished runs)"
    first = next(iter(runs.values()))[0]
    task_aware = first.get("scenario") == "task_incremental"
    online = first.get("scenario") == "online"
    header, rows = results_table(runs, task_aware, online)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.md").write_text(f"# {title}\n\n" + markdown(header, rows))
    (out_dir / "summary.csv").write_text(to_csv(header, rows))
    curves, bands = {}, {}
    for name, seeds in runs.items():
        curves[name], bands[name] = mean_curves(seeds, task_aware)
    kind = "task-aware" if task_aware else "class-incremental"
    multi = any(len(seeds) > 1 for seeds in runs.values())
    compare_curves(curves, out_dir / "forgetting_curves.png", f"{title} ({kind}{'; mean ± std over seeds' if multi else ''})", bands)
    return plain(header, rows)
