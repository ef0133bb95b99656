"""Task-id inference shared by per-task strategies (ConFiT, PEFT-per-task).

:func:`route` scores each sample with the task it was assigned to, so ``predict(x, None)`` and the
task-inference accuracy come from one inference (``predict_inferring`` in the strategies).
:class:`Prototypes` keeps class means of the *pretrained, frozen* features and assigns a sample to
the task owning its nearest class mean (cosine). It is a sufficient statistic (float64 sums and
counts), so it checkpoints exactly and updates in one pass.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Prototypes(nn.Module):
    def __init__(self, n_classes: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("sums", torch.zeros(n_classes, dim, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(n_classes, dtype=torch.float64))

    @torch.no_grad()
    def add(self, feats: Tensor, y: Tensor) -> None:
        y = y.to(self.sums.device)
        self.sums.index_add_(0, y, feats.to(self.sums.device, torch.float64))
        self.counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))

    @torch.no_grad()
    def nearest_class(self, feats: Tensor) -> Tensor:
        known = self.counts > 0
        means = (self.sums / self.counts.clamp(min=1)[:, None]).float()
        sims = F.normalize(feats.float(), dim=1) @ F.normalize(means, dim=1).T
        return sims.masked_fill(~known[None, :], float("-inf")).argmax(dim=1)

    @torch.no_grad()
    def infer_task(self, feats: Tensor, task_ranges: dict[int, tuple[int, int]]) -> Tensor:
        task_of_class = torch.full((len(self.counts),), -1, dtype=torch.long, device=self.sums.device)
        for t, (lo, hi) in task_ranges.items():
            task_of_class[lo:hi] = t
        return task_of_class[self.nearest_class(feats)].cpu()


def route(x: Tensor, tasks: Tensor, task_ranges: dict[int, tuple[int, int]], n_classes: int,
          task_scores: Callable[[Tensor, int], Tensor], device: torch.device) -> Tensor:
    """Scores over all classes: sample ``i`` gets ``task_scores(x_i, t_i)`` on task ``t_i``'s classes, -inf elsewhere."""
    scores = torch.full((len(x), n_classes), float("-inf"), device=device)
    for t in torch.unique(tasks).tolist():
        rows = torch.nonzero(tasks == t).flatten()
        lo, hi = task_ranges[t]
        scores[rows.to(device), lo:hi] = task_scores(x[rows], t)
    return scores
