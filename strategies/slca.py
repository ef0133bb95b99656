"""SLCA: Slow Learner with Classifier Alignment.

Zhang, Wang, Kang, Chen, Wei. "SLCA: Slow Learner with Classifier Alignment for Continual Learning
on a Pre-trained Model", ICCV 2023. https://arxiv.org/abs/2303.05118 (official code:
github.com/GengDavid/SLCA, read for the method).

* **Slow learner.** The whole backbone (``backbone.trainable``, not ``none``) is fine-tuned on every
  task with a learning rate 100 times below the head's (official: 1e-4 vs 1e-2; SGD, momentum 0.9,
  weight decay 5e-4): one optimiser, two parameter groups, both scaled by the loop's
  ``train.lr_schedule``. Each task gets its own linear head (truncated normal, std 0.02, zero bias);
  older heads are frozen, and the loss is the cross-entropy over the current task's logits only.
* **Statistics.** After a task, in eval mode and without augmentation, one pass over its training
  data gives each new class's mean μ_c and covariance Σ_c + 1e-4·I (float64 accumulation, stored as
  float32 means and upper triangles). Old classes are never refreshed, though the backbone moves.
* **Classifier alignment** (from the second task on). For ``ca_epochs`` epochs, ``ca_samples_per_class``
  features are drawn per class from N(μ_c, Σ_c) with the strategy's seeded generator, shuffled, and
  fed in batches of ``ca_samples_per_class`` to all heads, trained with SGD (lr 0.01, cosine per
  epoch, momentum 0.9, the weight decay) on the cross-entropy of logits divided by the mean over
  tasks of each task's logit norm, and by τ = ``ca_logit_norm`` (0.1).

Our reconstruction, and where it departs from the official code:

* ``ca_mean_decay`` (on): the official code, not the paper, draws an old class's features around
  a shrunk mean μ_c·(0.9 + 0.1·(τ_c + 1)/(t + 1)) (τ_c the class's task, t the current one): the
  older the class, the more its mean is pulled towards the origin (undocumented there; it damps the
  logits of old classes, whose statistics are stale since the backbone moved). Following the spec's rule (code form by default, paper form as an option), it is on; off gives the
  paper's N(μ_c, Σ_c). The official code takes a class's task as ``c // task_size``, wrong when the
  first task is larger; we use the tasks' real class ranges.
* ``keep_aligned`` (off): the official code evaluates the aligned heads and then restores the
  pre-alignment ones (``fc.recall()``) before the next task, so alignment never compounds. We do the
  same: the aligned heads are what is evaluated and reported after a task (and at the end of the
  run); the next task starts from the heads as they were before alignment (both are checkpointed).
  ``keep_aligned: true`` continues from the aligned heads instead.
* A class with a single sample has no unbiased covariance; it gets 1e-4·I.
* The official weights (AugReg IN-21k with the final LayerNorm re-initialised) and its MultiStep
  schedule are configuration: ``backbone.weights`` and ``train.lr_schedule: step`` with
  ``train.lr_milestones``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from cl.config import RunConfig
from cl.data.benchmark import Experience
from cl.registry import STRATEGIES
from cl.strategies.base import OptimConfig, Strategy, StrategyContext, make_optimizer
from cl.strategies.fecam import merge_moments, pack_upper, unpack_upper


class SLCAConfig(OptimConfig):
    name: Literal["slca"] = "slca"
    lr: float = Field(0.01, gt=0, description="learning rate of the heads (official 0.01)")
    backbone_lr: float = Field(1e-4, gt=0, description="learning rate of the backbone, the slow learner (official 0.01 × lr)")
    weight_decay: float = Field(5e-4, ge=0, description="both groups and the alignment (official 5e-4)")
    ca_epochs: int = Field(5, ge=0, description="classifier-alignment epochs after each task but the first (0 = no alignment)")
    ca_samples_per_class: int = Field(256, ge=2, description="features drawn per class per alignment epoch; also the alignment batch size")
    ca_lr: float = Field(0.01, gt=0, description="alignment SGD learning rate, cosine to 0 over ca_epochs")
    ca_logit_norm: float | None = Field(0.1, gt=0, description="τ: alignment logits divided by the mean per-task logit norm and by τ; null = plain cross-entropy")
    ca_mean_decay: bool = Field(True, description="sample old classes around 0.9 + 0.1·(task + 1)/(current + 1) times their mean (official code, not in the paper)")
    cov_jitter: float = Field(1e-4, ge=0, description="added to the diagonal of every class covariance")
    keep_aligned: bool = Field(False, description="start the next task from the aligned heads (official: from the heads before alignment)")

    def check(self, cfg: RunConfig) -> None:
        if cfg.backbone.trainable == "none":
            raise ValueError("backbone.trainable: slca fine-tunes the backbone (the slow learner); use 'all' (or 'last_blocks') instead of 'none'")
        if cfg.benchmark.scenario == "online":
            raise ValueError("strategy.name: slca re-reads each task's training data for its class statistics, which an online stream does not allow")


# ---- pure maths --------------------------------------------------------------------------------


def task_normalised_logits(logits: Tensor, bounds: list[tuple[int, int]], tau: float) -> Tensor:
    """``logits / mean_t ‖logits[:, lo_t:hi_t]‖ / τ``, each task's norm computed per sample (+1e-7)."""
    norms = torch.stack([logits[:, lo:hi].norm(dim=1) + 1e-7 for lo, hi in bounds], dim=1).mean(dim=1, keepdim=True)
    return logits / norms / tau


def sample_gaussians(means: Tensor, chols: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``n`` draws per class from N(means[k], L_k L_kᵀ): ``[K, n, d]``."""
    z = torch.randn(means.shape[0], n, means.shape[1], generator=generator, dtype=means.dtype).to(means.device)
    return means[:, None, :] + z @ chols.transpose(1, 2)


def stable_cholesky(cov: Tensor) -> Tensor:
    """Cholesky factor in float64; falls back to Q·sqrt(max(Λ, 0)) if rounding made ``cov`` indefinite."""
    cov = cov.double()
    L, info = torch.linalg.cholesky_ex(cov)
    if int(info) == 0:
        return L
    evals, Q = torch.linalg.eigh(cov)
    return Q * evals.clamp(min=0).sqrt()[None, :]


# ---- strategy ----------------------------------------------------------------------------------


@STRATEGIES.register("slca", config=SLCAConfig, help="SLCA: slow-learning backbone, per-task heads, Gaussian classifier alignment")
class SLCA(Strategy):
    input_kind = "images"
    stateful = ("means", "covs", "has_stats")

    @classmethod
    def uses_cross_entropy(cls, cfg) -> bool:  # noqa: ANN001
        return True

    def __init__(self, cfg: SLCAConfig, ctx: StrategyContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: SLCAConfig = cfg
        d, c = ctx.feature_dim, ctx.n_classes
        self.heads = nn.ModuleDict()  # task id -> Linear over that task's classes
        self.backup: dict[str, Tensor] | None = None  # the heads before the last alignment
        self.means = torch.zeros(c, d, device=self.device)
        self.covs = torch.zeros(c, d * (d + 1) // 2, device=self.device)  # upper triangles, float32
        self.has_stats = torch.zeros(c, dtype=torch.bool, device=self.device)
        self.optimizer: torch.optim.Optimizer | None = None

    # ---- slow learner ------------------------------------------------------------------------

    def new_head(self, n: int) -> nn.Linear:
        head = nn.Linear(self.ctx.feature_dim, n)
        with torch.no_grad():
            nn.init.trunc_normal_(head.weight, std=0.02, generator=self.generator)
            head.bias.zero_()
        return head.to(self.device)

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        if self.backup is not None and not self.cfg.keep_aligned:
            self.heads.load_state_dict(self.backup)
        self.backup = None
        self.heads.requires_grad_(False)
        lo, hi = exp.class_range
        head = self.new_head(hi - lo)
        self.heads[str(exp.task_id)] = head
        groups = [{"params": self.backbone_parameters(), "lr": self.cfg.backbone_lr}, {"params": list(head.parameters()), "lr": self.cfg.lr}]
        self.optimizer = make_optimizer([g for g in groups if g["params"]], self.cfg)  # type: ignore[misc]

    def observe(self, x: Tensor, y: Tensor, task_id: int) -> dict[str, float]:
        assert self.optimizer is not None, "before_experience must run first"
        self.train_mode(True)
        lo = self.task_ranges[task_id][0]
        logits = self.heads[str(task_id)](self.encode(x))
        loss = self.classification_loss(logits, y.to(self.device) - lo)
        self.optimizer_step(loss, self.optimizer)
        return {"loss": loss.item()}

    # ---- statistics and alignment ------------------------------------------------------------

    @torch.no_grad()
    def class_statistics(self, exp: Experience) -> None:
        """Mean and covariance (+ jitter) of each class of ``exp`` under the current backbone."""
        self.train_mode(False)
        d = self.ctx.feature_dim
        lo, hi = exp.class_range
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        moments = {c: (zero, torch.zeros(d, dtype=torch.float64, device=self.device), torch.zeros(d, d, dtype=torch.float64, device=self.device))
                   for c in range(lo, hi)}
        for xb, yb in exp.train.batches(self.ctx.train.eval_batch_size):
            feats = self.encode(xb).double()
            yb = yb.to(self.device)
            for c in yb.unique().tolist():
                moments[c] = merge_moments(*moments[c], feats[yb == c])
        eye = torch.eye(d, dtype=torch.float64, device=self.device)
        for c, (n, mean, scatter) in moments.items():
            if n == 0:
                continue
            cov = scatter / (n - 1) if n > 1 else torch.zeros_like(scatter)
            self.means[c] = mean.float()
            self.covs[c] = pack_upper(cov + self.cfg.cov_jitter * eye).float()
            self.has_stats[c] = True

    def task_bounds(self) -> list[tuple[int, int]]:
        bounds = [self.task_ranges[int(t)] for t in self.heads]
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])) and bounds[0][0] == 0, "tasks must cover classes 0.. in order"
        return bounds

    def all_logits(self, feats: Tensor) -> Tensor:
        """Logits over classes 0..seen-1, the heads concatenated in task order."""
        return torch.cat([head(feats) for head in self.heads.values()], dim=1)

    def align(self) -> list[float]:
        """Classifier alignment on features sampled from the stored Gaussians; returns the mean loss per epoch."""
        cfg = self.cfg
        bounds = self.task_bounds()
        n_cls, n, d = bounds[-1][1], cfg.ca_samples_per_class, self.ctx.feature_dim
        current = len(bounds) - 1
        task_of = torch.cat([torch.full((hi - lo,), t) for t, (lo, hi) in enumerate(bounds)])
        scale = 0.9 + 0.1 * (task_of + 1) / (current + 1) if cfg.ca_mean_decay else torch.ones(n_cls)
        means = self.means[:n_cls] * scale[:, None].to(self.device)
        chols = torch.stack([stable_cholesky(unpack_upper(self.covs[c], d)) for c in range(n_cls)]).float()
        labels = torch.arange(n_cls, device=self.device).repeat_interleave(n)
        params = list(self.heads.parameters())
        self.heads.requires_grad_(True)
        optimizer = torch.optim.SGD(params, lr=cfg.ca_lr, momentum=0.9, weight_decay=cfg.weight_decay)
        losses = []
        for epoch in range(cfg.ca_epochs):
            for group in optimizer.param_groups:  # CosineAnnealingLR(T_max=ca_epochs), stepped per epoch
                group["lr"] = cfg.ca_lr * (1 + math.cos(math.pi * epoch / cfg.ca_epochs)) / 2
            feats = sample_gaussians(means, chols, n, self.generator).reshape(-1, d)
            order = torch.randperm(len(feats), generator=self.generator).to(self.device)
            total = 0.0
            for b in range(n_cls):
                idx = order[b * n : (b + 1) * n]
                logits = self.all_logits(feats[idx])
                if cfg.ca_logit_norm is not None:
                    logits = task_normalised_logits(logits, bounds, cfg.ca_logit_norm)
                loss = F.cross_entropy(logits, labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item()
            losses.append(total / n_cls)
        self.heads.requires_grad_(False)
        return losses

    def after_experience(self, exp: Experience) -> None:
        self.optimizer = None
        self.heads.requires_grad_(False)
        self.class_statistics(exp)
        self.backup = {k: v.clone() for k, v in self.heads.state_dict().items()}
        if len(self.heads) > 1 and self.cfg.ca_epochs > 0:
            self.align()

    # ---- evaluation and bookkeeping ----------------------------------------------------------

    @torch.no_grad()
    def predict(self, x: Tensor, task_id: int | None) -> Tensor:
        self.train_mode(False)
        scores = torch.full((len(x), self.ctx.n_classes), float("-inf"), device=self.device)
        if len(self.heads) == 0:
            return scores
        feats = self.encode(x).float()
        for t, head in self.heads.items():
            lo, hi = self.task_ranges[int(t)]
            scores[:, lo:hi] = head(feats)
        return scores

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters()) + self.backbone_parameters()

    def storage_bytes(self) -> int:
        """The trained backbone, the heads (and their pre-alignment copy, kept to go on), float32
        means and covariance upper triangles of the classes seen."""
        d = self.ctx.feature_dim
        copies = 2 if self.backup is not None and not self.cfg.keep_aligned else 1
        heads = sum(p.numel() for p in self.heads.parameters()) * 4 * copies
        return super().storage_bytes() + heads + int(self.has_stats.sum()) * (d + d * (d + 1) // 2) * 4

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["heads"] = self.heads.state_dict()
        state["backup"] = self.backup
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.heads = nn.ModuleDict({str(t): nn.Linear(self.ctx.feature_dim, hi - lo) for t, (lo, hi) in sorted(self.task_ranges.items())}).to(self.device)
        self.heads.load_state_dict(state["heads"])
        self.heads.requires_grad_(False)
        self.backup = state["backup"]
