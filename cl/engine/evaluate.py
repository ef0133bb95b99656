"""Evaluation of a strategy on test experiences: class-incremental and task-aware accuracy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cl.data.benchmark import Experience
from cl.data.disk import iterate_batches


@dataclass
class EvalRow:
    cil: list[float | None]
    til: list[float | None]
    task_inference: list[float | None] | None = None  # for strategies that infer the task


@torch.no_grad()
def evaluate(strategy: object, experiences: list[Experience], trained: int, batch_size: int, future: bool, split: str = "test") -> EvalRow:
    """One row of the class-incremental and of the task-aware accuracy matrix.

    Args:
        strategy: anything with ``predict(x, task_id)`` and a ``task_aware_predict`` flag.
        experiences: all experiences (their ``split`` data is used: "test" or "val").
        trained: number of experiences trained so far (0 = before training).
        batch_size: evaluation batch size.
        future: also evaluate tasks not trained yet (task-aware only; needed for forward transfer).

    Returns:
        cil: class-incremental accuracy, the argmax over all classes seen so far; None for untrained tasks.
        til: task-aware accuracy, the argmax over the task's own classes, with ``predict`` given the
            task id when the strategy uses it; None where the strategy cannot score the task's
            classes (non-finite scores) or when not evaluated.
        task_inference: for strategies that infer the task (``predict_inferring(x) -> (scores,
            tasks)``, one inference serving both), the fraction of each trained task's test samples
            assigned to the right task.
    """
    n_seen = experiences[trained - 1].class_range[1] if trained else 0
    aware = getattr(strategy, "task_aware_predict", False)
    inferring = getattr(strategy, "predict_inferring", None)
    cil: list[float | None] = []
    til: list[float | None] = []
    tinf: list[float | None] | None = [] if inferring is not None else None
    for j, exp in enumerate(experiences):
        is_future = j >= trained
        if is_future and not future:
            cil.append(None)
            til.append(None)
            if tinf is not None:
                tinf.append(None)
            continue
        lo, hi = exp.class_range
        hits_cil = hits_til = hits_task = 0
        til_defined = True
        data = exp.val if split == "val" else exp.test
        for xb, yb in data.batches(batch_size):
            if inferring is not None:
                scores, tasks = inferring(xb)
                hits_task += 0 if tasks is None else int((tasks == j).sum())
            else:
                scores = strategy.predict(xb, None)  # type: ignore[attr-defined]
            if not is_future:
                hits_cil += count_hits(scores[:, :n_seen], yb)
            task_scores = (strategy.predict(xb, j) if aware else scores)[:, lo:hi]  # type: ignore[attr-defined]
            if not torch.isfinite(task_scores).all():
                til_defined = False
                continue
            hits_til += count_hits(task_scores, yb - lo)
        n = max(len(data), 1)
        cil.append(None if is_future else hits_cil / n)
        til.append(hits_til / n if til_defined else None)
        if tinf is not None:
            tinf.append(None if is_future else hits_task / n)
    return EvalRow(cil, til, tinf)


def count_hits(scores: Tensor, y: Tensor) -> int:
    """Correct argmax predictions; a row the strategy cannot score at all (every score -inf or NaN)
    is a miss, never a vote for class 0."""
    if scores.shape[1] == 0:
        return 0
    best, pred = scores.max(1)
    scorable = best > float("-inf")  # False for -inf and NaN
    return int(((pred.cpu() == y) & scorable.cpu()).sum())


@torch.no_grad()
def accuracy_on_classes(strategy: object, x: Tensor, y: Tensor, classes: Tensor, batch_size: int) -> float | None:
    """Accuracy on samples whose label is in ``classes`` (bool mask), argmax over those classes only."""
    keep = classes[y]
    if not keep.any():
        return None
    x, y = x[keep], y[keep]
    allowed = classes.to(torch.bool)
    hits = 0
    for start, xb in zip(range(0, len(y), batch_size), iterate_batches(x, batch_size)):
        scores = strategy.predict(xb, None)  # type: ignore[attr-defined]
        scores = scores.masked_fill(~allowed.to(scores.device)[None, :], float("-inf"))
        hits += count_hits(scores, y[start : start + batch_size])
    return hits / len(y)
