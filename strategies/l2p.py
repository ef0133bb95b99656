"""L2P: Learning to Prompt for continual learning (Wang et al., CVPR 2022; google-research/l2p).

A pool of ``pool_size`` prompts (each ``length`` tokens) with one learnable key each lives next to
a frozen ViT. For an image, the query is the frozen model's own pre-logits feature; the ``top_k``
prompts whose keys are most cosine-similar are inserted after the prefix (CLS) token at the input
of the first block, and the classifier reads the mean of the selected prompt tokens' outputs (the
paper's prompt head). Training minimises cross-entropy over the current task's classes only (the
paper's logit mask) plus ``pull`` × mean(1 − cos(query, selected keys)), which pulls the chosen
keys towards the queries that chose them. One shared head; prediction is over all classes seen.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from cl.config import RunConfig
from cl.data.benchmark import Experience
from cl.errors import ConfigError
from cl.peft.base import backbone_family, vit_dim
from cl.registry import STRATEGIES
from cl.strategies.base import OptimConfig, Strategy, StrategyContext, make_optimizer


class L2PConfig(OptimConfig):
    name: Literal["l2p"] = "l2p"
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0)
    pool_size: int = Field(10, ge=1)
    length: int = Field(5, ge=1, description="tokens per prompt")
    top_k: int = Field(5, ge=1)
    pull: float = Field(0.1, ge=0, description="weight of the key-query surrogate loss")

    def check(self, cfg: RunConfig) -> None:
        if self.top_k > self.pool_size:
            raise ValueError(f"strategy.top_k: {self.top_k} exceeds pool_size {self.pool_size}")
        if cfg.backbone.trainable != "none":
            raise ValueError(f"backbone.trainable: l2p prompts a frozen backbone; use 'none' (got '{cfg.backbone.trainable}')")


@STRATEGIES.register("l2p", config=L2PConfig, help="L2P: key-query prompt pool on a frozen ViT")
class L2P(Strategy):
    input_kind = "images"
    stateful = ("pool",)

    @classmethod
    def uses_cross_entropy(cls, cfg) -> bool:  # noqa: ANN001
        return True

    def __init__(self, cfg: L2PConfig, ctx: StrategyContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: L2PConfig = cfg
        self.model = ctx.backbone.model
        if backbone_family(self.model) != "vit" or not hasattr(self.model, "norm_pre"):
            raise ConfigError(f"strategy.name: 'l2p' needs a timm ViT, not {type(self.model).__name__}")
        d = vit_dim(self.model)
        g = torch.Generator().manual_seed(ctx.seed)
        self.pool = nn.ParameterDict({
            "prompts": nn.Parameter(torch.rand(cfg.pool_size, cfg.length, d, generator=g) * 2 - 1),
            "key": nn.Parameter(torch.rand(cfg.pool_size, d, generator=g) * 2 - 1),
            "head_weight": nn.Parameter(torch.zeros(ctx.n_classes, d)),
            "head_bias": nn.Parameter(torch.zeros(ctx.n_classes)),
        }).to(self.device)
        nn.init.kaiming_uniform_(self.pool["head_weight"], a=5**0.5)
        self.n_prefix = int(self.model.num_prefix_tokens)
        self.optimizer = make_optimizer(list(self.pool.values()), cfg)
        self._inserted: Tensor | None = None
        self.model.norm_pre.register_forward_hook(self._insert)

    def _insert(self, module: nn.Module, args: tuple[Tensor, ...], x: Tensor) -> Tensor:
        if self._inserted is None:
            return x
        k = self.n_prefix
        return torch.cat([x[:, :k], self._inserted.to(x.dtype), x[:, k:]], dim=1)

    @contextlib.contextmanager
    def _prompted(self, prompts: Tensor) -> Iterator[None]:
        self._inserted = prompts
        try:
            yield
        finally:
            self._inserted = None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(logits over all classes, query, selected keys) for a uint8 batch."""
        inputs = self.ctx.backbone.transform(x, self.device)
        with torch.no_grad():
            query = self.model(inputs)  # the frozen model's own feature
        sims = F.normalize(query, dim=1) @ F.normalize(self.pool["key"], dim=1).T
        idx = sims.topk(self.cfg.top_k, dim=1).indices  # (B, k)
        prompts = self.pool["prompts"][idx].flatten(1, 2)  # (B, k*L, d)
        with self._prompted(prompts):
            tokens = self.model.forward_features(inputs)
        n = prompts.shape[1]
        feats = tokens[:, self.n_prefix : self.n_prefix + n].mean(dim=1)
        logits = F.linear(feats, self.pool["head_weight"], self.pool["head_bias"])
        return logits, query, self.pool["key"][idx]

    def observe(self, x: Tensor, y: Tensor, task_id: int) -> dict[str, float]:
        self.model.eval()
        logits, query, keys = self.forward(x)
        lo, hi = self.task_ranges[task_id]
        n = len(y)
        ce = self.classification_loss(logits, y.to(self.device), torch.full((n,), lo, device=self.device), torch.full((n,), hi, device=self.device))
        surrogate = (1 - F.cosine_similarity(query[:, None, :], keys, dim=-1)).mean()
        loss = ce + self.cfg.pull * surrogate
        self.optimizer_step(loss, self.optimizer)
        return {"loss": loss.item(), "loss_ce": ce.item(), "loss_pull": surrogate.item()}

    @torch.no_grad()
    def predict(self, x: Tensor, task_id: int | None) -> Tensor:
        self.model.eval()
        logits = self.forward(x)[0]
        logits[:, self.seen_classes :] = float("-inf")
        return logits

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        self.optimizer = make_optimizer(list(self.pool.values()), self.cfg)  # fresh per task, as the official code

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.pool.values())

    def train_mode(self, mode: bool) -> None:
        self.model.eval()

    def storage_bytes(self) -> int:
        return sum(p.numel() * 4 for p in self.pool.values())
