"""APER (ADAM): adapt the pretrained model on the first session, then a prototype classifier.

Zhou, Ye, Zhan, Liu. "Revisiting Class-Incremental Learning with Pre-Trained Models:
Generalizability and Adaptivity are All You Need", IJCV 2024 (zhoudw-zdw/RevisitingCIL).

On the first task one PEFT module set (any :mod:`cl.peft` method; the paper uses adapter, SSF or
VPT) is trained with a temporary linear head, then frozen for good. Every class's prototype is the
mean of the *concatenation* of the frozen pretrained features and the adapted features (the paper's
merge of generalisability and adaptivity); test samples are scored by cosine similarity to the
prototypes, as in SimpleCIL. After the first task nothing is trained.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from cl.config import Polymorphic, RunConfig
from cl.data.benchmark import Experience
from cl.peft import PeftConfig, build_peft
from cl.peft.adapter import AdapterConfig
from cl.registry import PEFT, STRATEGIES
from cl.strategies.base import OptimConfig, Strategy, StrategyContext, make_optimizer
from cl.strategies.simplecil import prototype_scores


class APERConfig(OptimConfig):
    name: Literal["aper"] = "aper"
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    peft: Annotated[PeftConfig, Polymorphic(PEFT)] = Field(default_factory=AdapterConfig, description="the first-session module")
    concat: bool = Field(True, description="prototypes of [pretrained, adapted] features; false = adapted only")

    def check(self, cfg: RunConfig) -> None:
        if self.peft.needs_data:
            raise ValueError(f"strategy.peft.init: '{self.peft.init}' derives the module from a training batch, which only peft_per_task provides; use 'learned'")  # type: ignore[attr-defined]
        if cfg.backbone.trainable != "none":
            raise ValueError(f"backbone.trainable: aper adapts through a PEFT module on a frozen backbone; use 'none' (got '{cfg.backbone.trainable}')")


@STRATEGIES.register("aper", config=APERConfig, help="APER: PEFT on the first session + prototype classifier on [pretrained, adapted] features")
class APER(Strategy):
    domain_incremental: ClassVar[bool] = True  # keeps working when a class reappears in a new domain
    input_kind = "images"
    stateful = ("sums", "counts")

    @classmethod
    def uses_cross_entropy(cls, cfg) -> bool:  # noqa: ANN001
        return True  # the first session's PEFT module and head

    def __init__(self, cfg: APERConfig, ctx: StrategyContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: APERConfig = cfg
        self.model = ctx.backbone.model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            self.module = build_peft(cfg.peft, self.model).to(self.device)
        dim = ctx.feature_dim * (2 if cfg.concat else 1)
        self.sums = torch.zeros(ctx.n_classes, dim, dtype=torch.float64, device=self.device)
        self.counts = torch.zeros(ctx.n_classes, dtype=torch.float64, device=self.device)
        self.head: nn.Linear | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.adapting = False

    def _forward(self, x: Tensor, adapted: bool) -> Tensor:
        if adapted:
            self.module.attach(self.model)
        try:
            return self.model(self.ctx.backbone.transform(x, self.device))
        finally:
            if adapted:
                self.module.detach()

    @torch.no_grad()
    def embed(self, x: Tensor) -> Tensor:
        self.module.eval()
        adapted = self._forward(x, True)
        return torch.cat([self._forward(x, False), adapted], dim=1) if self.cfg.concat else adapted

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        self.adapting = exp.task_id == 0
        if self.adapting:
            lo, hi = exp.class_range
            self.head = nn.Linear(self.ctx.feature_dim, hi - lo).to(self.device)
            self.optimizer = make_optimizer(list(self.module.parameters()) + list(self.head.parameters()), self.cfg)

    def observe(self, x: Tensor, y: Tensor, task_id: int) -> dict[str, float]:
        if not self.adapting:
            return {}
        assert self.head is not None and self.optimizer is not None
        self.module.train()
        lo = self.task_ranges[task_id][0]
        loss = self.classification_loss(self.head(self._forward(x, True)), y.to(self.device) - lo)
        self.optimizer_step(loss, self.optimizer)
        return {"loss": loss.item()}

    @torch.no_grad()
    def after_experience(self, exp: Experience) -> None:
        if self.adapting:
            self.module.eval().requires_grad_(False)
            self.head, self.optimizer, self.adapting = None, None, False
        for xb, yb in exp.train.batches(self.ctx.train.eval_batch_size):
            yb = yb.to(self.device)
            self.sums.index_add_(0, yb, self.embed(xb).double())
            self.counts.index_add_(0, yb, torch.ones_like(yb, dtype=torch.float64))

    @torch.no_grad()
    def predict(self, x: Tensor, task_id: int | None) -> Tensor:
        known = self.counts > 0
        return prototype_scores(self.embed(x), (self.sums / self.counts.clamp(min=1)[:, None]).float(), known, "cosine")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.module.parameters())

    def train_mode(self, mode: bool) -> None:
        self.model.eval()

    def storage_bytes(self) -> int:
        return self.module.num_parameters() * 4 + int((self.counts > 0).sum()) * self.sums.shape[1] * 4

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["module"] = self.module.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.module.load_state_dict(state["module"])
        self.module.eval().requires_grad_(False)
