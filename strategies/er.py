"""Experience replay (ER): a linear head trained on each batch together with a batch from memory.

Chaudhry et al. "On Tiny Episodic Memories in Continual Learning", 2019.
https://arxiv.org/abs/1902.10486

Offline, the memory is class-balanced and refilled after each experience; online, it is a
reservoir updated after every stream batch. Samples are stored in the loop's compact form (cached
features or uint8 images).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from cl.data.benchmark import Experience
from cl.memory import ClassBalancedMemory, ReservoirMemory, create_memory, resolve_memory_policy
from cl.registry import STRATEGIES
from cl.strategies.base import OptimConfig, StrategyContext
from cl.strategies.finetune import Finetune


class ERConfig(OptimConfig):
    name: Literal["er"] = "er"
    memory_size: int = Field(200, ge=0, description="replay buffer capacity, in samples")
    memory_policy: Literal["auto", "reservoir", "class_balanced"] = Field(
        "auto", description="auto = reservoir online, class_balanced otherwise"
    )
    replay_batch_size: int | None = Field(None, ge=1, description="memory samples per step (null = train batch size)")


@STRATEGIES.register("er", config=ERConfig, help="experience replay with a linear head")
class ER(Finetune):
    domain_incremental: ClassVar[bool] = True  # keeps working when a class reappears in a new domain
    stateful = ("head", "_memory")

    def __init__(self, cfg: ERConfig, ctx: StrategyContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: ERConfig = cfg
        policy = resolve_memory_policy(cfg.memory_policy, ctx.scenario)
        self._memory = create_memory(policy, cfg.memory_size, self.generator)

    def replay_batch_size(self, stream_batch: int) -> int:
        if self.cfg.replay_batch_size is not None:
            return self.cfg.replay_batch_size
        return stream_batch

    def observe(self, x: Tensor, y: Tensor, task_id: int) -> dict[str, float]:
        t = torch.full((len(y),), task_id)
        if len(self._memory):
            mx, my, mt = self._memory.sample(self.replay_batch_size(len(y)))
            loss = self.step(torch.cat([x, mx.to(x.dtype)]), torch.cat([y, my]), torch.cat([t, mt]))
        else:
            loss = self.step(x, y, t)
        if isinstance(self._memory, ReservoirMemory):
            self._memory.add(x, y, task_id)
        return {"loss": loss.item()}

    def after_experience(self, exp: Experience) -> None:
        if isinstance(self._memory, ClassBalancedMemory):
            self._memory.update(exp.train.x, exp.train.y, exp.task_id)
