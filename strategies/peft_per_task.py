"""PEFT-per-task: one small parameter-efficient module set (any :mod:`cl.peft` method) per task.

For each task a fresh module set and that task's head are trained on the frozen backbone; when the
task ends both are frozen and packed (optionally to 1 bit) into the per-task bank, and what is
evaluated afterwards is exactly what was stored. Earlier tasks' modules are never touched again.

* Task-incremental: the task id routes each sample to its module and head.
* Class-incremental: the task is inferred (``task_inference``): ``prototype`` = nearest class mean
  of the pretrained backbone's features (no module attached); ``max_score`` = run every task's
  module and head and take the task whose max logit is highest after standardising it with that
  task's own training statistics (heads trained in isolation are not on a common scale). The
  task-inference accuracy is reported in metrics.json.
* ``share: first_session`` trains one module on the first task and freezes it (APER-style), with
  only the heads trained afterwards: shared vs per-task adaptation.
* ``merge_eval``: mergeable methods are folded into the backbone for evaluation (plain model
  latency) and unfolded afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from cl.config import Polymorphic, RunConfig
from cl.data.benchmark import Experience
from cl.peft import PeftConfig, PeftMethod, bank, build_peft
from cl.peft.adapter import AdapterConfig
from cl.registry import PEFT, STRATEGIES
from cl.strategies.base import OptimConfig, Strategy, StrategyContext, make_optimizer
from cl.strategies.task_inference import Prototypes, route


class PeftPerTaskConfig(OptimConfig):
    name: Literal["peft_per_task"] = "peft_per_task"
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    peft: Annotated[PeftConfig, Polymorphic(PEFT)] = Field(default_factory=AdapterConfig, description="the method and its options")
    share: Literal["per_task", "first_session"] = "per_task"
    task_inference: Literal["prototype", "max_score"] = "prototype"
    merge_eval: bool = Field(False, description="evaluate mergeable methods merged into the backbone")

    def check(self, cfg: RunConfig) -> None:
        if cfg.backbone.trainable != "none":
            raise ValueError(f"backbone.trainable: peft_per_task trains modules on a frozen backbone; use 'none' (got '{cfg.backbone.trainable}')")
        if self.merge_eval and not PEFT.get(self.peft.name).mergeable:
            raise ValueError(f"strategy.merge_eval: '{self.peft.name}' is not mergeable")


@STRATEGIES.register("peft_per_task", config=PeftPerTaskConfig, help="one PEFT module set + head per task, task inferred in CIL")
class PeftPerTask(Strategy):
    input_kind = "images"
    task_aware_predict = True
    stateful = ("prototypes",)

    @classmethod
    def uses_cross_entropy(cls, cfg) -> bool:  # noqa: ANN001
        return True

    def __init__(self, cfg: PeftPerTaskConfig, ctx: StrategyContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: PeftPerTaskConfig = cfg
        self.model = ctx.backbone.model
        build_peft(cfg.peft, self.model)  # fail at start, not after the first task, on an incompatible backbone
        self.modules: dict[int, PeftMethod] = {}
        self.heads = nn.ModuleDict()
        self.packed: dict[int, dict[str, Tensor]] = {}
        self.calibration: dict[int, tuple[float, float]] = {}  # task -> (mean, std) of its max logit on train data
        self.prototypes = Prototypes(ctx.n_classes, ctx.feature_dim).to(self.device)
        self.active: PeftMethod | None = None
        self.current = -1
        self.optimizer: torch.optim.Optimizer | None = None

    # ---- module switching --------------------------------------------------------------------

    def _module_for(self, task: int) -> PeftMethod:
        return self.modules[0] if self.cfg.share == "first_session" and task > 0 else self.modules[task]

    def _activate(self, method: PeftMethod | None) -> None:
        if self.active is method:
            return
        if self.active is not None:
            self.active.detach()
        if method is not None:
            method.attach(self.model)
        self.active = method

    def _features(self, x: Tensor, task: int | None) -> Tensor:
        """Backbone features with ``task``'s module (None: the plain pretrained backbone)."""
        self._activate(None if task is None else self._module_for(task))
        return self.model(self.ctx.backbone.transform(x, self.device))

    # ---- training ----------------------------------------------------------------------------

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        t = self.current = exp.task_id
        lo, hi = exp.class_range
        self.heads[str(t)] = nn.Linear(self.ctx.feature_dim, hi - lo).to(self.device)
        params = list(self.heads[str(t)].parameters())
        if self.cfg.share == "per_task" or t == 0:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.ctx.seed * 1000 + t)
                self.modules[t] = build_peft(self.cfg.peft, self.model).to(self.device)
            params += list(self.modules[t].parameters())
        self.optimizer = make_optimizer(params, self.cfg)

    def observe(self, x: Tensor, y: Tensor, task_id: int) -> dict[str, float]:
        assert self.optimizer is not None
        method = self._module_for(task_id)
        method.train(self.cfg.share == "per_task" or self.current == 0)  # a shared, frozen module stays in eval
        self.heads[str(task_id)].train()
        lo = self.task_ranges[task_id][0]
        if method.training and method.needs_data:  # data-derived init (MemVP-F) from the task's first batch, on the plain backbone
            self._activate(None)
            with torch.no_grad():
                method.init_from_data(self.model, self.ctx.backbone.transform(x, self.device),
                                      torch.Generator().manual_seed(self.ctx.seed * 1000 + task_id))
        logits = self.heads[str(task_id)](self._features(x, task_id))
        loss = self.classification_loss(logits, y.to(self.device) - lo)
        self.optimizer_step(loss, self.optimizer)
        return {"loss": loss.item()}

    @torch.no_grad()
    def after_experience(self, exp: Experience) -> None:
        t = exp.task_id
        if t in self.modules:
            method = self.modules[t]
            method.eval().requires_grad_(False)
            self.packed[t] = bank.pack(method)
            self._activate(None)
            bank.unpack(method, self.packed[t])  # evaluate exactly what is stored (1-bit included)
        self.heads[str(t)].eval().requires_grad_(False)
        self.optimizer = None
        maxima = []
        for xb, yb in exp.train.batches(self.ctx.train.eval_batch_size):
            self.prototypes.add(self._features(xb, None), yb)
            maxima.append(self._task_logits(xb, t).max(dim=1).values)
        m = torch.cat(maxima)
        self.calibration[t] = (float(m.mean()), float(m.std()) if len(m) > 1 else 1.0)

    # ---- inference ---------------------------------------------------------------------------

    def _task_logits(self, x: Tensor, task: int) -> Tensor:
        method = self._module_for(task)
        if self.cfg.merge_eval:
            self._activate(None)
            method.merge(self.model)
            try:
                feats = self.model(self.ctx.backbone.transform(x, self.device))
            finally:
                method.unmerge(self.model)
                method.detach()
        else:
            method.eval()
            feats = self._features(x, task)
        return self.heads[str(task)](feats)

    def _trained(self) -> list[int]:
        return sorted(t for t in self.task_ranges if t in self.calibration)

    @torch.no_grad()
    def infer_task(self, x: Tensor) -> Tensor:
        tasks = self._trained()
        if self.cfg.task_inference == "prototype":
            return self.prototypes.infer_task(self._features(x, None), {t: self.task_ranges[t] for t in tasks})
        scores = []
        for t in tasks:
            mean, std = self.calibration[t]
            scores.append((self._task_logits(x, t).max(dim=1).values - mean) / max(std, 1e-6))
        return torch.tensor(tasks)[torch.stack(scores, dim=1).argmax(dim=1).cpu()]

    @torch.no_grad()
    def predict(self, x: Tensor, task_id: int | None) -> Tensor:
        scores = torch.full((len(x), self.ctx.n_classes), float("-inf"), device=self.device)
        if task_id is not None:
            if task_id in self.calibration:
                lo, hi = self.task_ranges[task_id]
                scores[:, lo:hi] = self._task_logits(x, task_id)
            return scores
        return self.predict_inferring(x)[0]

    @torch.no_grad()
    def predict_inferring(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Class-incremental scores with the task inferred, and the inferred tasks (None before any task)."""
        if not self._trained():
            return torch.full((len(x), self.ctx.n_classes), float("-inf"), device=self.device), None
        inferred = self.infer_task(x)
        return route(x, inferred, self.task_ranges, self.ctx.n_classes, self._task_logits, self.device), inferred

    # ---- bookkeeping -------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Per task: one module set (or none after the first, when shared) and one head."""
        params = list(self.heads.parameters())
        for method in self.modules.values():
            params += list(method.parameters())
        return params

    def storage_bytes(self) -> int:
        """Heads + packed modules + what task inference keeps: the class prototypes (float32, as
        SimpleCIL counts them) or each task's (mean, std) calibration (float32)."""
        heads = sum(p.numel() * 4 for p in self.heads.parameters())
        if self.cfg.task_inference == "prototype":
            inference = int((self.prototypes.counts > 0).sum()) * self.ctx.feature_dim * 4
        else:
            inference = len(self.calibration) * 2 * 4
        return heads + sum(bank.packed_nbytes(p) for p in self.packed.values()) + inference

    def train_mode(self, mode: bool) -> None:
        self.model.eval()  # the backbone is frozen; module dropout follows observe/eval

    def export(self, run_dir: Path) -> None:
        """The per-task bank: ``peft_bank/task<k>.safetensors`` (+ heads)."""
        config = self.cfg.peft.model_dump()
        for t, packed in self.packed.items():
            head = {f"head.{k}": v for k, v in self.heads[str(t)].state_dict().items()}
            bank.save({**packed, **head}, run_dir / "peft_bank" / f"task{t}.safetensors", {**config, "task": t})

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["heads"] = {t: h.state_dict() for t, h in self.heads.items()}
        state["packed"] = self.packed
        state["calibration"] = self.calibration
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._activate(None)
        for t, head_state in state["heads"].items():
            lo, hi = self.task_ranges[int(t)]
            self.heads[t] = nn.Linear(self.ctx.feature_dim, hi - lo).to(self.device).requires_grad_(False)
            self.heads[t].load_state_dict(head_state)
        self.packed = {int(t): p for t, p in state["packed"].items()}
        self.calibration = {int(t): tuple(v) for t, v in state["calibration"].items()}
        self.modules = {}
        for t, packed in self.packed.items():
            method = build_peft(self.cfg.peft, self.model).to(self.device)
            bank.unpack(method, packed)
            self.modules[t] = method.eval().requires_grad_(False)
