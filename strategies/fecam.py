"""FeCAM: a Mahalanobis classifier over per-class feature covariances of a frozen backbone.

Goswami, Wang, Liu, Twardowski, van de Weijer. "FeCAM: Exploiting the Heterogeneity of Class
Distributions in Exemplar-Free Continual Learning", NeurIPS 2023. https://arxiv.org/abs/2309.14062
(official code: github.com/dipamgoswami/FeCAM, read for the method).

Nothing is trained. Each class keeps its mean and unbiased covariance of (optionally L2-normalised,
optionally Tukey-transformed) frozen features; a test feature f is scored against class c by
``-(f - μ_c)ᵀ pinv(Σ̂_c) (f - μ_c)``, where Σ̂_c is the shrunk covariance
``Σ̃ = Σ + α1·m_d·I + α2·m_o·(11ᵀ - I)`` (m_d: mean diagonal entry, m_o: mean non-zero off-diagonal
entry) normalised to a correlation matrix ``Σ̂_ij = Σ̃_ij / sqrt(Σ̃_ii Σ̃_jj)``. Prediction is the
argmax score, i.e. the nearest class in Mahalanobis distance.

Statistics are float64 counts, means and scatter matrices (upper triangles) merged batch by batch
(Chan et al.'s pairwise update), so one pass suffices and the online scenario runs unchanged; a
class that reappears (domain-incremental) keeps accumulating.

Our reconstruction, and where it departs from the official code:

* Defaults follow the official ViT script (CIFAR-100): L2-normalised features, α1 = 1, α2 = 0, one
  shrinkage, correlation normalisation, no Tukey transform. ``shrink_repeats: 2`` with α1 = α2 = 1,
  ``tukey_beta: 0.5`` and ``renormalize: true`` give the official ResNet path (whose covariance is
  taken on raw Tukey-transformed features while the test features are normalised first; we use one
  transform for both, so statistics and queries live in the same space).
* The Tukey transform x^β (log x for β = 0) is undefined for negative features (ViTs; NaN in the
  official code and in Avalanche's port, which has it on by default): refused for ViT backbones at
  construction, and for any batch with a negative (β > 0) or non-positive (β = 0) feature.
* A class seen fewer than twice has no unbiased covariance: it is scored with the identity
  (squared Euclidean distance to its mean), the correlation matrix of uncorrelated features.
* A feature with zero variance in a class after shrinkage (only possible with α1 = 0) gets unit
  variance and no correlation in Σ̂, where the official code divides by zero.
* Inverses are computed in float64 (``pinv``, as the official code) once per class and cached until
  the class's statistics change; the official code recomputes them at every evaluation.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from cl.config import RunConfig, StrategyConfig
from cl.errors import ConfigError
from cl.registry import STRATEGIES
from cl.strategies.base import Strategy, StrategyContext


class FeCAMConfig(StrategyConfig):
    name: Literal["fecam"] = "fecam"
    alpha1: float = Field(1.0, ge=0, description="shrinkage towards the mean variance, α1·m_d·I (official ViT scripts: 1 on CIFAR, 10 on ImageNet-R)")
    alpha2: float = Field(0.0, ge=0, description="shrinkage towards the mean covariance, α2·m_o·(11ᵀ - I) (official ViT scripts: 0 on CIFAR, 10 on ImageNet-R)")
    shrink_repeats: int = Field(1, ge=0, le=4, description="times the shrinkage is applied (official ResNet path: 2; 0 = none)")
    normalize_cov: bool = Field(True, description="turn the shrunk covariance into a correlation matrix before inverting it")
    normalize: bool = Field(True, description="L2-normalise features before everything else (official ViT path)")
    tukey_beta: float | None = Field(
        None, ge=0, description="Tukey power transform x^β of the (normalised) features, log x for 0; null = off. Non-negative features only (not ViTs)")
    renormalize: bool = Field(False, description="L2-normalise the transformed feature and the class mean before their difference (official ResNet path)")

    def check(self, cfg: RunConfig) -> None:
        if cfg.backbone.trainable != "none":
            raise ValueError(f"backbone.trainable: fecam trains nothing, so a trainable backbone would stay as initialised; use 'none' (got '{cfg.backbone.trainable}')")


# ---- pure maths --------------------------------------------------------------------------------


def pack_upper(mat: Tensor) -> Tensor:
    """Upper triangle (diagonal included) of ``[..., d, d]`` as ``[..., d(d+1)/2]``."""
    d = mat.shape[-1]
    i, j = torch.triu_indices(d, d, device=mat.device)
    return mat[..., i, j]


def unpack_upper(packed: Tensor, d: int) -> Tensor:
    """The symmetric ``[..., d, d]`` matrix whose upper triangle is ``packed``."""
    i, j = torch.triu_indices(d, d, device=packed.device)
    out = packed.new_zeros(*packed.shape[:-1], d, d)
    out[..., i, j] = packed
    out[..., j, i] = packed
    return out


def merge_moments(n: Tensor, mean: Tensor, scatter: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Count, mean and scatter ``Σ (x - mean)(x - mean)ᵀ`` of a set extended by the rows of ``x``.

    Chan, Golub, LeVeque's pairwise update: with the batch's own moments (n_b, m_b, S_b),
    ``S = S_a + S_b + δδᵀ n_a n_b / (n_a + n_b)``, ``δ = m_b - m_a``. Exact in float64 whatever the
    batching, and free of the cancellation of Σxxᵀ - n·mmᵀ.
    """
    x = x.to(mean.dtype)
    nb = float(len(x))
    mb = x.mean(dim=0)
    centred = x - mb
    sb = centred.T @ centred
    total = n + nb
    delta = mb - mean
    new_mean = mean + delta * (nb / total)
    new_scatter = scatter + sb + torch.outer(delta, delta) * (n * nb / total)
    return total, new_mean, new_scatter


def tukey(x: Tensor, beta: float) -> Tensor:
    """x^β, or log x for β = 0 (Tukey's ladder of powers)."""
    return torch.log(x) if beta == 0 else torch.pow(x, beta)


def shrink(cov: Tensor, alpha1: float, alpha2: float) -> Tensor:
    """Σ + α1·m_d·I + α2·m_o·(11ᵀ - I); m_d = mean diagonal, m_o = mean of the non-zero off-diagonal
    entries (0 if there are none)."""
    d = cov.shape[-1]
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    off = cov * (1 - eye)
    nonzero = (off != 0).sum()
    m_o = off.sum() / nonzero if nonzero > 0 else cov.new_zeros(())
    m_d = torch.diagonal(cov).mean()
    return cov + alpha1 * m_d * eye + alpha2 * m_o * (1 - eye)


def correlation(cov: Tensor) -> Tensor:
    """Σ_ij / sqrt(Σ_ii Σ_jj); a zero-variance feature gets unit variance and no correlation."""
    var = torch.diagonal(cov)
    alive = var > 0
    sd = torch.where(alive, var, torch.ones_like(var)).sqrt()
    out = cov / (sd[:, None] * sd[None, :])
    out = out * (alive[:, None] & alive[None, :])
    return out + torch.diag((~alive).to(cov.dtype))


def mahalanobis(x: Tensor, means: Tensor, precisions: Tensor) -> Tensor:
    """Squared Mahalanobis distances ``[B, K]`` of ``x [B, d]`` to ``means [K, d]`` under
    ``precisions [K, d, d]``."""
    diff = x[None, :, :] - means[:, None, :]  # [K, B, d]
    return ((diff @ precisions) * diff).sum(-1).T


# ---- strategy ----------------------------------------------------------------------------------


@STRATEGIES.register("fecam", config=FeCAMConfig, help="FeCAM: Mahalanobis distance to per-class shrunk covariances of frozen features")
class FeCAM(Strategy):
    domain_incremental: ClassVar[bool] = True  # a reappearing class keeps accumulating its moments
    max_epochs = 1
    stateful = ("counts", "means", "scatter")

    def __init__(self, cfg: FeCAMConfig, ctx: StrategyContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: FeCAMConfig = cfg
        if cfg.tukey_beta is not None:
            from cl.peft import backbone_family

            if backbone_family(ctx.backbone.model) == "vit":
                raise ConfigError("strategy.tukey_beta: ViT features can be negative, where the Tukey transform is undefined; set tukey_beta: null")
        d, c = ctx.feature_dim, ctx.n_classes
        self.counts = torch.zeros(c, dtype=torch.float64, device=self.device)
        self.means = torch.zeros(c, d, dtype=torch.float64, device=self.device)
        self.scatter = torch.zeros(c, d * (d + 1) // 2, dtype=torch.float64, device=self.device)  # upper triangles
        self._precisions: dict[int, Tensor] = {}  # class -> pinv(Σ̂_c), float32; dropped when c's moments change

    def transform(self, feats: Tensor) -> Tensor:
        """The space statistics and queries live in: L2 normalisation, then Tukey's power."""
        if self.cfg.normalize:
            feats = F.normalize(feats, dim=1)
        beta = self.cfg.tukey_beta
        if beta is not None:
            bad = (feats <= 0) if beta == 0 else (feats < 0)
            if bad.any():
                need = "positive" if beta == 0 else "non-negative"
                raise ConfigError(f"strategy.tukey_beta: {beta} needs {need} features, and this backbone produced {int(bad.sum())} values that are not; set tukey_beta: null")
            feats = tukey(feats, beta)
        return feats

    @torch.no_grad()
    def observe(self, x: Tensor, y: Tensor, task_id: int) -> dict[str, float]:
        self.train_mode(False)
        feats = self.transform(self.encode(x).double())
        y = y.to(self.device)
        d = self.ctx.feature_dim
        for c in y.unique().tolist():
            n, mean, scatter = merge_moments(self.counts[c], self.means[c], unpack_upper(self.scatter[c], d), feats[y == c])
            self.counts[c], self.means[c], self.scatter[c] = n, mean, pack_upper(scatter)
            self._precisions.pop(c, None)
        return {}

    def covariance(self, c: int) -> Tensor:
        """Unbiased covariance of class ``c`` (float64; needs two samples)."""
        return unpack_upper(self.scatter[c], self.ctx.feature_dim) / (self.counts[c] - 1)

    def precision(self, c: int) -> Tensor:
        """pinv(Σ̂_c), cached; the identity for a class seen fewer than twice."""
        p = self._precisions.get(c)
        if p is None:
            d = self.ctx.feature_dim
            if self.counts[c] < 2:
                p = torch.eye(d, device=self.device)
            else:
                cov = self.covariance(c)
                for _ in range(self.cfg.shrink_repeats):
                    cov = shrink(cov, self.cfg.alpha1, self.cfg.alpha2)
                if self.cfg.normalize_cov:
                    cov = correlation(cov)
                p = torch.linalg.pinv(cov, hermitian=True).float()
            self._precisions[c] = p
        return p

    @torch.no_grad()
    def predict(self, x: Tensor, task_id: int | None) -> Tensor:
        self.train_mode(False)
        known = (self.counts > 0).nonzero().flatten().tolist()
        scores = torch.full((len(x), self.ctx.n_classes), float("-inf"), device=self.device)
        if not known:
            return scores
        feats = self.transform(self.encode(x).double()).float()
        means = self.means[known].float()
        if self.cfg.renormalize:
            feats, means = F.normalize(feats, dim=1), F.normalize(means, dim=1)
        precisions = torch.stack([self.precision(c) for c in known])
        scores[:, known] = -mahalanobis(feats, means, precisions)
        return scores

    def storage_bytes(self) -> int:
        """Per class seen: the mean and the covariance's upper triangle, in float32."""
        d = self.ctx.feature_dim
        return int((self.counts > 0).sum()) * (d + d * (d + 1) // 2) * 4

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._precisions = {}
