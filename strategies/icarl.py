"""iCaRL: herding exemplars, distillation from the previous model, nearest-mean-of-exemplars classifier.

Rebuffi, Kolesnikov, Sperl, Lampert. "iCaRL: Incremental Classifier and Representation Learning",
CVPR 2017. https://arxiv.org/abs/1611.07725

After each experience the strategy keeps at most K exemplars in total, ⌊K / #classes seen⌋ per class:
the sets of old classes are cut to their first m (they are stored in herding order, so the cut keeps
the best approximations of the class mean), and each new class gets m exemplars chosen by herding
on L2-normalised features, without replacement,

    p_k = argmin_x ‖μ − (Σ_{j<k} f(p_j) + f(x)) / k‖,   μ = mean of the class's normalised features.

While learning an experience the model trains on its data together with the exemplars, with

* ``loss: bce`` (the paper, mammoth): sigmoid binary cross-entropy over the classes seen so far;
  targets are the previous model's sigmoids for the classes it knew and one-hot for the new ones;
* ``loss: ce_kd`` (PyCIL): cross-entropy over the classes seen so far plus the KD term
  −Σ softmax(z_old/T) · log_softmax(z/T) over the old classes (T = 2, no T² factor, as PyCIL).

The previous model is a frozen copy of the head, and of the backbone when it trains, taken at the end
of each experience. ``classifier: nme`` scores a sample by its (negative squared) distance between its
normalised feature and each class's normalised mean of normalised exemplar features; ``cnn`` uses the
head. Means come from the exemplars only (mammoth's ``compute_theoretical_best`` oracle, means over
all training data, is not offered).

Our reconstruction (mammoth ``models/icarl.py`` + ``utils/buffer.py``; PyCIL ``models/icarl.py`` +
``models/base.py``) and where it deviates:

* "Current task ∪ exemplars": the loop, not the strategy, owns the data loader, so the exemplars
  are mixed in proportionally instead of being appended to the dataset: every epoch the exemplars
  are shuffled and each step appends the next ⌊(s + b)·M/N⌋ − ⌊s·M/N⌋ of them (s stream samples seen
  so far in the epoch, b the batch, M exemplars, N samples of the experience), so each exemplar is
  used exactly once per epoch, the expected batch composition of the merged dataset. A step's batch
  is b(1 + M/N) on average rather than b.
* The previous model's outputs are computed on the same (possibly augmented) view as the current
  model's: the batch is transformed once and fed to both.
* Mammoth's NME means also average the horizontally flipped view; here a mean is over the stored
  view only (cached features have no flipped view). The herding in the mammoth version at hand
  does not normalise features; the paper and PyCIL do, and so do we.
* mammoth's explicit L2 penalty λ‖θ‖² (λ = 1e-5) is the optimiser's ``weight_decay`` = 2λ here.
* The BCE is a mean over samples × classes (PyTorch's default, as mammoth); the paper sums.
* Only the ``classifier`` chosen for the run is recorded by the loop (one class-incremental
  accuracy per run); run ``nme`` and ``cnn`` as two suite rows to report both.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from cl.config import RunConfig
from cl.data.benchmark import Experience, Split
from cl.data.disk import DiskImages, as_tensor
from cl.memory import ReplayMemory
from cl.registry import STRATEGIES
from cl.strategies.base import OptimConfig, Strategy, StrategyContext, make_optimizer


class ICaRLConfig(OptimConfig):
    name: Literal["icarl"] = "icarl"
    memory_size: int = Field(2000, ge=1, description="K: exemplars in total, ⌊K / classes seen⌋ per class")
    loss: Literal["bce", "ce_kd"] = Field("bce", description="bce: the paper's sigmoid BCE with old-model targets; ce_kd: PyCIL's CE + KD")
    temperature: float = Field(2.0, gt=0, description="KD temperature (loss: ce_kd)")
    classifier: Literal["nme", "cnn"] = Field("nme", description="nme: nearest mean of exemplars; cnn: the trained head")

    def check(self, cfg: RunConfig) -> None:
        n = cfg.benchmark.dataset.num_classes()
        if self.memory_size < n:
            raise ValueError(f"strategy.memory_size: {self.memory_size} exemplars cannot hold one per class for the {n} classes")
        if cfg.benchmark.scenario == "online":
            raise ValueError("strategy.name: icarl re-reads each task's training data to herd its exemplars, which an online stream does not allow")


# ---- maths ------------------------------------------------------------------------------------


def herding(features: Tensor, m: int) -> Tensor:
    """Indices of ``min(m, n)`` exemplars chosen by herding, in selection order.

    Args:
        features: [n, d] features of one class; normalised here (rows of zeros stay zero).

    Returns:
        [min(m, n)] distinct row indices; the k-th minimises ‖μ − (Σ_{j<k} f(p_j) + f(x)) / k‖.
    """
    f = F.normalize(features.double(), dim=1)
    mu = f.mean(dim=0)
    running = torch.zeros_like(mu)
    taken = torch.zeros(len(f), dtype=torch.bool)
    order: list[int] = []
    for k in range(1, min(m, len(f)) + 1):
        cost = (mu[None, :] - (running[None, :] + f) / k).norm(dim=1)
        cost[taken] = float("inf")
        i = int(cost.argmin())
        order.append(i)
        taken[i] = True
        running += f[i]
    return torch.tensor(order, dtype=torch.long)


def class_means(features: Tensor, labels: Tensor, n_classes: int) -> tuple[Tensor, Tensor]:
    """Normalised means of normalised features per class: ([n_classes, d] means, [n_classes] present)."""
    f = F.normalize(features.float(), dim=1)
    sums = torch.zeros(n_classes, f.shape[1], device=f.device).index_add_(0, labels.to(f.device), f)
    counts = torch.bincount(labels.to(f.device), minlength=n_classes)
    present = counts > 0
    means = F.normalize(sums / counts.clamp(min=1)[:, None], dim=1)
    return means, present


def nme_scores(features: Tensor, means: Tensor, present: Tensor) -> Tensor:
    """−‖normalise(f) − μ_c‖² for every class; −inf for classes without a mean."""
    f = F.normalize(features.float(), dim=1)
    d2 = (f[:, None, :] - means[None, :, :]).pow(2).sum(dim=2)
    return (-d2).masked_fill(~present[None, :].to(d2.device), float("-inf"))


def icarl_bce(logits: Tensor, y: Tensor, old_probs: Tensor | None) -> Tensor:
    """The paper's loss on logits over the classes seen so far: BCE-with-logits against one-hot
    targets whose first ``old_probs.shape[1]`` columns are replaced by the old model's sigmoids."""
    targets = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    if old_probs is not None and old_probs.shape[1]:
        targets = torch.cat([old_probs.to(logits.dtype), targets[:, old_probs.shape[1]:]], dim=1)
    return F.binary_cross_entropy_with_logits(logits, targets)


def kd_loss(logits: Tensor, old_logits: Tensor, temperature: float) -> Tensor:
    """−(1/B) Σ softmax(z_old/T) · log_softmax(z/T), over the old model's classes (PyCIL: no T²)."""
    target = F.softmax(old_logits / temperature, dim=1)
    return -(target * F.log_softmax(logits / temperature, dim=1)).sum(dim=1).mean()


# ---- the strategy -----------------------------------------------------------------------------


class ExemplarMemory(ReplayMemory):
    """Exemplars stored class by class, each class in herding order (so truncation keeps a prefix)."""

    def reduce(self, per_class: int) -> None:
        """Keep the first ``per_class`` exemplars of every stored class."""
        if self.x is None:
            return
        keep = torch.cat([torch.nonzero(self.y == c).flatten()[:per_class] for c in torch.unique(self.y)])
        self._set(self.x[keep].clone(), self.y[keep].clone(), self.t[keep].clone())

    def extend(self, x: Tensor, y: Tensor, t: Tensor) -> None:
        """Append exemplars (the caller keeps the total within capacity)."""
        if self.x is None:
            self._set(x, y, t)
        else:
            self._set(torch.cat([self.x, x.to(self.x.dtype)]), torch.cat([self.y, y]), torch.cat([self.t, t]))


@STRATEGIES.register("icarl", config=ICaRLConfig, help="iCaRL: herding exemplars, old-model distillation, NME classifier")
class ICaRL(Strategy):
    stateful = ("head", "old_head", "_memory", "means", "has_mean", "known")

    @classmethod
    def uses_cross_entropy(cls, cfg: ICaRLConfig) -> bool:  # type: ignore[override]
        return cfg.loss == "ce_kd"

    def __init__(self, cfg: ICaRLConfig, ctx: StrategyContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: ICaRLConfig = cfg
        self.head = nn.Linear(ctx.feature_dim, ctx.n_classes).to(self.device)
        self.old_head = copy.deepcopy(self.head).requires_grad_(False)
        # the previous backbone is needed only when the backbone changes during training
        self.old_backbone = copy.deepcopy(ctx.backbone.model).eval().requires_grad_(False) if self.backbone_parameters() else None
        self.known = 0  # classes the previous model knows (distillation targets)
        self.means = torch.zeros(ctx.n_classes, ctx.feature_dim, device=self.device)
        self.has_mean = torch.zeros(ctx.n_classes, dtype=torch.bool, device=self.device)
        self._memory = ExemplarMemory(cfg.memory_size, self.generator)
        self.optimizer: torch.optim.Optimizer | None = None
        self._n_train = 0
        self._order: Tensor | None = None  # exemplars' order for the current epoch
        self._served = 0  # stream samples seen in the current epoch

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters()) + self.backbone_parameters()

    # ---- training -----------------------------------------------------------------------------

    def before_experience(self, exp: Experience) -> None:
        self.known = self.seen_classes  # the previous model was copied when they were last trained
        super().before_experience(exp)
        self._n_train = len(exp.train)
        self._order = None
        self.optimizer = make_optimizer(self.trainable_parameters(), self.cfg)

    def before_epoch(self, epoch: int) -> None:
        self._order = None

    def _exemplar_batch(self, b: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """The next slice of this epoch's shuffled exemplars for a stream batch of ``b`` samples."""
        n_mem = len(self._memory)
        if n_mem == 0 or self._n_train == 0:
            return None
        if self._order is None or self._served >= self._n_train:  # a new epoch (also without before_epoch)
            self._order = torch.randperm(n_mem, generator=self.generator)
            self._served = 0
        end_seen = min(self._served + b, self._n_train)
        lo, hi = self._served * n_mem // self._n_train, end_seen * n_mem // self._n_train
        self._served += b
        if hi <= lo:
            return None
        idx = self._order[lo:hi]
        assert self._memory.x is not None
        return self._memory.x[idx], self._memory.y[idx], self._memory.t[idx]

    def _features_and_old_logits(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Current features and the previous model's logits on the same view of ``x``."""
        if self.ctx.cached_features:
            f = x.to(self.device, non_blocking=True).float()
            old_f = f
        else:
            backbone = self.ctx.backbone
            view = backbone.transform(x, self.device)  # transformed once: one augmentation for both models
            f = backbone.forward(view)
            old_f = f
            if self.old_backbone is not None and self.known:
                with torch.no_grad():
                    old_f = self.old_backbone(view)
        if not self.known:
            return f, None
        with torch.no_grad():
            old_logits = self.old_head(old_f.detach())[:, : self.known]
        return f, old_logits

    def loss(self, logits: Tensor, y: Tensor, old_logits: Tensor | None, task_ids: Tensor) -> Tensor:
        """The configured iCaRL loss of a training batch (logits over all ``n_classes``)."""
        if self.cfg.loss == "bce":
            old_probs = None if old_logits is None else torch.sigmoid(old_logits)
            return icarl_bce(logits[:, : self.seen_classes], y, old_probs)
        ce = self.classification_loss(logits, y, *self.label_ranges(task_ids))
        if old_logits is None:
            return ce
        return ce + kd_loss(logits[:, : self.known], old_logits, self.cfg.temperature)

    def observe(self, x: Tensor, y: Tensor, task_id: int) -> dict[str, float]:
        assert self.optimizer is not None, "before_experience must run first"
        self.train_mode(True)
        t = torch.full((len(y),), task_id)
        extra = self._exemplar_batch(len(y))
        if extra is not None:
            ex, ey, et = extra
            x, y, t = torch.cat([x, ex.to(x.dtype)]), torch.cat([y, ey]), torch.cat([t, et])
        f, old_logits = self._features_and_old_logits(x)
        logits = self.head(f)
        loss = self.loss(logits, y.to(self.device), old_logits, t)
        self.optimizer_step(loss, self.optimizer)
        return {"loss": float(loss.detach())}

    # ---- exemplars ----------------------------------------------------------------------------

    @torch.no_grad()
    def _encode_all(self, x: Tensor | DiskImages) -> Tensor:
        """Features of every row of ``x`` (stored form), in order, in evaluation mode."""
        self.train_mode(False)
        split = Split(x, torch.zeros(len(x), dtype=torch.long))
        parts = [self.encode(xb).float() for xb, _ in split.batches(self.ctx.train.eval_batch_size)]
        return torch.cat(parts) if parts else torch.empty(0, self.ctx.feature_dim, device=self.device)

    @torch.no_grad()
    def after_experience(self, exp: Experience) -> None:
        self.old_head.load_state_dict(self.head.state_dict())
        if self.old_backbone is not None:
            self.old_backbone.load_state_dict(self.ctx.backbone.model.state_dict())
        per_class = self.cfg.memory_size // max(self.seen_classes, 1)
        self._memory.reduce(per_class)
        stored = set(self._memory.y.tolist())
        new = [c for c in torch.unique(exp.train.y).tolist() if c not in stored]
        if new:
            feats = self._encode_all(exp.train.x).cpu()
            for c in new:
                rows = torch.nonzero(exp.train.y == c).flatten()
                chosen = rows[herding(feats[rows], per_class)]
                x = as_tensor(exp.train.x[chosen]).detach().cpu()
                self._memory.extend(x, exp.train.y[chosen].to(torch.int64), torch.full((len(chosen),), exp.task_id, dtype=torch.int64))
        self._update_means()

    def _update_means(self) -> None:
        """NME means from the exemplars, with the current network."""
        if self._memory.x is None:
            return
        feats = self._encode_all(self._memory.x)
        means, present = class_means(feats, self._memory.y, self.ctx.n_classes)
        self.means.copy_(means.to(self.device))
        self.has_mean.copy_(present.to(self.device))

    # ---- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, x: Tensor, task_id: int | None) -> Tensor:
        self.train_mode(False)
        f = self.encode(x)
        if self.cfg.classifier == "nme":
            return nme_scores(f, self.means, self.has_mean)
        logits = self.head(f)
        seen = torch.arange(self.ctx.n_classes, device=logits.device) < self.seen_classes
        return logits.masked_fill(~seen[None, :], float("-inf"))

    def storage_bytes(self) -> int:
        head = self.seen_classes * (self.ctx.feature_dim + 1) * 4
        means = int(self.has_mean.sum()) * self.ctx.feature_dim * 4 if self.cfg.classifier == "nme" else 0
        return head + means + super().storage_bytes()

    # ---- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.old_backbone is not None:
            state["old_backbone"] = self.old_backbone.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.old_backbone is not None:
            self.old_backbone.load_state_dict(state["old_backbone"])
