"""CODA-Prompt: COntinual Decomposed Attention-based Prompting for Rehearsal-Free Continual Learning.

Smith, Karlinsky, Gutta, Cascante-Bonilla, Kim, Arbelle, Panda, Feris, Kira. CVPR 2023.
arXiv: https://arxiv.org/abs/2211.13218 (official code: GT-RIPL/CODA-Prompt).

Each prompted block of a frozen ViT holds ``components`` prompt components P_m ∈ R^{L×d}, each
with a key K_m and an attention vector A_m. For the frozen model's pre-logits feature q (the
query, from a pass without prompts) the block's prompt is a weighted sum

    α_m = cos(q ⊙ A_m, K_m),    P(x) = Σ_m α_m P_m,

whose first L/2 rows are the key prefix and last L/2 rows the value prefix of the block's
self-attention (:mod:`cl.models.prefix`). The components are split evenly over the tasks: task t
trains its own slice; earlier slices are used but detached, later ones are left out; at test time
every trained slice is used. The loss is the cross-entropy over the current task's classes
(earlier classes' logits at −∞, later classes dropped) plus μ × Σ_{M∈{K,A,P}} mean((MMᵀ − I)²)
over the active components, summed over blocks (mean over matrix entries, as the official code).

Initialisation (``init``):

* ``gram_schmidt`` (the official code since its post-publication change; μ defaults to 0): before
  task t, its slice is drawn at random and orthonormalised against every earlier component.
* ``orthogonal`` (the paper / release 22948d2; μ defaults to the paper's 0.1): the whole pool is
  ``orthogonal_``-initialised up front. The penalty function of that release carries a further
  factor 1e-6, so its effective weight is μ·1e-6 (``mu: 1e-7`` reproduces it).

Where we differ from the official code: our Gram–Schmidt projects the new slice out of the *span*
of the earlier components (through an orthonormal basis of them). The official code subtracts the
projection onto each earlier component separately, which is exact only while those stay mutually
orthogonal; after training (μ = 0) they are not, so its new slice is only roughly orthogonal to
them. A pool larger than the space (components > d) cannot be orthonormal: a one-line error,
where the official code would loop. Each task's slice is its own parameter, so the optimiser
(fresh per task) only holds the current slice and earlier ones stay bit-identical whatever the
optimiser. The classifier is one linear head on the prompted model's pre-logits, as the official.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PrivateAttr
from torch import Tensor, nn

from cl.config import RunConfig
from cl.data.benchmark import Experience
from cl.errors import ConfigError
from cl.models.prefix import Prefix, prefixed
from cl.peft.base import backbone_family, vit_dim
from cl.registry import STRATEGIES
from cl.strategies.base import OptimConfig, Strategy, StrategyContext, make_optimizer

MATRICES = ("p", "k", "a")  # prompt components, keys, attention vectors


class CodaPromptConfig(OptimConfig):
    name: Literal["coda_prompt"] = "coda_prompt"
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0)
    components: int = Field(100, ge=1, description="prompt components per block, split evenly over the tasks")
    length: int = Field(8, ge=2, description="rows per component: first half key prefix, second half value prefix")
    layers: list[int] = Field([0, 1, 2, 3, 4], description="prompted blocks; blocks past the model's depth are dropped")
    init: Literal["gram_schmidt", "orthogonal"] = Field(
        "gram_schmidt", description="gram_schmidt: each task's slice orthonormalised against earlier ones (official code); orthogonal: whole pool up front (paper)")
    mu: float | None = Field(None, ge=0, description="orthogonality-loss weight; default 0 with gram_schmidt, 0.1 with orthogonal")
    _n_tasks: int | None = PrivateAttr(None)

    def check(self, cfg: RunConfig) -> None:
        if cfg.backbone.trainable != "none":
            raise ValueError(f"backbone.trainable: coda_prompt prompts a frozen backbone; use 'none' (got '{cfg.backbone.trainable}')")
        n_tasks = cfg.benchmark.n_experiences
        if self.components % n_tasks:
            raise ValueError(f"strategy.components: {self.components} do not split evenly over {n_tasks} tasks")
        if self.length % 2:
            raise ValueError(f"strategy.length: {self.length} rows cannot be halved into key and value prefixes")
        if not self.layers or any(i < 0 for i in self.layers) or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"strategy.layers: block indices must be distinct, non-negative and at least one (got {self.layers})")
        self._n_tasks = n_tasks

    @property
    def ortho_weight(self) -> float:
        if self.mu is not None:
            return self.mu
        return 0.0 if self.init == "gram_schmidt" else 0.1


# ---- the maths ------------------------------------------------------------------------------


def component_weights(query: Tensor, keys: Tensor, attention: Tensor) -> Tensor:
    """α_{bm} = cos(q_b ⊙ A_m, K_m): (B, d), (M, d), (M, d) -> (B, M)."""
    attended = query[:, None, :] * attention[None]
    return torch.einsum("bmd,md->bm", F.normalize(attended, dim=2), F.normalize(keys, dim=1))


def compose(alpha: Tensor, components: Tensor) -> tuple[Tensor, Tensor]:
    """Σ_m α_m P_m split into (key prefix, value prefix): (B, M), (M, L, d) -> 2 × (B, L/2, d)."""
    prompt = torch.einsum("bm,mld->bld", alpha, components)
    half = prompt.shape[1] // 2
    return prompt[:, :half], prompt[:, half:]


def ortho_penalty(m: Tensor) -> Tensor:
    """mean((M Mᵀ − I)²) over the rows of ``m`` flattened to vectors."""
    m = m.flatten(1)
    return ((m @ m.T - torch.eye(len(m), device=m.device, dtype=m.dtype)) ** 2).mean()


def gram_schmidt(old: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``n`` random unit vectors orthogonal to each other and to the span of ``old`` (s, D) rows."""
    dim = old.shape[1]
    if len(old) + n > dim:
        raise ValueError(f"{len(old) + n} components cannot be orthogonal in {dim} dimensions")
    basis = torch.linalg.qr(old.double().T).Q.T if len(old) else old.new_zeros(0, dim, dtype=torch.float64)
    new = []
    for v in torch.randn(n, dim, generator=generator, dtype=torch.float64):
        for _ in range(2):  # twice is enough for float64 (Kahan/Parlett)
            v = v - basis.T @ (basis @ v)
            for u in new:
                v = v - (u @ v) * u
        new.append(v / v.norm())
    return torch.stack(new).to(old.dtype)


@STRATEGIES.register("coda_prompt", config=CodaPromptConfig, help="CODA-Prompt: attention-weighted prompt components (prefix-tuning) on a frozen ViT")
class CodaPrompt(Strategy):
    input_kind = "images"
    stateful = ("pool",)

    @classmethod
    def uses_cross_entropy(cls, cfg) -> bool:  # noqa: ANN001
        return True

    def __init__(self, cfg: CodaPromptConfig, ctx: StrategyContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: CodaPromptConfig = cfg
        self.model = ctx.backbone.model
        if backbone_family(self.model) != "vit":
            raise ConfigError(f"strategy.name: 'coda_prompt' needs a timm ViT, not {type(self.model).__name__}")
        if cfg._n_tasks is None:
            raise ConfigError("strategy.components: unknown number of tasks (validate the run config first)")
        self.n_tasks = cfg._n_tasks
        self.per_task = cfg.components // self.n_tasks
        depth = len(self.model.blocks)
        self.layers = [i for i in cfg.layers if i < depth]
        if not self.layers:
            raise ConfigError(f"strategy.layers: {cfg.layers} has no block below the model's depth {depth}")
        d = self.d = vit_dim(self.model)
        if cfg.init == "gram_schmidt" and cfg.components > d:
            raise ConfigError(f"strategy.components: {cfg.components} keys cannot be orthonormal in d={d} (init gram_schmidt); use at most {d}")
        shapes = {"p": (cfg.length, d), "k": (d,), "a": (d,)}
        g = torch.Generator().manual_seed(ctx.seed)
        params: dict[str, nn.Parameter] = {}
        for layer in self.layers:
            for m in MATRICES:
                pool = torch.zeros(cfg.components, *shapes[m])
                if cfg.init == "orthogonal":
                    nn.init.orthogonal_(pool.view(cfg.components, -1), generator=g)
                for t, chunk in enumerate(pool.split(self.per_task)):
                    params[f"{m}{layer}_t{t}"] = nn.Parameter(chunk.clone())
        head = nn.Linear(d, ctx.n_classes)
        params["head_weight"], params["head_bias"] = head.weight, head.bias
        self.pool = nn.ParameterDict(params).to(self.device)
        self.optimizer: torch.optim.Optimizer | None = None

    # ---- forward -----------------------------------------------------------------------------

    def query(self, inputs: Tensor) -> Tensor:
        """The frozen model's pre-logits feature, from a pass without prompts."""
        with torch.no_grad():
            return self.model(inputs)

    def active(self, m: str, layer: int, upto: int, train_task: int | None = None) -> Tensor:
        """Components of tasks 0..``upto`` stacked; with ``train_task``, earlier tasks' detached."""
        parts = [self.pool[f"{m}{layer}_t{t}"] for t in range(upto + 1)]
        if train_task is not None:
            parts = [p.detach() if t < train_task else p for t, p in enumerate(parts)]
        return torch.cat(parts)

    def forward(self, inputs: Tensor, upto: int, train_task: int | None = None) -> tuple[Tensor, Tensor]:
        """(logits, orthogonality loss) with the components of tasks 0..``upto``."""
        query = self.query(inputs)
        prefixes: dict[int, Prefix] = {}
        ortho = query.new_zeros(())
        for layer in self.layers:
            p, k, a = (self.active(m, layer, upto, train_task) for m in MATRICES)
            prefixes[layer] = compose(component_weights(query, k, a), p)
            if train_task is not None and self.cfg.ortho_weight > 0:
                ortho = ortho + ortho_penalty(k) + ortho_penalty(a) + ortho_penalty(p)
        with prefixed(self.model, prefixes):
            feats = self.model(inputs)
        return F.linear(feats, self.pool["head_weight"], self.pool["head_bias"]), ortho

    # ---- training ----------------------------------------------------------------------------

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        t = exp.task_id
        if t >= self.n_tasks:
            raise ConfigError(f"strategy.components: split over {self.n_tasks} tasks, but task {t} arrived")
        if self.cfg.init == "gram_schmidt":
            g = torch.Generator().manual_seed(self.ctx.seed * 1000 + t)  # reproducible on resume
            with torch.no_grad():
                for layer in self.layers:
                    for m in MATRICES:
                        new = self.pool[f"{m}{layer}_t{t}"]
                        old = self.active(m, layer, t - 1).flatten(1) if t else new.new_zeros(0, new[0].numel())
                        new.copy_(gram_schmidt(old, len(new), g).view_as(new))
        params = [self.pool[f"{m}{layer}_t{t}"] for layer in self.layers for m in MATRICES]
        self.optimizer = make_optimizer(params + [self.pool["head_weight"], self.pool["head_bias"]], self.cfg)

    def loss(self, x: Tensor, y: Tensor, task_id: int) -> tuple[Tensor, Tensor, Tensor]:
        """(total, cross-entropy over task ``task_id``'s classes, orthogonality penalty)."""
        logits, ortho = self.forward(self.ctx.backbone.transform(x, self.device), task_id, train_task=task_id)
        lo, hi = self.task_ranges[task_id]
        n = len(y)
        ce = self.classification_loss(logits, y.to(self.device), torch.full((n,), lo, device=self.device), torch.full((n,), hi, device=self.device))
        return ce + self.cfg.ortho_weight * ortho, ce, ortho

    def observe(self, x: Tensor, y: Tensor, task_id: int) -> dict[str, float]:
        assert self.optimizer is not None
        self.model.eval()
        loss, ce, ortho = self.loss(x, y, task_id)
        self.optimizer_step(loss, self.optimizer)
        return {"loss": loss.item(), "loss_ce": ce.item(), "loss_ortho": ortho.item()}

    def after_experience(self, exp: Experience) -> None:
        self.optimizer = None

    # ---- inference ---------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, x: Tensor, task_id: int | None) -> Tensor:
        if not self.task_ranges:
            return torch.full((len(x), self.ctx.n_classes), float("-inf"), device=self.device)
        self.model.eval()
        scores = self.forward(self.ctx.backbone.transform(x, self.device), max(self.task_ranges))[0]
        scores[:, self.seen_classes :] = float("-inf")
        return scores

    # ---- bookkeeping -------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.pool.values())

    def train_mode(self, mode: bool) -> None:
        self.model.eval()

    def storage_bytes(self) -> int:
        """The trained tasks' components, keys and attention vectors, and the head (float32)."""
        trained = set(self.task_ranges)
        kept = [p for name, p in self.pool.items() if name.startswith("head") or int(name.rsplit("_t", 1)[1]) in trained]
        return sum(p.numel() * 4 for p in kept)
