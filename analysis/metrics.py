"""Continual-learning metrics as pure functions of the accuracy matrix.

Conventions (every definition lives here, once):

* ``R[i][j]`` is the accuracy on test task ``j`` after training experience ``i`` (0-based),
  ``T`` the number of experiences. Entries that were not evaluated are NaN (``None`` in JSON):
  class-incremental accuracy on tasks whose classes are not seen yet is not defined.
* ``n[j]`` is the number of test samples of task ``j`` (for sample-weighted accuracies).
* ``b[j]`` is the accuracy of the model before any training (for forward transfer).

Definitions:

* final_avg_acc  = mean_j R[T-1][j]                                  (task-averaged, last row)
* final_acc      = sum_j n_j R[T-1][j] / sum_j n_j                    (all test samples at the end)
* incremental_acc[i] = sum_{j<=i} n_j R[i][j] / sum_{j<=i} n_j          (all seen classes after i)
* avg_incremental_acc = mean_i incremental_acc[i]                    ("average accuracy", A-bar)
* forgetting     = mean_{j<T-1} ( max_{j<=l<=T-2} R[l][j] - R[T-1][j] )  (Chaudhry et al. 2018)
  - the max runs over the rows *before* the last one and from the row where j was learned;
    comparing with the last row itself, or with rows before j was trained, are the classic bugs.
* bwt            = mean_{j<T-1} ( R[T-1][j] - R[j][j] )               (Lopez-Paz & Ranzato 2017)
* fwt            = mean_{j>=1} ( R[j-1][j] - b_j )                      (Lopez-Paz & Ranzato 2017)
* avg_anytime_acc = mean of the anytime accuracies, evaluated every k stream samples.

Forgetting, BWT and FWT need at least two experiences; they are ``None`` otherwise, and FWT is
``None`` when ``R[j-1][j]`` or ``b_j`` was not evaluated.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

Matrix = Sequence[Sequence[float | None]]


def as_matrix(R: Matrix) -> np.ndarray:
    """Square float matrix with NaN for missing entries."""
    arr = np.array([[np.nan if v is None else float(v) for v in row] for row in R], dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"accuracy matrix must be square T x T, got shape {arr.shape}")
    return arr


def _weights(n_test: Sequence[int], T: int) -> np.ndarray:
    w = np.asarray(n_test, dtype=np.float64)
    if w.shape != (T,):
        raise ValueError(f"need {T} test-set sizes, got {len(w)}")
    return w


def _clean(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def final_avg_acc(R: Matrix) -> float:
    A = as_matrix(R)
    return float(np.mean(A[-1]))


def final_acc(R: Matrix, n_test: Sequence[int]) -> float:
    A = as_matrix(R)
    w = _weights(n_test, len(A))
    return float(np.sum(A[-1] * w) / np.sum(w))


def final_old_new_acc(R: Matrix, n_test: Sequence[int]) -> tuple[float | None, float]:
    """Stability and plasticity after the last experience: sample-weighted accuracy on the earlier
    tasks' test samples (None with one task) and on the last task's (its "new" classes)."""
    A = as_matrix(R)
    T = len(A)
    w = _weights(n_test, T)
    new = float(A[-1, -1])
    if T < 2:
        return None, new
    return float(np.sum(A[-1, :-1] * w[:-1]) / np.sum(w[:-1])), new


def seen_classes_acc(row: Sequence[float | None], n_test: Sequence[int], i: int) -> float:
    """Accuracy on the test samples of tasks 0..i, from row i of the matrix (sample-weighted)."""
    w = np.asarray(n_test[: i + 1], dtype=np.float64)
    acc = np.array([np.nan if v is None else float(v) for v in row[: i + 1]])
    return float(np.sum(acc * w) / np.sum(w))


def incremental_accs(R: Matrix, n_test: Sequence[int]) -> list[float]:
    """Accuracy on all classes seen so far, after each experience."""
    A = as_matrix(R)
    _weights(n_test, len(A))
    return [seen_classes_acc(A[i].tolist(), n_test, i) for i in range(len(A))]


def avg_incremental_acc(R: Matrix, n_test: Sequence[int]) -> float:
    return float(np.mean(incremental_accs(R, n_test)))


def forgetting_per_task(R: Matrix) -> list[float]:
    """f_j for j < T-1: best accuracy before the last experience minus the final accuracy."""
    A = as_matrix(R)
    T = len(A)
    return [float(np.max(A[j : T - 1, j]) - A[T - 1, j]) for j in range(T - 1)]


def forgetting(R: Matrix) -> float | None:
    per_task = forgetting_per_task(R)
    return _clean(float(np.mean(per_task))) if per_task else None


def bwt(R: Matrix) -> float | None:
    A = as_matrix(R)
    T = len(A)
    if T < 2:
        return None
    return _clean(float(np.mean([A[T - 1, j] - A[j, j] for j in range(T - 1)])))


def fwt(R: Matrix, initial: Sequence[float | None] | None) -> float | None:
    A = as_matrix(R)
    T = len(A)
    if T < 2 or initial is None:
        return None
    b = np.array([np.nan if v is None else float(v) for v in initial])
    return _clean(float(np.mean([A[j - 1, j] - b[j] for j in range(1, T)])))


def avg_anytime_acc(accs: Sequence[float]) -> float | None:
    return float(np.mean(accs)) if len(accs) else None


def summarize(R: Matrix, n_test: Sequence[int], initial: Sequence[float | None] | None = None) -> dict[str, Any]:
    """Every scalar of one accuracy matrix."""
    old, new = final_old_new_acc(R, n_test)
    return {
        "final_avg_acc": final_avg_acc(R),
        "final_acc": final_acc(R, n_test),
        "final_old_acc": _clean(old) if old is not None else None,
        "final_new_acc": _clean(new),
        "incremental_acc": incremental_accs(R, n_test),
        "avg_incremental_acc": avg_incremental_acc(R, n_test),
        "forgetting": forgetting(R),
        "bwt": bwt(R),
        "fwt": fwt(R, initial),
    }


def to_json_matrix(R: Matrix) -> list[list[float | None]]:
    return [[_clean(v) if v is not None else None for v in row] for row in R]
