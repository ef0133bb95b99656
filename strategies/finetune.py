"""Fine-tuning ("naive"): a linear classifier trained on each new experience with plain cross-entropy.

The lower bound of class-incremental learning: with nothing to protect old classes, the head (and
the backbone, if the freeze policy trains it) drifts towards the latest experience.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from cl.data.benchmark import Experience
from cl.registry import STRATEGIES
from cl.strategies.base import OptimConfig, Strategy, StrategyContext, make_optimizer


class FinetuneConfig(OptimConfig):
    name: Literal["finetune"] = "finetune"


@STRATEGIES.register("finetune", config=FinetuneConfig, help="naive fine-tuning of a linear head (lower bound)")
class Finetune(Strategy):
    """Linear head over the whole label space; the loss only covers classes seen so far."""
    domain_incremental: ClassVar[bool] = True  # keeps working when a class reappears in a new domain

    stateful = ("head",)

    @classmethod
    def uses_cross_entropy(cls, cfg) -> bool:  # noqa: ANN001
        return True

    def __init__(self, cfg: OptimConfig, ctx: StrategyContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: OptimConfig = cfg
        self.head = nn.Linear(ctx.feature_dim, ctx.n_classes).to(self.device)
        self.optimizer: torch.optim.Optimizer | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters()) + self.backbone_parameters()

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        self.optimizer = make_optimizer(self.trainable_parameters(), self.cfg)

    def step(self, x: Tensor, y: Tensor, task_ids: Tensor) -> Tensor:
        """One optimisation step on a batch of stored inputs; returns the loss."""
        assert self.optimizer is not None, "before_experience must run first"
        self.train_mode(True)
        y = y.to(self.device)
        logits = self.head(self.encode(x))
        loss = self.classification_loss(logits, y, *self.label_ranges(task_ids))
        self.optimizer_step(loss, self.optimizer)
        return loss.detach()

    def observe(self, x: Tensor, y: Tensor, task_id: int) -> dict[str, float]:
        return {"loss": float(self.step(x, y, torch.full((len(y),), task_id)))}

    @torch.no_grad()
    def predict(self, x: Tensor, task_id: int | None) -> Tensor:
        self.train_mode(False)
        return self.head(self.encode(x))

    def storage_bytes(self) -> int:
        # head rows of the classes seen so far
        return self.seen_classes * (self.ctx.feature_dim + 1) * 4 + super().storage_bytes()
