"""A generative classifier built from the replay memory, trained with a metric-learning loss (online CIL).

Shen, Jie, Li, Deng. "Bypassing Logits Bias in Online Class-Incremental Learning with a Generative
Framework", arXiv 2022. https://arxiv.org/abs/2205.09347

Only the abstract is available; this follows the reconstruction in specs/cl_methods.md §2, with
each unverified choice a config option:

* no softmax classifier at inference: classes are scored in embedding space from the replay
  memory, re-embedded with the current encoder - ``classifier: ncm`` (cosine to the normalised
  class mean) or ``kde`` (log of a class-conditional kernel density, exp(κ zᵀz_m));
* training minimises a pair-based metric loss (Multi-Similarity, the paper's loss is not named)
  on the stream batch ∪ a replay batch, plus ``gamma`` x a proxy-based softmax over the classes
  observed so far (the "hybrid" discriminative term; ``gamma: 0``, the default, disables it:
  validation selected it over 0.1, 0.3 and 1 offline and online, see experiments/tuning/);
* the encoder is the backbone's trainable part (``backbone.trainable``) plus a projection MLP; with a
  frozen backbone the projection trains on cached features;
* the memory is a reservoir updated after every stream batch.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from cl.data.benchmark import Experience
from cl.memory import ClassBalancedMemory, ReservoirMemory, create_memory, resolve_memory_policy
from cl.registry import STRATEGIES
from cl.strategies.base import OptimConfig, Strategy, StrategyContext, make_optimizer
from cl.strategies.losses import multi_similarity_loss, proxy_softmax_loss


class GenerativeClassifierConfig(OptimConfig):
    name: Literal["generative_classifier"] = "generative_classifier"
    memory_size: int = Field(500, ge=1)
    memory_policy: Literal["auto", "reservoir", "class_balanced"] = Field(
        "auto", description="auto = reservoir online (the paper's setting), class_balanced offline (like ER)"
    )
    replay_batch_size: int | None = Field(None, ge=1, description="memory samples joined to each batch (null = the batch size, like ER)")
    iterations: int = Field(1, ge=1, description="optimisation steps per stream batch")
    hidden_dims: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [256], description="projection MLP hidden sizes")
    embedding_dim: int = Field(128, ge=2)
    ms_alpha: float = Field(2.0, gt=0, description="MS scale_pos")
    ms_beta: float = Field(40.0, gt=0, description="MS scale_neg")
    ms_lambda: float = Field(0.5, description="MS similarity threshold")
    ms_margin: float = Field(0.1, ge=0, description="MS mining margin")
    gamma: float = Field(
        0.0, ge=0, description="weight of the discriminative proxy term [RECON]; 0 = metric loss only, selected on validation "
        "in both Fashion-MNIST suites over {0, 0.1, 0.3, 1} (experiments/tuning/)"
    )
    proxy_scale: float = Field(16.0, gt=0, description="scale s of the proxy softmax [RECON]")
    classifier: Literal["ncm", "kde"] = Field("ncm", description="generative classifier over the memory [RECON]")
    kde_temperature: float = Field(10.0, gt=0, description="κ of the kernel exp(κ zᵀz_m) [RECON]")
    encode_batch_size: int = Field(1024, ge=1, description="batch size when re-embedding the memory")


def ncm_scores(z: Tensor, memory_z: Tensor, memory_y: Tensor, n_classes: int) -> Tensor:
    """Cosine similarity to each class's normalised mean memory embedding; -inf for absent classes."""
    d = memory_z.shape[1]
    sums = torch.zeros(n_classes, d, device=z.device, dtype=z.dtype).index_add_(0, memory_y, memory_z)
    counts = torch.bincount(memory_y, minlength=n_classes)
    means = F.normalize(sums, dim=1)
    scores = F.normalize(z, dim=1) @ means.T
    return scores.masked_fill((counts == 0)[None, :], float("-inf"))


def kde_scores(z: Tensor, memory_z: Tensor, memory_y: Tensor, n_classes: int, temperature: float) -> Tensor:
    """log (1/|M_c|) Σ_{m ∈ M_c} exp(κ zᵀz_m) per class; -inf for absent classes."""
    logits = temperature * F.normalize(z, dim=1) @ F.normalize(memory_z, dim=1).T  # [B, M]
    counts = torch.bincount(memory_y, minlength=n_classes)
    scores = torch.full((len(z), n_classes), float("-inf"), device=z.device, dtype=z.dtype)
    for c in torch.nonzero(counts).flatten().tolist():
        scores[:, c] = torch.logsumexp(logits[:, memory_y == c], dim=1) - math.log(int(counts[c]))
    return scores


def projection_mlp(in_dim: int, hidden: list[int], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), nn.ReLU()]
        in_dim = h
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


@STRATEGIES.register("generative_classifier", config=GenerativeClassifierConfig, help="memory-based generative classifier + metric loss (online)")
class GenerativeClassifier(Strategy):
    stateful = ("projection", "proxies", "_memory", "observed", "optimizer")

    def __init__(self, cfg: GenerativeClassifierConfig, ctx: StrategyContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: GenerativeClassifierConfig = cfg
        self.projection = projection_mlp(ctx.feature_dim, cfg.hidden_dims, cfg.embedding_dim).to(self.device)
        self.proxies = nn.Parameter(torch.randn(ctx.n_classes, cfg.embedding_dim, device=self.device) * 0.1)
        self._memory = create_memory(resolve_memory_policy(cfg.memory_policy, ctx.scenario), cfg.memory_size, self.generator)
        self.observed = torch.zeros(ctx.n_classes, dtype=torch.bool, device=self.device)
        params = self.trainable_parameters()
        self.optimizer = make_optimizer(params, cfg)  # one optimiser for the whole stream (task-free)
        self._version = 0  # bumped by every update; the memory embedding cache is valid for one version
        self._cache: tuple[int, Tensor, Tensor] | None = None
        self.memory_encodings = 0  # how many times the memory was re-embedded (for tests and benchmarks)

    def trainable_parameters(self) -> list[nn.Parameter]:
        extra = [self.proxies] if self.cfg.gamma > 0 else []
        return list(self.projection.parameters()) + extra + self.backbone_parameters()

    def embed(self, x: Tensor) -> Tensor:
        return F.normalize(self.projection(self.encode(x)), dim=1)

    def observe(self, x: Tensor, y: Tensor, task_id: int) -> dict[str, float]:
        self.train_mode(True)
        self.projection.train()
        y = y.to(self.device)
        self.observed[y] = True
        terms: dict[str, float] = {}
        for _ in range(self.cfg.iterations):
            xb, yb = x, y
            if len(self._memory):
                mx, my, _ = self._memory.sample(self.cfg.replay_batch_size or len(y))
                xb, yb = torch.cat([x, mx.to(x.dtype)]), torch.cat([y, my.to(self.device)])
            z = self.embed(xb)
            ms, anchors = multi_similarity_loss(z, yb, self.cfg.ms_alpha, self.cfg.ms_beta, self.cfg.ms_lambda, self.cfg.ms_margin)
            loss = ms
            terms = {"loss_ms": ms.item(), "ms_anchors": float(anchors)}
            if self.cfg.gamma > 0:
                disc = proxy_softmax_loss(z, yb, self.proxies, self.observed, self.cfg.proxy_scale)
                loss = loss + self.cfg.gamma * disc
                terms["loss_disc"] = disc.item()
            self.optimizer_step(loss, self.optimizer)
            terms["loss"] = loss.item()
        if isinstance(self._memory, ReservoirMemory):
            self._memory.add(x, y.cpu(), task_id)
        self._version += 1
        return terms

    def after_experience(self, exp: Experience) -> None:
        super().after_experience(exp)
        if isinstance(self._memory, ClassBalancedMemory):  # offline: refilled from the experience, like ER's
            self._memory.update(exp.train.x, exp.train.y, exp.task_id)
            self._version += 1

    @torch.no_grad()
    def memory_embeddings(self) -> tuple[Tensor, Tensor]:
        """The whole memory re-embedded with the current encoder, once per model version."""
        if self._cache is None or self._cache[0] != self._version:
            self.train_mode(False)
            self.projection.eval()
            assert self._memory.x is not None
            x = self._memory.x
            z = torch.cat([self.embed(x[i : i + self.cfg.encode_batch_size]) for i in range(0, len(x), self.cfg.encode_batch_size)])
            self._cache = (self._version, z, self._memory.y.to(self.device))
            self.memory_encodings += 1
        return self._cache[1], self._cache[2]

    @torch.no_grad()
    def predict(self, x: Tensor, task_id: int | None) -> Tensor:
        if len(self._memory) == 0:
            return torch.full((len(x), self.ctx.n_classes), float("-inf"), device=self.device)
        memory_z, memory_y = self.memory_embeddings()
        self.train_mode(False)
        self.projection.eval()
        z = self.embed(x)
        if self.cfg.classifier == "ncm":
            return ncm_scores(z, memory_z, memory_y, self.ctx.n_classes)
        return kde_scores(z, memory_z, memory_y, self.ctx.n_classes, self.cfg.kde_temperature)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._version += 1  # invalidate the cache

    def storage_bytes(self) -> int:
        params = sum(p.numel() * 4 for p in self.projection.parameters()) + (self.proxies.numel() * 4 if self.cfg.gamma > 0 else 0)
        return params + super().storage_bytes()
