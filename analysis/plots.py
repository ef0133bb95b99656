"""Plots written for every run and every comparison: forgetting curves and accuracy-matrix heatmaps."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cl.analysis.metrics import Matrix, as_matrix, incremental_accs  # noqa: E402


FORMATS = ("png", "svg", "pdf")
_extra_formats: ContextVar[tuple[str, ...]] = ContextVar("extra_formats", default=())


@contextmanager
def also_save_as(formats: Sequence[str]) -> Iterator[None]:
    """Every figure saved inside the block is also written as each of ``formats`` (``svg``, ``pdf``),
    beside the PNG and with the same name."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown figure format {unknown[0]!r} (choose from {', '.join(FORMATS)})")
    token = _extra_formats.set(tuple(f for f in dict.fromkeys(formats) if f != "png"))
    try:
        yield
    finally:
        _extra_formats.reset(token)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    """Write a figure atomically (a full disk leaves no empty or partial image) and close it."""
    from cl.utils import atomic_path

    path = Path(path)
    try:
        for target in [path, *(path.with_suffix(f".{f}") for f in _extra_formats.get())]:
            with atomic_path(target) as tmp:
                fig.savefig(tmp, dpi=120, bbox_inches="tight", format=target.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def _sequence_colors(n: int) -> list:
    """``n`` ordered colours (tasks, layers): viridis without its last, near-white yellow sixth."""
    cmap = plt.get_cmap("viridis")
    return [cmap(0.85 * i / max(n - 1, 1)) for i in range(n)]


def forgetting_curves(
    R: Matrix, n_test: Sequence[int], path: str | Path, title: str = "", task_labels: Sequence[str] | None = None
) -> Path:
    """Accuracy of each task as later experiences are trained, plus accuracy on all seen classes."""
    A = as_matrix(R)
    T = len(A)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = np.arange(1, T + 1)
    for j, color in enumerate(_sequence_colors(T)):
        label = f"task {j + 1}" + (f" ({task_labels[j]})" if task_labels else "")
        ax.plot(x[j:], 100 * A[j:, j], marker="o", ms=3, lw=1.2, color=color, label=label)
    ax.plot(x, 100 * np.array(incremental_accs(R, n_test)), color="black", lw=2.2, ls="--", label="all seen classes")
    ax.set_xlabel("experiences trained")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks(x)
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.set_title(title or "Forgetting curves")
    ax.legend(fontsize=7, loc="lower left", ncol=2 if T > 6 else 1)
    return _save(fig, path)


def accuracy_heatmap(R: Matrix, path: str | Path, title: str = "") -> Path:
    """Heatmap of R[i][j] (rows: after experience i; columns: test task j); blanks are not evaluated."""
    A = as_matrix(R)
    T = len(A)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * T, 0.8 + 0.5 * T))
    im = ax.imshow(np.ma.masked_invalid(100 * A), vmin=0, vmax=100, cmap="magma")
    if T <= 20:
        for i in range(T):
            for j in range(T):
                if not np.isnan(A[i, j]):
                    ax.text(j, i, f"{100 * A[i, j]:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if A[i, j] < 0.6 else "black")
    ticks = np.arange(T)
    ax.set_xticks(ticks, [str(t + 1) for t in ticks])
    ax.set_yticks(ticks, [str(t + 1) for t in ticks])
    ax.set_xlabel("test task j")
    ax.set_ylabel("after experience i")
    ax.set_title(title or "Accuracy matrix (%)")
    fig.colorbar(im, ax=ax, label="accuracy (%)", fraction=0.046, pad=0.04)
    return _save(fig, path)


def compare_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    title: str = "",
    bands: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> Path:
    """Side-by-side forgetting curves of several strategies.

    Args:
        curves: strategy -> (accuracy on all seen classes after each experience,
            accuracy on the first task after each experience).
        bands: optional strategy -> (std of the first series, std of the second), drawn as bands.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for k, (name, (seen, first)) in enumerate(curves.items()):
        color = plt.get_cmap("tab10")(k % 10)
        x = np.arange(1, len(seen) + 1)
        left.plot(x, 100 * np.asarray(seen), marker="o", ms=4, color=color, label=name)
        right.plot(x, 100 * np.asarray(first), marker="o", ms=4, color=color, label=name)
        if bands and name in bands:
            for ax, mean, std in ((left, seen, bands[name][0]), (right, first, bands[name][1])):
                m, s = 100 * np.asarray(mean), 100 * np.asarray(std)
                ax.fill_between(x, m - s, m + s, color=color, alpha=0.15, lw=0)
    left.set_title("Accuracy on all classes seen so far")
    right.set_title("Accuracy on the first task (forgetting)")
    n = max((len(seen) for seen, _ in curves.values()), default=1)
    for ax in (left, right):
        ax.set_xticks(np.arange(1, n + 1))
        ax.set_xlabel("experiences trained")
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 102)
    left.set_ylabel("test accuracy (%)")
    left.legend(fontsize=8, loc="lower left")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def anytime_curve(samples: Sequence[int], accs: Sequence[float], path: str | Path, boundaries: Sequence[int] = (), title: str = "") -> Path:
    """Online runs: accuracy on the classes seen so far vs stream samples seen."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(samples, 100 * np.asarray(accs), lw=1.5, label="accuracy on seen classes")
    _boundaries(ax, boundaries)
    ax.set_xlabel("stream samples seen")
    ax.set_ylabel("accuracy on seen classes (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or "Anytime accuracy")
    return _save(fig, path)


def _boundaries(ax: plt.Axes, boundaries: Sequence[int]) -> None:
    """Dotted lines where each experience after the first starts, each labelled with its number."""
    for k, b in enumerate(boundaries):
        ax.axvline(b, color="grey", lw=0.8, ls=":", label="experience boundary" if k == 0 else None)
        ax.annotate(f"exp {k + 2}", (b, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10), textcoords="offset points",
                    fontsize=6, color="grey")


def cka_over_experiences(rows: Sequence[Mapping], layers: Sequence[str], path: str | Path, title: str = "") -> Path:
    """CKA of the first task's probe features, per layer, as later experiences are trained."""
    fig, ax = plt.subplots(figsize=(6.8, 4.2))
    for color, layer in zip(_sequence_colors(len(layers)), layers):
        pts = sorted((r["experience"], r["cka"]) for r in rows if r["layer"] == layer and r["task"] == 0)
        if pts:
            ax.plot([p[0] + 1 for p in pts], [p[1] for p in pts], marker="o", ms=3, color=color, label=layer)
    ax.set_xlabel("experiences trained")
    ax.set_ylabel("CKA with features after task 1")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title or "Representational shift of task 1, per layer")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=2 if len(layers) > 14 else 1, title="layer", title_fontsize=7)
    return _save(fig, path)


def cka_by_layer(summary: Mapping, path: str | Path, title: str = "") -> Path:
    """Bar chart: CKA and prototype drift per layer after the last experience (old tasks)."""
    layers = list(summary["layers"])
    cka = [summary["layers"][l]["cka"] or np.nan for l in layers]
    drift = [summary["layers"][l]["prototype_rel_l2"] or np.nan for l in layers]
    fig, (a, b) = plt.subplots(2, 1, figsize=(max(6.4, 0.32 * len(layers) + 2.5), 6.0), sharex=True)
    x = np.arange(len(layers))
    a.bar(x, cka, color="tab:blue")
    a.set_ylim(0, 1.02)
    a.set_ylabel("CKA (mean over old tasks)")
    b.bar(x, drift, color="tab:orange")
    b.set_ylabel("prototype drift (relative L2)")
    b.set_xticks(x, layers, rotation=60, ha="right", fontsize=7)
    for ax in (a, b):
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title or "Shift per layer after the last experience")
    return _save(fig, path)


def bn_error_by_layer(summary: Mapping, path: str | Path, title: str = "", series: Mapping[str, Mapping] | None = None) -> Path:
    """Per BatchNorm layer: error of the running mean used at test time against the true input mean.

    Args:
        summary: a :func:`analysis.shift.summarize_shift` result (its ``bn`` entry).
        series: optional extra label -> {layer: rel error} lines (e.g. several runs or corrections).
    """
    layers = list(summary["bn"])
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.35 * len(layers) + 3), 4.0))
    old = [summary["bn"][l]["old_tasks"] for l in layers]
    cur = [summary["bn"][l]["current_task"] for l in layers]
    ax.plot(x, [np.nan if v is None else v for v in old], marker="o", ms=3, label="old tasks (as used)")
    ax.plot(x, [np.nan if v is None else v for v in cur], marker="s", ms=3, label="current task")
    for label, values in (series or {}).items():
        ax.plot(x, [values.get(l, np.nan) for l in layers], marker=".", label=label)
    ax.set_xticks(x, layers, rotation=60, ha="right", fontsize=6)
    ax.set_ylabel("running-mean error (std units)" if summary.get("bn_metric") == "z" else "running-mean error (relative L2)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "BatchNorm statistics at test time vs true means")
    return _save(fig, path)


def heatmap_grid(matrices: Mapping[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """One accuracy-matrix heatmap per strategy, side by side, on a shared colour scale."""
    n = len(matrices)
    T = max(len(m) for m in matrices.values())
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    size = 1.2 + 0.45 * T
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size + 1.0, rows * size + 0.6), squeeze=False)
    im = None
    for ax, (name, A) in zip(axes.flat, matrices.items()):
        im = ax.imshow(np.ma.masked_invalid(100 * A), vmin=0, vmax=100, cmap="magma")
        if T <= 12:
            for i in range(len(A)):
                for j in range(len(A)):
                    if not np.isnan(A[i, j]):
                        ax.text(j, i, f"{100 * A[i, j]:.0f}", ha="center", va="center", fontsize=6, color="white" if A[i, j] < 0.6 else "black")
        ticks = np.arange(len(A))
        ax.set_xticks(ticks, [str(t + 1) for t in ticks], fontsize=7)
        ax.set_yticks(ticks, [str(t + 1) for t in ticks], fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("test task", fontsize=8)
        ax.set_ylabel("after experience", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), label="accuracy (%)", fraction=0.03, pad=0.02)
    fig.suptitle(title or "Accuracy matrices (%)")
    return _save(fig, path)


def anytime_compare(runs: Mapping[str, Sequence[Mapping]], path: str | Path, title: str = "", boundaries: Sequence[int] = ()) -> Path:
    """Online runs: mean anytime accuracy (± std over seeds) vs stream samples, per strategy;
    ``boundaries``: stream samples at which each experience after the first starts."""
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    for k, (name, seeds) in enumerate(runs.items()):
        color = plt.get_cmap("tab10")(k % 10)
        length = min(len(s["samples"]) for s in seeds)
        x = np.asarray(seeds[0]["samples"][:length])
        acc = 100 * np.array([s["acc"][:length] for s in seeds])
        ax.plot(x, acc.mean(0), color=color, label=name, lw=1.4)
        if len(seeds) > 1:
            ax.fill_between(x, acc.mean(0) - acc.std(0), acc.mean(0) + acc.std(0), color=color, alpha=0.15, lw=0)
    _boundaries(ax, boundaries)
    ax.set_xlabel("stream samples seen")
    ax.set_ylabel("accuracy on seen classes (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Anytime accuracy")
    return _save(fig, path)


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def cka_compare(curves: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path, title: str = "") -> Path:
    """CKA of old tasks' features (mean over old tasks and seeds), one line per strategy: against the
    layer after the last experience (left) and, for the deepest layer, over experiences (right).

    Args:
        curves: strategy -> {layer (shallow to deep): CKA after each experience}.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, gridspec_kw={"width_ratios": [1.4, 1]})
    layers: list[str] = []
    for layer_names in curves.values():  # every layer any strategy measured, in depth order
        layers += [name for name in layer_names if name not in layers]
    deepest = layers[-1] if layers else ""
    for k, (name, by_layer) in enumerate(curves.items()):
        # colour, marker and a width that shrinks down the list: lines that coincide stay visible
        style = {"color": plt.get_cmap("tab10")(k % 10), "marker": MARKERS[k % len(MARKERS)], "ms": 5, "lw": max(3.0 - 0.5 * k, 1.0), "label": name}
        final = [np.asarray(by_layer[l], dtype=float)[-1] if l in by_layer and len(by_layer[l]) else np.nan for l in layers]
        left.plot(np.arange(len(layers)), final, **style)
        if deepest in by_layer:
            values = np.asarray(by_layer[deepest], dtype=float)
            right.plot(np.arange(2, len(values) + 1), values[1:], **style)
    left.set_xticks(np.arange(len(layers)), layers, rotation=60, ha="right", fontsize=7)
    left.set_xlabel("layer (shallow to deep)")
    left.set_ylabel("CKA with features right after learning (old tasks)")
    left.set_title("After the last experience", fontsize=9)
    right.set_xlabel("experiences trained")
    right.set_title(f"Deepest layer ({deepest}) over experiences", fontsize=9)
    right.xaxis.get_major_locator().set_params(integer=True)
    for ax in (left, right):
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8, loc="lower left")
    fig.suptitle(title or "Layer-wise CKA")
    return _save(fig, path)


def cost_scatter(points: Mapping[str, tuple[float | None, float | None, float | None]], path: str | Path, title: str = "") -> Path:
    """Final accuracy vs trainable parameters and vs stored bytes (log scales)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.0), sharey=True)
    xs: dict[plt.Axes, list[float]] = {a: [], b: []}
    for k, (name, (acc, params, stored)) in enumerate(points.items()):
        color = plt.get_cmap("tab10")(k % 10)
        if acc is None:
            continue
        for ax, x in ((a, params), (b, stored)):
            if x is not None:
                ax.scatter(x, 100 * acc, color=color, s=40)
                ax.annotate(name, (x, 100 * acc), fontsize=8, xytext=(4, 3), textcoords="offset points")
                xs[ax].append(float(x))
    a.set_ylabel("final accuracy (%)")
    for ax, what in ((a, "trainable parameters"), (b, "stored bytes: strategy state + memory")):
        values = xs[ax] or [1.0]
        top = max(max(values), 1.0) * 8  # room for the labels, on a log axis
        if min(values) <= 0:  # 0 drawn at 0, not at 10^0: linear below 1, log above (symlog)
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_xlim(-0.5, top)
            ax.set_xlabel(f"{what} (0, then log scale)")
        else:
            ax.set_xscale("log")
            ax.set_xlim(min(values) / 3, top)
            ax.set_xlabel(f"{what} (log scale)")
        ax.set_ylim(0, 102)  # the full accuracy range: no zoom that makes tiny differences look large
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title or "Accuracy vs cost")
    return _save(fig, path)


def bn_error_compare(runs: Mapping[str, Mapping[str, Mapping[str, float]]], path: str | Path, title: str = "") -> Path:
    """Per run: error of the BN running mean used for old tasks, per layer; dotted: the alternatives a
    per-task-BN run also recorded (plain per-task means, Xconv-recovered means)."""
    fig, ax = plt.subplots(figsize=(10, 4.4))
    layers: list[str] = []
    for k, (name, variants) in enumerate(runs.items()):
        color = plt.get_cmap("tab10")(k % 10)
        for variant, values in variants.items():
            layers = layers or list(values)
            style = "-" if variant == "used" else ":"
            label = name if variant == "used" else f"{name}: {variant}"
            ax.plot(np.arange(len(values)), list(values.values()), style, color=color, marker="o" if variant == "used" else None, ms=3, label=label)
    ax.set_xticks(np.arange(len(layers)), layers, rotation=60, ha="right", fontsize=6)
    ax.set_ylabel("|running mean - true mean| / std (old tasks)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    ax.set_title(title or "BatchNorm statistics used for old tasks vs their true values")
    return _save(fig, path)


def tuning_trials(
    trials: Sequence[tuple[int, float | None, str]], params: Mapping[str, Sequence[tuple[object, float]]], path: str | Path,
    title: str = "", maximize: bool = True,
) -> Path:
    """Objective per trial with the best so far (left), then the objective against each parameter.

    Args:
        trials: (trial number, objective or None, state) for every trial.
        params: parameter -> (value, objective) of the completed trials.
    """
    n = 1 + len(params)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    ax = axes[0][0]
    done = [(t, v) for t, v, state in trials if v is not None and state == "complete"]
    pruned = [t for t, _, state in trials if state == "pruned"]
    if done:
        xs, ys = zip(*done)
        ax.scatter(xs, ys, s=18, label="complete")
        best, run = [], None
        for y in ys:
            run = y if run is None else (max(run, y) if maximize else min(run, y))
            best.append(run)
        ax.step(xs, best, where="post", color="C3", label="best so far")
    for t in pruned:
        ax.axvline(t, color="0.85", lw=0.8, zorder=0)
    ax.set_xlabel("trial (grey lines: pruned)")
    ax.set_ylabel("validation objective")
    ax.legend(fontsize=8)
    for ax, (name, points) in zip(axes[0][1:], params.items()):
        values = [v for v, _ in points]
        objective = [o for _, o in points]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            ax.scatter(values, objective, s=18)
            positive = [v for v in values if v > 0]
            if positive and len(positive) == len(values) and max(values) / min(values) > 50:
                ax.set_xscale("log")
        else:
            labels = sorted({str(v) for v in values})
            ax.scatter([labels.index(str(v)) for v in values], objective, s=18)
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
        ax.set_xlabel(name)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
