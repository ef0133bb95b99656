"""Plots written for every run and every comparison: forgetting curves and accuracy-matrix heatmaps."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from analysis.metrics import Matrix, as_matrix, incremental_accs  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def forgetting_curves(
    R: Matrix, n_test: Sequence[int], path: str | Path, title: str = "", task_labels: Sequence[str] | None = None
) -> Path:
    """Accuracy of each task as later experiences are trained, plus accuracy on all seen classes."""
    A = as_matrix(R)
    T = len(A)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    cmap = plt.get_cmap("viridis")
    x = np.arange(1, T + 1)
    for j in range(T):
        label = f"task {j + 1}" + (f" ({task_labels[j]})" if task_labels else "")
        ax.plot(x[j:], 100 * A[j:, j], marker="o", ms=3, lw=1.2, color=cmap(j / max(T - 1, 1)), label=label)
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
    ax.plot(samples, 100 * np.asarray(accs), lw=1.5)
    for b in boundaries:
        ax.axvline(b, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("stream samples seen")
    ax.set_ylabel("accuracy on seen classes (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.set_title(title or "Anytime accuracy (dotted: experience boundaries)")
    return _save(fig, path)
