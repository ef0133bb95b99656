"""EASE: Expandable Subspace Ensemble for pre-trained model-based class-incremental learning.

Zhou, Sun, Ye, Zhan. "Expandable Subspace Ensemble for Pre-Trained Model-Based Class-Incremental
Learning", CVPR 2024. https://arxiv.org/abs/2403.12030 (official code: sun-hailong/CVPR24-Ease,
built on LAMDA-PILOT).

Every task gets a fresh AdaptFormer-parallel adapter on each MLP of a frozen ViT (:mod:`cl.peft.adapter`:
``y = x' + MLP(LN2 x') + s·up(Drop(ReLU(down x')))``, bottleneck 64, s = 0.1, dropout 0.1, ``down``
kaiming-uniform, ``up`` and biases zero). It is trained with a temporary cosine head over the task's
own classes (learnable scale σ, initialised to 1) and cross-entropy, then frozen for good; the
adapter of task i spans *subspace* i (the final-LN CLS features with that adapter attached).

After each task t, the new classes' prototypes (mean pre-logits, eval mode, no augmentation) are
stored in every subspace j ≤ t. An old class has no data, hence no prototype, in subspaces added
after its task; the *prototype complement* synthesises it: for an old task i and a later subspace
j > i, with N the classes of tasks j..t (they have true prototypes in both subspaces i and j),

    S = softmax_row(cos(P_i[task i classes], P_i[N]))      (similarities in the old task's own subspace i)
    P_j[task i classes] = S · P_j[N]

``recalc_sim: true`` (every shipped config) recomputes every pair (i, j) after every task, so N grows
as tasks arrive; ``false`` fills the pair (i, t) once, when subspace t appears, with N = task t's
classes (the official ``solve_similarity``). Only true prototypes enter the formula, so the result
does not depend on the order in which pairs are filled.

Inference runs the backbone once per adapter (cost grows linearly with the tasks) and scores a class
c of task i by ``Σ_j w_ij·cos(f_j, P_j[c])`` with ``w_ii = 1`` and ``w_ij = α / (J − 1)`` for the
J − 1 other subspaces (the code's ``forward_reweight``; the paper's exact form is unverified), over
the classes seen so far (``-inf`` elsewhere).

Our reconstruction / deviations from the official code:

* The adapter-free pretrained pass (``use_init_ptm``) is the option ``beta``: null (off, as in the
  CIFAR / ImageNet-R / -A / ObjectNet / VTAB configs) or its weight β (1 in the CUB-1k and
  OmniBenchmark configs): one more pass, every class's prototype in the pretrained space, and
  ``β·cos(f_ptm, p_ptm[c])`` added to every logit. It takes no part in the complement, as in the code.
* The final cosine classifier's σ is left out: in the code it stays at its initial 1 (it is never
  in a loss), and a positive scale does not change the ranking.
* The ablations ``use_diagonal``, ``use_old_data`` (exemplars) and ``moni_adam`` are not reproduced.
* The official cosine schedule is per epoch to ``min_lr`` 0; here ``train.lr_schedule: cosine``
  anneals per optimiser step to 0, the framework's one schedule for every strategy.
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
from cl.errors import ConfigError
from cl.peft import build_peft
from cl.peft.adapter import AdapterConfig
from cl.peft.base import PeftMethod, backbone_family
from cl.registry import STRATEGIES
from cl.strategies.base import OptimConfig, Strategy, StrategyContext, make_optimizer


class EASEConfig(OptimConfig):
    name: Literal["ease"] = "ease"
    lr: float = Field(0.025, gt=0, description="the official CIFAR config (ImageNet-R: 0.05)")
    weight_decay: float = Field(5e-4, ge=0, description="the official CIFAR config (ImageNet-R: 5e-3)")
    bottleneck: int = Field(64, ge=1, description="adapter width r (the official ffn_num)")
    scale: float = Field(0.1, gt=0, description="adapter output scale s")
    dropout: float = Field(0.1, ge=0, lt=1, description="adapter dropout after the ReLU")
    alpha: float = Field(0.1, ge=0, description="total weight of the other subspaces in a class's logit (divided among them)")
    recalc_sim: bool = Field(True, description="recompute every prototype complement after every task (official default); false = fill each once")
    beta: float | None = Field(None, ge=0, description="weight of the adapter-free pretrained subspace (one more pass; official use_init_ptm); null = off")

    def check(self, cfg: RunConfig) -> None:
        if cfg.backbone.trainable != "none":
            raise ValueError(f"backbone.trainable: ease trains per-task adapters on a frozen backbone; use 'none' (got '{cfg.backbone.trainable}')")
        if cfg.benchmark.scenario == "online":
            raise ValueError("strategy.name: ease re-reads each task's training data for its prototypes in every subspace, which an online stream does not allow")

    def adapter(self) -> AdapterConfig:
        return AdapterConfig(placement="parallel", bottleneck=self.bottleneck, scale=self.scale, dropout=self.dropout,
                             activation="relu", init="zero", bias=True)


# ---- the maths ----------------------------------------------------------------------------------


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarities [n, m] between the rows of ``a`` [n, d] and ``b`` [m, d]."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def complete_prototypes(old_own: Tensor, new_own: Tensor, new_target: Tensor) -> Tensor:
    """Prototype complement: old classes' prototypes in a subspace they have no data in.

    Args:
        old_own: [m, d] the old classes' prototypes in their own task's subspace.
        new_own: [n, d] the reference classes' prototypes in that same subspace.
        new_target: [n, d] the reference classes' prototypes in the target subspace.

    Returns:
        [m, d] ``softmax_row(cos(old_own, new_own)) @ new_target``.
    """
    return torch.softmax(cosine(old_own, new_own), dim=1) @ new_target


def subspace_weights(owner: Tensor, n_subspaces: int, alpha: float) -> Tensor:
    """[J, C] weight of subspace j in the logit of class c: 1 in the class's own subspace
    ``owner[c]``, ``alpha / (J - 1)`` in every other one."""
    off = alpha / (n_subspaces - 1) if n_subspaces > 1 else 0.0
    w = torch.full((n_subspaces, len(owner)), off, dtype=torch.float32, device=owner.device)
    w[owner, torch.arange(len(owner), device=owner.device)] = 1.0
    return w


def ensemble_logits(cosines: Tensor, owner: Tensor, alpha: float) -> Tensor:
    """EASE logits [B, C] from per-subspace cosine scores ``cosines`` [J, B, C] (feature of pass j
    against the class prototypes in subspace j) and each class's own subspace ``owner`` [C]."""
    return torch.einsum("jbc,jc->bc", cosines, subspace_weights(owner, cosines.shape[0], alpha).to(cosines.dtype))


class CosineHead(nn.Module):
    """σ·cos(f, w_k): the temporary classifier an adapter is trained with."""

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(dim)
        self.weight = nn.Parameter(torch.empty(n_classes, dim).uniform_(-bound, bound))
        self.sigma = nn.Parameter(torch.ones(1))

    def forward(self, f: Tensor) -> Tensor:
        return self.sigma * cosine(f, self.weight)


# ---- the strategy ------------------------------------------------------------------------------


@STRATEGIES.register("ease", config=EASEConfig, help="EASE: one adapter per task, subspace ensemble with prototype complement")
class EASE(Strategy):
    input_kind = "images"  # the adapters change the features: nothing can be cached

    @classmethod
    def uses_cross_entropy(cls, cfg) -> bool:  # noqa: ANN001
        return True

    def __init__(self, cfg: EASEConfig, ctx: StrategyContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: EASEConfig = cfg
        self.model = ctx.backbone.model
        if backbone_family(self.model) != "vit":
            raise ConfigError(f"backbone.name: 'ease' needs a timm ViT (adapters on each block's MLP), not {type(self.model).__name__}")
        self.adapters: list[PeftMethod] = []  # adapter j spans subspace j (task j)
        self.prototypes: list[Tensor] = []  # [n_classes, d] per subspace: true or complemented, zero for unseen classes
        self.owner = torch.full((ctx.n_classes,), -1, dtype=torch.long, device=self.device)  # subspace of each class's task
        self.pretrained = torch.zeros(ctx.n_classes, ctx.feature_dim, device=self.device)  # prototypes without adapter (beta)
        self.head: CosineHead | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    # ---- features ----------------------------------------------------------------------------

    def _features(self, x: Tensor, j: int | None) -> Tensor:
        """Pre-logits (final-LN CLS) with adapter ``j`` attached (None: the pretrained model)."""
        if j is None:
            return self.model(self.ctx.backbone.transform(x, self.device))
        adapter = self.adapters[j].attach(self.model)
        try:
            return self.model(self.ctx.backbone.transform(x, self.device))
        finally:
            adapter.detach()

    def _class_means(self, exp: Experience, j: int | None) -> Tensor:
        """[classes of ``exp``, d] mean features of its training data in subspace ``j``."""
        lo, hi = exp.class_range
        sums = torch.zeros(hi - lo, self.ctx.feature_dim, dtype=torch.float64, device=self.device)
        counts = torch.zeros(hi - lo, dtype=torch.float64, device=self.device)
        for xb, yb in exp.train.batches(self.ctx.train.eval_batch_size):
            yb = yb.to(self.device) - lo
            sums.index_add_(0, yb, self._features(xb, j).double())
            counts.index_add_(0, yb, torch.ones_like(yb, dtype=torch.float64))
        return (sums / counts.clamp(min=1)[:, None]).float()

    @property
    def n_subspaces(self) -> int:
        """Subspaces with prototypes (the adapter under training is not one yet)."""
        return len(self.prototypes)

    # ---- training ----------------------------------------------------------------------------

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        t = exp.task_id
        if t != len(self.adapters):
            raise ValueError(f"ease: experiences must arrive in order (task {t} after {len(self.adapters)} adapters)")
        lo, hi = exp.class_range
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.ctx.seed * 1000 + t)
            adapter = build_peft(self.cfg.adapter(), self.model).to(self.device)
            self.head = CosineHead(self.ctx.feature_dim, hi - lo).to(self.device)
        self.adapters.append(adapter)
        self.optimizer = make_optimizer(list(adapter.parameters()) + list(self.head.parameters()), self.cfg)

    def observe(self, x: Tensor, y: Tensor, task_id: int) -> dict[str, float]:
        assert self.head is not None and self.optimizer is not None
        self.adapters[task_id].train()  # dropout; the backbone itself stays in eval
        lo = self.task_ranges[task_id][0]
        loss = self.classification_loss(self.head(self._features(x, task_id)), y.to(self.device) - lo)
        self.optimizer_step(loss, self.optimizer)
        return {"loss": loss.item()}

    @torch.no_grad()
    def after_experience(self, exp: Experience) -> None:
        t = exp.task_id
        adapter = self.adapters[t].eval().requires_grad_(False)
        for p in adapter.parameters():
            p.grad = None  # frozen for good: its last gradients are dead weight
        self.head, self.optimizer = None, None
        lo, hi = exp.class_range
        self.prototypes.append(torch.zeros(self.ctx.n_classes, self.ctx.feature_dim, device=self.device))
        for j in range(t + 1):  # the new classes' true prototypes in every subspace so far
            self.prototypes[j][lo:hi] = self._class_means(exp, j)
        if self.cfg.beta is not None:
            self.pretrained[lo:hi] = self._class_means(exp, None)
        self.owner[lo:hi] = t
        self._complete(t)

    def _complete(self, t: int) -> None:
        """Fill old classes' prototypes in later subspaces (see the module docstring)."""
        for i in range(t):
            a, b = self.task_ranges[i]
            for j in range(i + 1, t + 1) if self.cfg.recalc_sim else (t,):
                ref = torch.cat([torch.arange(*self.task_ranges[k], device=self.device) for k in range(j, t + 1)])
                own = self.prototypes[i]
                self.prototypes[j][a:b] = complete_prototypes(own[a:b], own[ref], self.prototypes[j][ref])

    # ---- inference ---------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, x: Tensor, task_id: int | None) -> Tensor:
        scores = torch.full((len(x), self.ctx.n_classes), float("-inf"), device=self.device)
        known = self.owner >= 0  # set with the prototypes, after the task's training
        if not bool(known.any()):
            return scores
        cols = known.nonzero().squeeze(1)
        cosines = []
        for j in range(self.n_subspaces):
            self.adapters[j].eval()
            cosines.append(cosine(self._features(x, j).float(), self.prototypes[j][cols]))
        logits = ensemble_logits(torch.stack(cosines), self.owner[cols], self.cfg.alpha)
        if self.cfg.beta is not None:
            logits = logits + self.cfg.beta * cosine(self._features(x, None).float(), self.pretrained[cols])
        scores[:, cols] = logits
        return scores

    # ---- bookkeeping -------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every task's adapter (each trained once) and the temporary head while it exists."""
        params = [p for a in self.adapters for p in a.parameters()]
        return params + (list(self.head.parameters()) if self.head is not None else [])

    def train_mode(self, mode: bool) -> None:
        self.model.eval()  # the backbone is frozen; adapter dropout follows observe/predict

    def storage_bytes(self) -> int:
        """Adapters (float32) + one prototype per seen class per subspace, the pretrained one
        included with ``beta`` (float32)."""
        adapters = sum(a.num_parameters() for a in self.adapters[: self.n_subspaces]) * 4
        spaces = self.n_subspaces + (self.cfg.beta is not None and self.n_subspaces > 0)
        return adapters + int((self.owner >= 0).sum()) * spaces * self.ctx.feature_dim * 4

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        finished = self.n_subspaces  # checkpoints are taken between experiences
        state["adapters"] = [a.state_dict() for a in self.adapters[:finished]]
        state["prototypes"] = list(self.prototypes)
        state["owner"] = self.owner
        state["pretrained"] = self.pretrained
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.adapters = []
        for adapter_state in state["adapters"]:
            with torch.random.fork_rng(devices=[]):
                adapter = build_peft(self.cfg.adapter(), self.model).to(self.device)
            adapter.load_state_dict(adapter_state)
            self.adapters.append(adapter.eval().requires_grad_(False))
        self.prototypes = [p.to(self.device) for p in state["prototypes"]]
        self.owner = state["owner"].to(self.device)
        self.pretrained = state["pretrained"].to(self.device)
        self.head, self.optimizer = None, None
