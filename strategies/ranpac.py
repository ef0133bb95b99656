"""RanPAC: random projection + class-prototype ridge regression on frozen features.

McDonnell, Gong, Parvaneh, Abbasnejad, van den Hengel. "RanPAC: Random Projections and
Pre-trained Models for Continual Learning", NeurIPS 2023 (RanPAC/RanPAC, read for the method).

Features ``f`` of the frozen backbone go through a fixed random projection and a nonlinearity,
``h = ReLU(f W)`` with ``W ~ N(0, 1)`` of size d × M. The strategy only accumulates the Gram matrix
``G = Σ h hᵀ`` and ``C = Σ h yᵀ`` (one-hot targets), so it is exact, exemplar-free and order
independent; the classifier is the ridge solution ``W_o = (G + λI)⁻¹ C``. As in the official code,
λ is chosen on each new task by fitting on 80% of its samples and scoring the mean squared error
on the remaining 20%, over a log grid. (The paper's optional first-session PETL stage is what
``peft_per_task`` with ``share: first_session`` and ``aper`` provide; this file is the classifier.)
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor

from cl.config import StrategyConfig
from cl.data.benchmark import Experience
from cl.registry import STRATEGIES
from strategies.base import Strategy, StrategyContext


class RanPACConfig(StrategyConfig):
    name: Literal["ranpac"] = "ranpac"
    projection_dim: int = Field(10000, ge=0, description="M; 0 = ridge regression on the raw features")
    ridge_grid: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [10.0**k for k in range(-8, 14)], min_length=1, description="candidate ridge strengths λ > 0"
    )
    val_fraction: float = Field(0.2, gt=0, lt=1)


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


@STRATEGIES.register("ranpac", config=RanPACConfig, help="RanPAC: random projection + ridge-regression classifier on frozen features")
class RanPAC(Strategy):
    max_epochs = 1
    stateful = ("G", "C", "W_rand", "ridge")

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

    def project(self, feats: Tensor) -> Tensor:
        return torch.relu(feats @ self.W_rand).double() if self.cfg.projection_dim else feats.double()

    @torch.no_grad()
    def observe(self, x: Tensor, y: Tensor, task_id: int) -> dict[str, float]:
        self.train_mode(False)
        h = self.project(self.encode(x))
        y = y.to(self.device)
        self.G += h.T @ h
        self.C.index_add_(1, y, h.T)  # C[:, y_i] += h_i
        self._h.append(h.float())  # the current task's projections, for choosing λ at its end
        self._y.append(y)
        self._Wo = None
        return {}

    @torch.no_grad()
    def after_experience(self, exp: Experience) -> None:
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
        if self._Wo is None:
            self._Wo = ridge_solve(self.G, self.C, self.ridge).float()
        scores = self.project(self.encode(x)).float() @ self._Wo
        scores[:, self.seen_classes :] = float("-inf")
        return scores

    def storage_bytes(self) -> int:
        """The Gram matrix, C and the projection (what has to be kept to go on learning)."""
        return sum(t.numel() * t.element_size() for t in (self.G, self.C, self.W_rand))

    def load_state_dict(self, state) -> None:  # noqa: ANN001
        super().load_state_dict(state)
        self._Wo = None
