"""ConFiT: cross-convolution BatchNorm (Xconv BN) and hierarchical fine-tuning.

Jie, Deng, Li. "Alleviating Representational Shift for Continual Fine-tuning", CVPR-W 2022.
https://arxiv.org/abs/2204.10535 (official code: github.com/JieShibo/ConFiT, read for the spec)

The whole BatchNorm backbone is fine-tuned task after task. Per task, the strategy stores every BN
layer's running statistics and affine parameters, and (Xconv) the running mean of every BN-feeding
conv's *input*. Evaluating an old task restores that task's BN state; with Xconv, each BN's mean is
recovered by passing the stored input means through the *current* conv (:mod:`cl.models.xconv`),
which corrects the shift caused by fine-tuning the convs since. Within a task, training is staged:
classifier only, then + BN affine parameters, then everything (hierarchical fine-tuning), with a
fresh optimiser per stage so no momentum reaches parameters that were frozen.

``bn`` selects the ablation: ``shared`` (plain fine-tuning, one BN state), ``per_task`` (per-task BN
without the Xconv correction), ``xconv`` (ConFiT: channel / parity means), ``xconv_spatial`` (our
variant: per-position input means, exact when feature maps are not spatially stationary), ``frozen``
(BN in eval mode: pretrained statistics throughout); ``schedule`` is ``hierarchical`` or ``flat``.

The method is task-incremental; in the class-incremental scenario the task is inferred
(``task_inference``) and the task-inference accuracy is reported.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Annotated, Any, Iterator, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from cl.config import RunConfig
from cl.data.benchmark import Experience
from cl.models.xconv import ConvBNPair, attach_trackers, recover_output_mean, recover_output_mean_spatial
from cl.registry import STRATEGIES
from cl.strategies.base import OptimConfig, Strategy, StrategyContext, make_optimizer
from cl.strategies.task_inference import Prototypes, route


class ConFiTConfig(OptimConfig):
    name: Literal["confit"] = "confit"
    momentum: float = Field(0.0, ge=0, lt=1, description="the official code uses plain SGD")
    bn: Literal["shared", "per_task", "xconv", "xconv_spatial", "frozen"] = Field("xconv", description="how BatchNorm is handled across tasks")
    schedule: Literal["hierarchical", "flat"] = "hierarchical"
    stage_fractions: list[Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=lambda: [0.2, 0.5], min_length=2, max_length=2,
        description="stage boundaries as fractions of the epochs: classifier until floor(E*a), + BN affine until floor(E*b)",
    )
    recover_current: bool = Field(
        False, description="also evaluate the task just trained with recovered means (the official code recovers only older tasks)"
    )
    task_inference: Literal["prototype", "max_softmax"] = Field(
        "prototype", description="class-incremental only: nearest class mean on the pretrained features, or the most confident task head",
    )

    def check(self, cfg: RunConfig) -> None:
        if cfg.backbone.trainable != "all":
            raise ValueError(f"backbone.trainable: confit fine-tunes the whole backbone and stages it itself; use 'all' (got '{cfg.backbone.trainable}')")
        a, b = self.stage_fractions
        if not 0 <= a <= b <= 1:
            raise ValueError(f"strategy.stage_fractions: need 0 <= a <= b <= 1, got {self.stage_fractions}")


def stage_of(epoch: int, epochs: int, fractions: list[float]) -> int:
    """0 = classifier only, 1 = + BN affine, 2 = all parameters, as the official training loop:
    every task starts with the classifier alone, and the stage switches when the epoch index equals
    floor(E*a) (to 1), else floor(E*b) (to 2). For E >= 5 that is [0, a) / [a, b) / [b, E); for E < 5
    the first stage is not skipped (E=4: 0, 0, 2, 2; E=1: classifier only)."""
    a, b = (math.floor(epochs * f) for f in fractions)
    stage = 0
    for e in range(1, epoch + 1):
        if e == a:
            stage = 1
        elif e == b:
            stage = 2
    return stage


BN_KEYS = ("running_mean", "running_var", "weight", "bias")
PER_TASK = ("per_task", "xconv", "xconv_spatial")
TRACKER_KEYS = {"xconv": ("running_mean", "input_size"), "xconv_spatial": ("running_map",)}


@STRATEGIES.register("confit", config=ConFiTConfig, help="ConFiT: Xconv BN + hierarchical fine-tuning of a BatchNorm backbone")
class ConFiT(Strategy):
    input_kind = "images"
    task_aware_predict = True
    stateful = ("head", "bank", "prototypes")

    @classmethod
    def uses_cross_entropy(cls, cfg) -> bool:  # noqa: ANN001
        return True

    def __init__(self, cfg: ConFiTConfig, ctx: StrategyContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: ConFiTConfig = cfg
        self.model = ctx.backbone.model
        self.bns = {n: m for n, m in self.model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        if not self.bns:
            raise ValueError(f"confit needs a BatchNorm backbone; {ctx.backbone.name} has none")
        self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)  # the pretrained extractor, for task inference
        example = torch.zeros((2, *ctx.input_shape), device=self.device)
        self.per_task = cfg.bn in PER_TASK
        self.pairs: list[ConvBNPair] = attach_trackers(self.model, example) if self.per_task else []
        self.head = nn.Linear(ctx.feature_dim, ctx.n_classes).to(self.device)
        self.bank: dict[int, dict[str, Tensor]] = {}  # task -> flat dict of BN state and tracker means
        self.prototypes = Prototypes(ctx.n_classes, ctx.feature_dim).to(self.device)  # of the pretrained features
        self.optimizer: torch.optim.Optimizer | None = None
        self.stage = -1
        self.current = -1
        self._version = 0
        self._recovered: dict[tuple[int, str], tuple[int, dict[str, Tensor]]] = {}

    # ---- training ----------------------------------------------------------------------------

    def _stage_parameters(self, stage: int) -> list[nn.Parameter]:
        params = list(self.head.parameters())
        if self.cfg.schedule == "flat" or stage == 2:
            return params + list(self.model.parameters())
        if stage == 1:
            params += [p for bn in self.bns.values() for p in (bn.weight, bn.bias) if p is not None]
        return params

    def _set_stage(self, stage: int) -> None:
        if stage == self.stage:
            return
        self.stage = stage
        trainable = {id(p) for p in self._stage_parameters(stage)}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in trainable)
        self.optimizer = make_optimizer([p for p in self._stage_parameters(stage)], self.cfg)  # fresh: no momentum carried over

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters()) + list(self.model.parameters())

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        self.current = exp.task_id
        self.stage = -1

    def before_epoch(self, epoch: int) -> None:
        self._set_stage(stage_of(epoch, self.ctx.train.epochs, self.cfg.stage_fractions) if self.cfg.schedule == "hierarchical" else 2)

    def _train_mode(self) -> None:
        self.model.train()
        if self.cfg.bn == "frozen":
            for bn in self.bns.values():
                bn.eval()

    def observe(self, x: Tensor, y: Tensor, task_id: int) -> dict[str, float]:
        if self.optimizer is None or self.stage < 0:
            self.before_epoch(0)
        assert self.optimizer is not None
        self._train_mode()
        logits = self.head(self.model(self.ctx.backbone.transform(x, self.device)))
        lo, hi = self.task_ranges[task_id]
        n = len(y)
        loss = self.classification_loss(logits, y.to(self.device), torch.full((n,), lo, device=self.device), torch.full((n,), hi, device=self.device))
        self.optimizer_step(loss, self.optimizer)
        self._version += 1
        return {"loss": loss.item(), "stage": float(self.stage)}

    @torch.no_grad()
    def after_experience(self, exp: Experience) -> None:
        self.bank[exp.task_id] = self._snapshot()
        self.reference.eval()
        for xb, yb in exp.train.batches(self.ctx.train.eval_batch_size):
            self.prototypes.add(self.reference(self.ctx.backbone.transform(xb, self.device)), yb)
        self._version += 1

    # ---- per-task BatchNorm state ------------------------------------------------------------

    def _snapshot(self) -> dict[str, Tensor]:
        """The task's BN state and tracker means (both kinds, so probes can compare the variants)."""
        state = {}
        if self.per_task:
            for name, bn in self.bns.items():
                for key in BN_KEYS:
                    state[f"{name}.{key}"] = getattr(bn, key).detach().clone()
            for pair in self.pairs:
                for key in ("running_mean", "input_size", "running_map"):
                    state[f"{pair.conv_name}.input_tracker.{key}"] = getattr(pair.tracker, key).clone()
        return state

    def recovered_means(self, task: int, variant: str = "xconv") -> dict[str, Tensor]:
        """Each paired BN's mean for ``task``, recovered through the current convs (cached per model version)."""
        cached = self._recovered.get((task, variant))
        if cached is not None and cached[0] == self._version:
            return cached[1]
        bank = self.bank[task]
        out = {}
        with torch.no_grad():
            for pair in self.pairs:
                key = f"{pair.conv_name}.input_tracker"
                if variant == "xconv_spatial":
                    out[pair.bn_name] = recover_output_mean_spatial(pair.conv, bank[f"{key}.running_map"])
                else:
                    size = tuple(int(s) for s in bank[f"{key}.input_size"].tolist())
                    out[pair.bn_name] = recover_output_mean(pair.conv, bank[f"{key}.running_mean"], size)
        self._recovered[(task, variant)] = (self._version, out)
        return out

    def bn_state_for(self, task: int, variant: str | None = None) -> dict[str, dict[str, Tensor]] | None:
        """BN layer -> {running_mean, running_var, weight, bias} to evaluate ``task`` with (None: the live state)."""
        variant = variant or self.cfg.bn
        if variant not in PER_TASK or task not in self.bank:
            return None
        bank = self.bank[task]
        state = {name: {key: bank[f"{name}.{key}"] for key in BN_KEYS} for name in self.bns}
        # official: only tasks before the one just trained are corrected; it keeps its fresh statistics
        if variant != "per_task" and (task != self.current or self.cfg.recover_current):
            for name, mean in self.recovered_means(task, variant).items():
                state[name] = {**state[name], "running_mean": mean}
        return state

    @contextlib.contextmanager
    def task_state(self, task: int, variant: str | None = None) -> Iterator[None]:
        """Temporarily load ``task``'s BN state into the live model."""
        state = self.bn_state_for(task, variant)
        if state is None:
            yield
            return
        live = {name: {key: getattr(bn, key).detach().clone() for key in BN_KEYS} for name, bn in self.bns.items()}
        try:
            with torch.no_grad():
                for name, values in state.items():
                    for key, value in values.items():
                        getattr(self.bns[name], key).copy_(value)
            yield
        finally:
            with torch.no_grad():
                for name, values in live.items():
                    for key, value in values.items():
                        getattr(self.bns[name], key).copy_(value)

    # ---- inference ---------------------------------------------------------------------------

    def _task_logits(self, x: Tensor, task: int) -> Tensor:
        with self.task_state(task):
            return self.head(self.model(self.ctx.backbone.transform(x, self.device)))

    @torch.no_grad()
    def infer_task(self, x: Tensor) -> Tensor:
        """Task of each sample, among the tasks trained so far."""
        tasks = sorted(self.bank)
        if self.cfg.task_inference == "prototype":
            feats = self.reference(self.ctx.backbone.transform(x, self.device))
            return self.prototypes.infer_task(feats, {t: self.task_ranges[t] for t in tasks})
        self.model.eval()
        confidence = []
        for t in tasks:
            lo, hi = self.task_ranges[t]
            confidence.append(torch.softmax(self._task_logits(x, t)[:, lo:hi], dim=1).max(dim=1).values)
        return torch.tensor(tasks)[torch.stack(confidence, dim=1).argmax(dim=1).cpu()]

    @torch.no_grad()
    def predict(self, x: Tensor, task_id: int | None) -> Tensor:
        self.model.eval()
        scores = torch.full((len(x), self.ctx.n_classes), float("-inf"), device=self.device)
        if task_id is not None:
            return self._task_logits(x, task_id) if task_id in self.task_ranges else scores
        return self.predict_inferring(x)[0]

    @torch.no_grad()
    def predict_inferring(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Class-incremental scores with the task inferred, and the inferred tasks (None before any task)."""
        self.model.eval()
        if not self.bank:
            return torch.full((len(x), self.ctx.n_classes), float("-inf"), device=self.device), None
        inferred = self.infer_task(x)

        def own_classes(xr: Tensor, t: int) -> Tensor:  # the head spans all classes; keep task t's
            return self._task_logits(xr, t)[:, slice(*self.task_ranges[t])]

        return route(x, inferred, self.task_ranges, self.ctx.n_classes, own_classes, self.device), inferred

    # ---- shift probes and bookkeeping --------------------------------------------------------

    @torch.no_grad()
    def probe(self, x: Tensor, images: Tensor, task_id: int, layers: list[int] | None = None, bn: bool = True) -> dict[str, Tensor]:
        """Probe with the task's BN state; also record the means plain per-task BN and Xconv would use."""
        from cl.models.probe import backbone_probe

        self.model.eval()
        with self.task_state(task_id):
            out = backbone_probe(self.ctx.backbone, images, self.device, layers, bn)
            out["feat/embedding"] = self.model(self.ctx.backbone.transform(images, self.device)).float()
        if bn and task_id in self.bank and self.per_task:
            for variant in PER_TASK:
                state = self.bn_state_for(task_id, variant)
                assert state is not None
                for name, values in state.items():
                    out[f"bn_running_{variant}/{name}"] = values["running_mean"].float().cpu().clone()  # variants may share one stored tensor
        return out

    def storage_bytes(self) -> int:
        """Head rows + per-task BN state + the tracker means the configured variant needs + the backbone once."""
        needed = TRACKER_KEYS.get(self.cfg.bn, ())
        bank = sum(
            t.numel() * t.element_size()
            for state in self.bank.values()
            for key, t in state.items()
            if ".input_tracker." not in key or key.rsplit(".", 1)[1] in needed
        )
        head = self.seen_classes * (self.ctx.feature_dim + 1) * 4
        backbone = sum(p.numel() * p.element_size() for p in self.model.parameters())  # fine-tuned: stored once
        return head + bank + backbone

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["backbone"] = self.model.state_dict()  # always (the stage decides requires_grad), trackers included
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        # checkpoints load on the CPU: the bank is read every evaluation batch, so it lives on the device
        self.bank = {t: {k: v.to(self.device) for k, v in entry.items()} for t, entry in self.bank.items()}
        if self.bank:  # the last task trained: evaluated with its own statistics, not recovered ones
            self.current = max(self.bank)
        self._version += 1
