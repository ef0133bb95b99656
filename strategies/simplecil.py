"""SimpleCIL: nearest class mean with cosine similarity on frozen pretrained features.

Zhou, Ye, Zhan, Liu. "Revisiting Class-Incremental Learning with Pre-Trained Models:
Generalizability and Adaptivity are All You Need", IJCV 2024. https://arxiv.org/abs/2303.07338

No training: each class's prototype is the mean of its training features, and a test sample is
scored by its cosine similarity to every prototype. One pass per experience suffices, so it also
runs unchanged in the online scenario.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from cl.config import StrategyConfig
from cl.registry import STRATEGIES
from cl.strategies.base import Strategy, StrategyContext


class SimpleCILConfig(StrategyConfig):
    name: Literal["simplecil"] = "simplecil"
    metric: Literal["cosine", "euclidean"] = Field("cosine", description="similarity to the prototypes")


def prototype_scores(features: Tensor, prototypes: Tensor, known: Tensor, metric: str) -> Tensor:
    """Scores [B, C] of features against class prototypes; -inf for classes without a prototype."""
    if metric == "cosine":
        scores = F.normalize(features, dim=1) @ F.normalize(prototypes, dim=1).T
    else:
        scores = -torch.cdist(features, prototypes)
    return scores.masked_fill(~known[None, :], float("-inf"))


@STRATEGIES.register("simplecil", config=SimpleCILConfig, help="prototype classifier on frozen features (SimpleCIL)")
class SimpleCIL(Strategy):
    domain_incremental: ClassVar[bool] = True  # keeps working when a class reappears in a new domain
    max_epochs = 1
    stateful = ("sums", "counts")

    def __init__(self, cfg: SimpleCILConfig, ctx: StrategyContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: SimpleCILConfig = cfg
        self.sums = torch.zeros(ctx.n_classes, ctx.feature_dim, dtype=torch.float64, device=self.device)
        self.counts = torch.zeros(ctx.n_classes, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def observe(self, x: Tensor, y: Tensor, task_id: int) -> dict[str, float]:
        self.train_mode(False)
        y = y.to(self.device)
        self.sums.index_add_(0, y, self.encode(x).double())
        self.counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        return {}

    @torch.no_grad()
    def predict(self, x: Tensor, task_id: int | None) -> Tensor:
        self.train_mode(False)
        known = self.counts > 0
        prototypes = (self.sums / self.counts.clamp(min=1)[:, None]).float()
        return prototype_scores(self.encode(x), prototypes, known, self.cfg.metric)

    def storage_bytes(self) -> int:
        return int((self.counts > 0).sum()) * self.ctx.feature_dim * 4
