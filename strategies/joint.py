"""Joint training: after experience i, a model trained on all data of experiences 0..i.

Not a continual learner: the upper bound that CL results are read against. By default the head is
re-initialised at every experience, so row i of the accuracy matrix is an independent joint model
on the first i+1 experiences.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from cl.data.benchmark import Experience
from cl.registry import STRATEGIES
from cl.strategies.finetune import Finetune
from cl.strategies.base import OptimConfig


class JointConfig(OptimConfig):
    name: Literal["joint"] = "joint"
    reinit: bool = Field(True, description="re-initialise the head at every experience")


@STRATEGIES.register("joint", config=JointConfig, help="joint training on all data seen so far (upper bound)")
class Joint(Finetune):
    data_policy = "cumulative"

    def before_experience(self, exp: Experience) -> None:
        if self.cfg.reinit:  # type: ignore[attr-defined]
            self.head = nn.Linear(self.ctx.feature_dim, self.ctx.n_classes).to(self.device)
        super().before_experience(exp)

    def observe(self, x: Tensor, y: Tensor, task_id: int) -> dict[str, float]:
        # Cumulative batches mix the tasks seen so far: each sample's task follows from its label
        # (masking old samples to the current task's classes would make their loss infinite).
        ends = torch.tensor([self.task_ranges[t][1] for t in sorted(self.task_ranges)])
        tasks = torch.searchsorted(ends, y.cpu(), right=True)
        return {"loss": float(self.step(x, y, tasks))}
