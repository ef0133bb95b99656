"""RanPAC: first-session PEFT, then random projection + class-prototype ridge regression.

McDonnell, Gong, Parvaneh, Abbasnejad, van den Hengel. "RanPAC: Random Projections and
Pre-trained Models for Continual Learning", NeurIPS 2023 (RanPAC/RanPAC, read for the method).

* **Phase 1** (``first_session``, the paper's main configuration for ViTs): on the first task only,
  a parameter-efficient module (any :mod:`cl.peft` method; default the official AdaptFormer with
  d=64, the paper also uses SSF or VPT) is trained with a temporary cosine-similarity head with a learnable scale (the
  official ``CosineLinear``), SGD with a cosine learning-rate schedule over ``train.epochs``; then
  the module is frozen for good and stored (packed to 1 bit with ``bits: 1``; what is used
  afterwards is what is stored). Offline only. ``first_session: null`` skips it (the paper's choice for ResNets
  and CLIP, and its "no PETL" ablation); the strategy then runs on cached features.
* **Phase 2**: features ``f`` of the (adapted) backbone go through a fixed random projection and a
  ReLU, ``h = ReLU(f W)`` with ``W ~ N(0, 1)`` of size d × M. Only the Gram matrix ``G = Σ h hᵀ``
  and ``C = Σ h yᵀ`` (one-hot targets) are accumulated, so the classifier is exact, exemplar-free
  and order independent: ``W_o = (G + λI)⁻¹ C``. As in the official code, λ is chosen at the end
  of each task from 10⁻⁸ … 10⁸ by fitting on 80% of that task's samples and scoring the mean
  squared error on the remaining 20%.

After Phase 1 the first task's statistics are gathered in one pass over its training data (module
in eval mode, as the official code re-reads the task with test transforms); later tasks accumulate
batch by batch as they arrive (one pass).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from cl.config import Polymorphic, RunConfig
from cl.data.benchmark import Experience
from cl.errors import ConfigError
from cl.peft import PeftConfig, PeftMethod, backbone_family, bank, build_peft
from cl.peft.adapter import AdapterConfig
from cl.registry import PEFT, STRATEGIES
from cl.strategies.base import OptimConfig, Strategy, StrategyContext, make_optimizer


class RanPACConfig(OptimConfig):
    name: Literal["ranpac"] = "ranpac"
    projection_dim: int = Field(10000, ge=0, description="M; 0 = ridge regression on the raw features")
    ridge_grid: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [10.0**k for k in range(-8, 9)], min_length=1, description="candidate ridge strengths λ > 0 (official 1e-8 … 1e8)"
    )
    val_fraction: float = Field(0.2, gt=0, lt=1)
    first_session: Annotated[PeftConfig | None, Polymorphic(PEFT)] = Field(
        default_factory=lambda: AdapterConfig(bottleneck=64),
        description="Phase 1 module trained on the first task (default the official AdaptFormer, d=64; null = Phase 2 only, on cached features)",
    )
    # Phase 1 optimiser: the official SGD, momentum 0.9, lr 0.01, weight decay 5e-4, cosine to 0
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "constant"] = Field("cosine", description="Phase 1 learning rate over train.epochs")

    def check(self, cfg: RunConfig) -> None:
        if self.first_session is not None and self.first_session.needs_data:
            raise ValueError(f"strategy.first_session.init: '{self.first_session.init}' derives the module from a training batch, which only peft_per_task provides; use 'learned'")  # type: ignore[attr-defined]
        if self.first_session is not None and cfg.benchmark.scenario == "online":
            raise ValueError("strategy.first_session: RanPAC's Phase 1 trains for epochs on the whole first task, which an online stream does not allow; set it to null")
        if self.first_session is not None and cfg.backbone.trainable != "none":
            raise ValueError(f"backbone.trainable: ranpac's Phase 1 adapts through a PEFT module on a frozen backbone; use 'none' (got '{cfg.backbone.trainable}')")


def ridge_solve(G: Tensor, C: Tensor, lam: float) -> Tensor:
    """(G + λI)⁻¹ C in float64 via Cholesky."""
    A = G + lam * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    L = torch.linalg.cholesky(A)
    return torch.cholesky_solve(C, L)


def select_ridge(h: Tensor, y1: Tensor, grid: list[float], val_fraction: float, generator: torch.Generator) -> float:
    """λ from ``grid`` with the lowest validation MSE on a random (1 - val_fraction) / val_fraction split."""
    n = len(h)
    order = torch.randperm(n, generator=generator).to(h.device)
    n_val = max(1, int(round(n * val_fraction)))
    val, fit = order[:n_val], order[n_val:]
    # one eigendecomposition G = Q Λ Qᵀ serves every λ: (G + λI)⁻¹ C = Q diag(1 / (Λ + λ)) Qᵀ C
    evals, Q = torch.linalg.eigh(h[fit].T @ h[fit])
    QtC, hv = Q.T @ (h[fit].T @ y1[fit]), h[val] @ Q
    errors = [float(((hv @ (QtC / (evals + lam)[:, None]) - y1[val]) ** 2).mean()) for lam in grid]
    return grid[min(range(len(grid)), key=errors.__getitem__)]


class CosineHead(nn.Module):
    """σ · cos(x, w_c): the official ``CosineLinear`` (weights U(±1/√d), learnable σ from 1)."""

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, dim).uniform_(-(dim**-0.5), dim**-0.5))
        self.sigma = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.sigma * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


@STRATEGIES.register("ranpac", config=RanPACConfig, help="RanPAC: first-session PEFT, then random projection + ridge classifier")
class RanPAC(Strategy):
    domain_incremental: ClassVar[bool] = True  # keeps working when a class reappears in a new domain
    stateful = ("G", "C", "W_rand", "ridge")

    @classmethod
    def uses_cross_entropy(cls, cfg) -> bool:  # noqa: ANN001
        return cfg.first_session is not None  # Phase 1 trains a PEFT module and head; Phase 2 is ridge regression

    @classmethod
    def wants_features(cls, cfg: RanPACConfig) -> bool:  # type: ignore[override]
        return cfg.first_session is None

    def __init__(self, cfg: RanPACConfig, ctx: StrategyContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: RanPACConfig = cfg
        g = torch.Generator().manual_seed(ctx.seed)
        m = cfg.projection_dim or ctx.feature_dim
        self.W_rand = torch.randn(ctx.feature_dim, cfg.projection_dim, generator=g).to(self.device) if cfg.projection_dim else torch.empty(0)
        self.G = torch.zeros(m, m, dtype=torch.float64, device=self.device)
        self.C = torch.zeros(m, ctx.n_classes, dtype=torch.float64, device=self.device)
        self.ridge = 1.0
        self._h: list[Tensor] = []
        self._y: list[Tensor] = []
        self._Wo: Tensor | None = None
        self.module: PeftMethod | None = None
        if cfg.first_session is not None:
            family, name = backbone_family(ctx.backbone.model), cfg.first_session.name
            if family not in PEFT.get(name).backbones:
                raise ConfigError(
                    f"strategy.first_session.name: '{name}' applies to {' / '.join(PEFT.get(name).backbones)} backbones, not {family};"
                    " choose a method for this backbone, or first_session: null (Phase 2 alone, the paper's choice for ResNets)"
                )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(ctx.seed)
                self.module = build_peft(cfg.first_session, ctx.backbone.model).to(self.device)
        self.packed: dict[str, Tensor] = {}  # the Phase 1 module as stored (1-bit packed if asked)
        self.head: CosineHead | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.adapting = False
        self.max_epochs = 1  # Phase 2 reads each task once; Phase 1 takes train.epochs (before_experience)

    # ---- features ----------------------------------------------------------------------------

    def embed(self, x: Tensor) -> Tensor:
        """Features of the (adapted) backbone; the module stays attached only for this call."""
        if self.module is None:
            return self.encode(x)
        model = self.ctx.backbone.model
        self.module.attach(model)
        try:
            return model(self.ctx.backbone.transform(x, self.device))
        finally:
            self.module.detach()

    def project(self, feats: Tensor) -> Tensor:
        return torch.relu(feats @ self.W_rand).double() if self.cfg.projection_dim else feats.double()

    # ---- Phase 1 -----------------------------------------------------------------------------

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        self.adapting = self.module is not None and exp.task_id == 0
        self.max_epochs = None if self.adapting else 1  # type: ignore[assignment]
        if self.adapting:
            assert self.module is not None
            lo, hi = exp.class_range
            self.head = CosineHead(self.ctx.feature_dim, hi - lo).to(self.device)
            self.optimizer = make_optimizer(list(self.module.parameters()) + list(self.head.parameters()), self.cfg)

    def before_epoch(self, epoch: int) -> None:
        if self.adapting and self.cfg.schedule == "cosine":  # CosineAnnealingLR(T_max=epochs, eta_min=0), stepped per epoch
            assert self.optimizer is not None
            for group in self.optimizer.param_groups:
                group["lr"] = self.cfg.lr * (1 + math.cos(math.pi * epoch / self.ctx.train.epochs)) / 2

    def observe(self, x: Tensor, y: Tensor, task_id: int) -> dict[str, float]:
        if self.adapting:
            assert self.module is not None and self.head is not None and self.optimizer is not None
            self.module.train()
            self.train_mode(False)
            loss = self.classification_loss(self.head(self.embed(x)), y.to(self.device) - self.task_ranges[task_id][0])
            self.optimizer_step(loss, self.optimizer)
            return {"loss": loss.item()}
        with torch.no_grad():
            self._accumulate(x, y)
        return {}

    # ---- Phase 2 -----------------------------------------------------------------------------

    @torch.no_grad()
    def _accumulate(self, x: Tensor, y: Tensor) -> None:
        self.train_mode(False)
        if self.module is not None:
            self.module.eval()
        h = self.project(self.embed(x))
        y = y.to(self.device)
        self.G += h.T @ h
        self.C.index_add_(1, y, h.T)  # C[:, y_i] += h_i
        self._h.append(h.float())  # the current task's projections, for choosing λ at its end
        self._y.append(y)
        self._Wo = None

    @torch.no_grad()
    def after_experience(self, exp: Experience) -> None:
        if self.adapting:  # Phase 1 done: freeze and store the module, then read the first task once
            assert self.module is not None
            self.module.eval().requires_grad_(False)
            self.packed = bank.pack(self.module)
            bank.unpack(self.module, self.packed)  # go on with exactly what is stored (1-bit included)
            self.head, self.optimizer, self.adapting = None, None, False
            for xb, yb in exp.train.batches(self.ctx.train.eval_batch_size):
                self._accumulate(xb, yb)
        if self._h:
            h, y = torch.cat(self._h).double(), torch.cat(self._y)
            y1 = torch.zeros(len(y), self.ctx.n_classes, dtype=torch.float64, device=self.device)
            y1[torch.arange(len(y)), y] = 1
            self.ridge = select_ridge(h, y1[:, : self.seen_classes], self.cfg.ridge_grid, self.cfg.val_fraction, self.generator)
        self._h, self._y = [], []
        self._Wo = None

    @torch.no_grad()
    def predict(self, x: Tensor, task_id: int | None) -> Tensor:
        self.train_mode(False)
        if self.module is not None:
            self.module.eval()
        if self._Wo is None:
            self._Wo = ridge_solve(self.G, self.C, self.ridge).float()
        scores = self.project(self.embed(x)).float() @ self._Wo
        scores[:, self.seen_classes :] = float("-inf")
        return scores

    # ---- bookkeeping -------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.module.parameters()) if self.module is not None else []

    def train_mode(self, mode: bool) -> None:
        super().train_mode(False)  # the backbone stays frozen in eval mode; only the module trains

    @torch.no_grad()
    def probe(self, x: Tensor, images: Tensor, task_id: int, layers: list[int] | None = None, bn: bool = True) -> dict[str, Tensor]:
        """As the base, with the classifier's input taken from the adapted backbone (Phase 1 module attached)."""
        out = super().probe(x, images, task_id, layers, bn)
        if self.module is not None:
            self.module.eval()
            out["feat/embedding"] = self.embed(x).float()
        return out

    def storage_bytes(self) -> int:
        """The Gram matrix, C, the projection and the Phase 1 module as stored (what is kept to go on learning)."""
        module = bank.packed_nbytes(self.packed)
        return module + sum(t.numel() * t.element_size() for t in (self.G, self.C, self.W_rand))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.module is not None:
            state["module"] = self.packed
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.module is not None and state.get("module"):
            self.packed = dict(state["module"])
            bank.unpack(self.module, self.packed)
            self.module.eval().requires_grad_(False)
        self._Wo = None
