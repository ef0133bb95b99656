"""Task-aware experience replay: rebalanced replay loss, old-task classifier rows detached.

Li, Jie, Deng. "Detachedly Learn a Classifier for Class-Incremental Learning", arXiv 2023.
https://arxiv.org/abs/2302.11730

Only the abstract is available; what follows is the reconstruction in specs/cl_methods.md §1, with
every unverified choice a config option:

* the classifier is one block of rows per task; when training task t, the rows of tasks < t are
  *detached* (no gradient) and *not in the optimiser* (so momentum and weight decay cannot move
  them either) - unless ``detach: false``;
* the loss is CE over all seen classes on the current batch plus ``lambda_t`` x CE over all seen
  classes on a memory batch. With old rows frozen, the within-old-task part of the replay loss has
  no gradient; what remains only teaches the current task's rows to stay out of old tasks' regions;
* ``lambda_t`` is the "rebalancing" weight, whose form is unknown: :func:`rebalance_weight`;
* the replay batch holds old tasks' samples only (``replay_from: old_tasks``): online, the
  reservoir also holds the current task's, which would otherwise be replayed with weight lambda_t.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from cl.data.benchmark import Experience
from cl.memory import ClassBalancedMemory, ReservoirMemory, create_memory, resolve_memory_policy
from cl.registry import STRATEGIES
from cl.strategies.base import OptimConfig, Strategy, StrategyContext, make_optimizer

Rebalance = Literal["none", "old_tasks", "class_ratio", "memory_ratio", "constant"]


class ERTaskAwareConfig(OptimConfig):
    name: Literal["er_task_aware"] = "er_task_aware"
    memory_size: int = Field(200, ge=0, description="replay buffer capacity, in samples")
    memory_policy: Literal["auto", "reservoir", "class_balanced"] = Field("auto", description="auto = reservoir online, class_balanced otherwise")
    replay_batch_size: int | None = Field(None, ge=1, description="memory samples per step (null = train batch size)")
    detach: bool = Field(True, description="old tasks' classifier rows get no gradient and are not optimised [RECON]")
    rebalance: Rebalance = Field("class_ratio", description="form of the replay-loss weight lambda_t [RECON]")
    rebalance_value: float = Field(1.0, ge=0, description="lambda for rebalance: constant")
    replay_from: Literal["old_tasks", "all"] = Field(
        "old_tasks", description="replayed memory samples: old tasks' only (the method's replay term acts on old tasks), or all "
        "(online, the reservoir also holds the current task's samples, which lambda_t would then up-weight)"
    )


def rebalance_weight(kind: str, task: int, old_classes: int, current_classes: int, old_samples: int, memory_size: int, value: float = 1.0) -> float:
    """The replay-loss weight lambda_t for training task ``task`` (0-based).

    Args:
        kind: "none" (1, plain ER weighting), "old_tasks" (number of old tasks, t-1 in 1-based terms),
            "class_ratio" (|old classes| / |current classes|: the old:new proportion joint training
            would see with balanced classes), "memory_ratio" (old training samples per stored
            sample, N_old / |M|), or "constant" (``value``).
        task: index of the current task; there is nothing to replay for task 0 (weight 0).
    """
    if task == 0:
        return 0.0
    if kind == "none":
        return 1.0
    if kind == "old_tasks":
        return float(task)
    if kind == "class_ratio":
        return old_classes / current_classes
    if kind == "memory_ratio":
        return old_samples / memory_size if memory_size else 0.0
    if kind == "constant":
        return float(value)
    raise ValueError(f"unknown rebalance '{kind}' (allowed: none, old_tasks, class_ratio, memory_ratio, constant)")


class TaskHeads(nn.Module):
    """A linear classifier stored as one (weight, bias) block per task, in class order."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()

    def add_task(self, n_classes: int, device: torch.device) -> None:
        layer = nn.Linear(self.in_features, n_classes).to(device)
        self.weights.append(nn.Parameter(layer.weight.detach().clone()))
        self.biases.append(nn.Parameter(layer.bias.detach().clone()))

    def forward(self, features: Tensor, trainable_from: int = 0) -> Tensor:
        """Logits over all classes seen so far; blocks before ``trainable_from`` are detached."""
        blocks = []
        for t, (w, b) in enumerate(zip(self.weights, self.biases)):
            if t < trainable_from:
                w, b = w.detach(), b.detach()
            blocks.append(F.linear(features, w, b))
        return torch.cat(blocks, dim=1)

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        return [self.weights[task], self.biases[task]]


@STRATEGIES.register("er_task_aware", config=ERTaskAwareConfig, help="task-aware ER: rebalanced replay, old classifier rows detached")
class ERTaskAware(Strategy):
    stateful = ("heads", "_memory", "task_samples")

    @classmethod
    def uses_cross_entropy(cls, cfg) -> bool:  # noqa: ANN001
        return True

    def __init__(self, cfg: ERTaskAwareConfig, ctx: StrategyContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: ERTaskAwareConfig = cfg
        self.heads = TaskHeads(ctx.feature_dim)
        self._memory = create_memory(resolve_memory_policy(cfg.memory_policy, ctx.scenario), cfg.memory_size, self.generator)
        self.task_samples: list[int] = []  # training samples per task seen so far
        self.current = -1
        self.weight = 0.0
        self.optimizer: torch.optim.Optimizer | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.current < 0:
            return self.backbone_parameters()
        heads = list(self.heads.parameters()) if not self.cfg.detach else self.heads.task_parameters(self.current)
        return heads + self.backbone_parameters()

    def load_state_dict(self, state: dict) -> None:
        for n in state["task_ranges"].values():  # rebuild the head blocks before loading them
            self.heads.add_task(int(n[1]) - int(n[0]), self.device)
        super().load_state_dict(state)
        self.current = len(self.task_samples) - 1

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        if exp.task_id >= len(self.heads.weights):
            self.heads.add_task(len(exp.classes), self.device)
        self.current = exp.task_id
        old_classes = exp.class_range[0]
        self.weight = rebalance_weight(
            self.cfg.rebalance, exp.task_id, old_classes, len(exp.classes), sum(self.task_samples[: exp.task_id]),
            self.cfg.memory_size, self.cfg.rebalance_value,
        )
        if len(self.task_samples) <= exp.task_id:
            self.task_samples.append(len(exp.train))
        self.optimizer = make_optimizer(self.trainable_parameters(), self.cfg)

    def _logits(self, x: Tensor) -> Tensor:
        return self.heads(self.encode(x), trainable_from=self.current if self.cfg.detach else 0)

    def observe(self, x: Tensor, y: Tensor, task_id: int) -> dict[str, float]:
        assert self.optimizer is not None, "before_experience must run first"
        self.train_mode(True)
        t = torch.full((len(y),), task_id)
        loss_current = self.classification_loss(self._logits(x), y.to(self.device), *self.label_ranges(t))
        loss = loss_current
        terms = {"loss_current": loss_current.item()}
        if len(self._memory) and self.weight > 0:
            batch = self.cfg.replay_batch_size or len(y)
            mx, my, mt = self._memory.sample(batch, before_task=task_id if self.cfg.replay_from == "old_tasks" else None)
            if len(my):  # online, the memory may hold the current task's samples only
                loss_replay = self.classification_loss(self._logits(mx.to(x.dtype)), my.to(self.device), *self.label_ranges(mt))
                loss = loss + self.weight * loss_replay
                terms["loss_replay"] = loss_replay.item()
        self.optimizer_step(loss, self.optimizer)
        if isinstance(self._memory, ReservoirMemory):
            self._memory.add(x, y, task_id)
        return {"loss": loss.item(), **terms}

    def after_experience(self, exp: Experience) -> None:
        if isinstance(self._memory, ClassBalancedMemory):
            self._memory.update(exp.train.x, exp.train.y, exp.task_id)

    @torch.no_grad()
    def predict(self, x: Tensor, task_id: int | None) -> Tensor:
        scores = torch.full((len(x), self.ctx.n_classes), float("-inf"), device=self.device)
        if len(self.heads.weights):  # classes without rows yet cannot be scored
            self.train_mode(False)
            logits = self.heads(self.encode(x))
            scores[:, : logits.shape[1]] = logits
        return scores

    def storage_bytes(self) -> int:
        return sum(p.numel() * 4 for p in self.heads.parameters()) + super().storage_bytes()
