"""The strategy contract and the small amount of machinery every strategy shares.

A strategy owns its model, optimiser and memory, and nothing else; the loop in
:mod:`cl.engine.loop` owns the data and calls, per experience::

    before_experience(exp)
    observe(x, y, task_id)   # once per mini-batch; returns named loss terms
    after_experience(exp)
    predict(x, task_id)      # scores over the whole label space, -inf where it cannot score

``predict`` may also be called before the first experience and between any two (forward transfer:
the loop evaluates every task's test set before training when ``train.eval_future_tasks`` is on, the
default), with ``task_id`` None (class-incremental) or a task id (task-aware), on classes the
strategy has not seen: it must return scores of shape [batch, n_classes] then too, ``-inf`` where it
cannot score, never NaN and never an exception.

``x`` is always what the loop stores: cached float features when the backbone is frozen and the
strategy only needs features, uint8 images otherwise. :meth:`Strategy.encode` turns either into
features, so one implementation serves both paths, and replay buffers store the compact form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from cl.config import StrategyConfig, TrainConfig
from cl.data.benchmark import Experience, Split
from cl.memory import ReplayMemory
from cl.models.backbone import Backbone


@dataclass
class StrategyContext:
    """What the loop tells a strategy about the run."""

    n_classes: int
    scenario: str  # class_incremental | task_incremental | online
    backbone: Backbone
    feature_dim: int
    input_shape: tuple[int, int, int]  # (C, H, W) the backbone receives
    cached_features: bool  # inputs are backbone features, not images
    device: torch.device
    seed: int
    train: TrainConfig
    precision: str = "fp32"  # fp16: losses are scaled (a GradScaler) in optimizer_step


class OptimConfig(StrategyConfig):
    """Optimiser fields shared by gradient-based strategies."""

    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only")
    weight_decay: float = Field(0.0, ge=0)


def make_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    if not params:
        raise ValueError("no trainable parameters")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def masked_cross_entropy(logits: Tensor, y: Tensor, lo: Tensor | None = None, hi: Tensor | None = None, smoothing: float = 0.0) -> Tensor:
    """Cross-entropy where sample ``i`` competes only over classes ``[lo_i, hi_i)`` (all classes
    without ``lo``/``hi``). With ``smoothing`` ε the target is (1 - ε) on the label plus ε spread
    evenly over the classes the sample competes over, so masked classes receive none of it (torch's
    ``label_smoothing`` would spread it over -inf logits too, and the loss would be infinite)."""
    allowed = None
    if lo is not None and hi is not None:
        classes = torch.arange(logits.shape[1], device=logits.device)
        allowed = (classes >= lo[:, None]) & (classes < hi[:, None])
        logits = logits.masked_fill(~allowed, float("-inf"))
    if smoothing == 0:
        return F.cross_entropy(logits, y)
    logp = F.log_softmax(logits, dim=1)
    nll = -logp.gather(1, y[:, None]).squeeze(1)
    if allowed is None:
        uniform = -logp.mean(dim=1)
    else:
        uniform = -logp.masked_fill(~allowed, 0.0).sum(dim=1) / allowed.sum(dim=1)
    return ((1 - smoothing) * nll + smoothing * uniform).mean()


def _tensor_bytes(t: Tensor) -> int:
    return t.element_size() * t.numel()


class Strategy:
    """Base class. Subclasses set the class attributes and implement observe/predict.

    Class attributes:
        input_kind: "features" if the strategy only needs features of the (frozen) backbone,
            so the loop may hand it cached features; "images" if it needs pixels.
        data_policy: "current" trains on the current experience; "cumulative" on all so far.
        max_epochs: cap on epochs per experience (1 for single-pass statistics like prototypes).
        task_aware_predict: True if ``predict`` uses the task id (else the loop reuses scores).
        trains_itself: offline, the loop calls ``train_experience`` once per experience instead of
            feeding mini-batches (for wrapped libraries with their own training loop).
        resumable: False if the strategy cannot save everything it needs to resume (no checkpoints).
        stateful: attribute names whose state goes into checkpoints.
    """

    input_kind: ClassVar[Literal["features", "images"]] = "features"
    data_policy: ClassVar[Literal["current", "cumulative"]] = "current"
    max_epochs: ClassVar[int | None] = None
    task_aware_predict: ClassVar[bool] = False
    trains_itself: ClassVar[bool] = False
    # Runs domain-incremental streams (every class again in each experience); opt-in per strategy
    domain_incremental: ClassVar[bool] = False
    resumable: ClassVar[bool] = True
    stateful: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: StrategyConfig, ctx: StrategyContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.device = ctx.device
        self.generator = torch.Generator().manual_seed(ctx.seed)
        self.seen_classes = 0  # classes 0..seen_classes-1 have appeared
        self.task_ranges: dict[int, tuple[int, int]] = {}

    @classmethod
    def uses_cross_entropy(cls, cfg: StrategyConfig) -> bool:
        """True if training this configuration minimises :meth:`classification_loss` (so that
        ``train.label_smoothing`` applies); a non-zero smoothing is refused otherwise."""
        return False

    @classmethod
    def wants_features(cls, cfg: StrategyConfig) -> bool:
        """True if the loop may hand this configuration cached backbone features (``input_kind``)."""
        return cls.input_kind == "features"

    # ---- contract ---------------------------------------------------------------------------

    def before_experience(self, exp: Experience) -> None:
        self.task_ranges[exp.task_id] = exp.class_range
        self.seen_classes = max(self.seen_classes, exp.class_range[1])

    def before_epoch(self, epoch: int) -> None:
        """Offline, before each epoch of an experience (staged schedules); online, once (epoch 0)."""

    def observe(self, x: Tensor, y: Tensor, task_id: int) -> dict[str, float]:
        raise NotImplementedError

    def train_experience(self, exp: Experience, data: Split, epochs: int, batch_size: int) -> None:
        """Only for ``trains_itself`` strategies: train on ``data`` with their own loop."""
        raise NotImplementedError

    def after_experience(self, exp: Experience) -> None:
        pass

    def predict(self, x: Tensor, task_id: int | None) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def probe(self, x: Tensor, images: Tensor, task_id: int, layers: list[int] | None = None, bn: bool = True) -> dict[str, Tensor]:
        """Representations of a probe batch for shift analysis (``cl.engine.probes``).

        Args:
            x: the probe samples as the strategy stores them (features or uint8 images).
            images: the same samples as uint8 images, for the backbone's per-block features.
            task_id: the task the probe set belongs to (task-aware strategies route by it).

        Returns:
            ``feat/<layer>`` pooled features per backbone block and ``feat/embedding`` (what the
            classifier sees), ``bn_batch/<layer>`` / ``bn_running/<layer>`` BatchNorm input means.
            Strategies that swap per-task state override this to set task ``task_id``'s state first.
        """
        from cl.models.probe import backbone_probe

        self.train_mode(False)
        out = backbone_probe(self.ctx.backbone, images, self.device, layers, bn)
        out["feat/embedding"] = self.encode(x).float()
        return out

    # ---- helpers ----------------------------------------------------------------------------

    # (optimiser step within the experience, steps in the experience, epoch): set by the loop before
    # each observe, read by optimizer_step for train.lr_schedule / warmup_steps
    lr_position: tuple[int, int, int] = (0, 1, 0)

    def optimizer_step(self, loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
        """zero_grad, backward, step; under fp16 with a gradient scaler (the backbone's float16
        gradients would underflow; steps whose gradients overflow are skipped and the scale lowered).
        With ``train.lr_schedule``/``warmup_steps`` every parameter group's rate is its base rate
        times the schedule's factor at ``lr_position``; with ``train.grad_clip_norm`` the gradients'
        global norm is clipped first."""
        train = self.ctx.train
        optimizer.zero_grad(set_to_none=True)
        if train.scheduled:  # the rate at this step of the experience (set by the loop: lr_position)
            factor = train.lr_factor(*self.lr_position)
            for group in optimizer.param_groups:
                group["lr"] = group.setdefault("base_lr", group["lr"]) * factor
        scaler = None
        if self.ctx.precision == "fp16":
            scaler = getattr(self, "_grad_scaler", None)
            if scaler is None:
                scaler = self._grad_scaler = torch.amp.GradScaler(self.device.type)
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if train.grad_clip_norm is not None:
            if scaler is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, train.grad_clip_norm)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()

    def classification_loss(self, logits: Tensor, y: Tensor, lo: Tensor | None = None, hi: Tensor | None = None) -> Tensor:
        """Cross-entropy of a training batch (over ``[lo, hi)`` per sample when given), with
        ``train.label_smoothing``."""
        return masked_cross_entropy(logits, y, lo, hi, self.ctx.train.label_smoothing)

    def encode(self, x: Tensor) -> Tensor:
        """Features of a stored batch: cached features pass through, images go through the backbone."""
        if self.ctx.cached_features:
            return x.to(self.device, non_blocking=True).float()
        backbone = self.ctx.backbone
        return backbone.forward(backbone.transform(x, self.device))

    def label_ranges(self, task_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample class range a sample competes over in the loss.

        Task-incremental: its own task's classes (multi-head). Otherwise: all classes seen so far.
        """
        n = len(task_ids)
        if self.ctx.scenario == "task_incremental":
            lo = torch.tensor([self.task_ranges[int(t)][0] for t in task_ids], device=self.device)
            hi = torch.tensor([self.task_ranges[int(t)][1] for t in task_ids], device=self.device)
            return lo, hi
        return torch.zeros(n, dtype=torch.long, device=self.device), torch.full((n,), self.seen_classes, device=self.device)

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Backbone parameters ``backbone.trainable`` trains (none when features are cached)."""
        return [] if self.ctx.cached_features else self.ctx.backbone.trainable_parameters()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything the strategy trains (for the ``trainable_params`` metric)."""
        return self.backbone_parameters()

    def train_mode(self, mode: bool) -> None:
        if not self.ctx.cached_features:
            self.ctx.backbone.set_train(mode)

    def storage_bytes(self) -> int:
        """Bytes the strategy must keep to serve the classes seen so far.

        Excludes the frozen backbone and the replay memory (reported separately). A trained
        backbone counts in full: it has to be stored.
        """
        return sum(_tensor_bytes(p) for p in self.backbone_parameters())

    @property
    def memory(self) -> ReplayMemory | None:
        return getattr(self, "_memory", None)

    def memory_stats(self) -> tuple[int, int]:
        """(samples, bytes) held in the replay memory."""
        mem = self.memory
        return (len(mem), mem.nbytes) if mem is not None else (0, 0)

    # ---- checkpointing ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "generator": self.generator.get_state(),
            "seen_classes": self.seen_classes,
            "task_ranges": {int(k): list(v) for k, v in self.task_ranges.items()},
        }
        if self.backbone_parameters():
            state["backbone"] = self.ctx.backbone.model.state_dict()
        for name in self.stateful:
            value = getattr(self, name)
            state[name] = value.state_dict() if hasattr(value, "state_dict") else value
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.seen_classes = int(state["seen_classes"])
        self.task_ranges = {int(k): (int(v[0]), int(v[1])) for k, v in state["task_ranges"].items()}
        if "backbone" in state:
            self.ctx.backbone.model.load_state_dict(state["backbone"])
        for name in self.stateful:
            value = getattr(self, name)
            if hasattr(value, "load_state_dict"):
                value.load_state_dict(state[name])
            elif isinstance(value, Tensor):
                with torch.no_grad():
                    value.copy_(state[name])
            else:
                setattr(self, name, state[name])


def create_strategy(cfg: StrategyConfig, ctx: StrategyContext) -> Strategy:
    """Build the strategy named by ``cfg.name`` (its config class was chosen by the same name)."""
    from cl.registry import STRATEGIES

    return STRATEGIES.get(cfg.name)(cfg, ctx)
