"""DER++: experience replay with the logits ("dark knowledge") recorded when each sample was seen.

Buzzega, Boschini, Porrello, Abati, Calderara. "Dark Experience for General Continual Learning:
a Strong, Simple Baseline", NeurIPS 2020. https://arxiv.org/abs/2004.07211

A reservoir buffer over the whole stream keeps, for every sample it accepts, the input, the label
and the network's logits for that sample at the moment it was observed. Every step minimises

    CE(f(x), y) + alpha * MSE(f(x'), z') + beta * CE(f(x''), y'')

where (x', z') and (x'', y'') are two independent minibatches drawn from the buffer: the first
term learns the current batch, the second keeps the whole logit vector of old samples where it was
(a function-space anchor that also constrains classes not yet seen), the third is plain ER.

Our reconstruction (the reference is mammoth ``models/derpp.py`` with ``utils/buffer.py``):

* The buffer is a reservoir in every scenario, including offline class-incremental, and it is
  offered every observed batch, so with several epochs a sample is offered once per epoch (the
  reference does the same: ``num_seen_examples`` counts observations, not distinct samples).
* Stored logits are those of the very forward pass that computed the stream loss, i.e. with the
  parameters *before* this step's update and on the view the loss saw: the augmented view when
  ``train.augment`` is on, as in the reference (whose buffer keeps the non-augmented input but the
  augmented view's logits). Buffer minibatches are stored in the loop's compact form (cached
  features, or uint8 images that the loop re-augments when they go through the backbone).
* The head spans all ``n_classes`` from the start, so stored logits are full width and the MSE
  covers every output, seen or not, as in the reference. The cross-entropy terms, though, compete
  over the classes seen so far (per task in the task-incremental scenario) like every other
  strategy of this loop; the reference's CE runs over the whole head. With alpha = beta = 0 a step
  is therefore exactly :class:`~cl.strategies.finetune.Finetune`'s.
* A term whose weight is 0 is skipped (no buffer draw, no forward pass): with a training backbone
  an unused forward pass would still move BatchNorm statistics.
* The three terms are summed and back-propagated once; the reference calls ``backward`` per term,
  which accumulates the same gradient.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from cl.memory import ReservoirMemory
from cl.registry import STRATEGIES
from cl.strategies.base import OptimConfig, StrategyContext
from cl.strategies.finetune import Finetune


class DERppConfig(OptimConfig):
    name: Literal["derpp"] = "derpp"
    alpha: float = Field(0.3, ge=0, description="weight of the logit-matching (MSE) replay term")
    beta: float = Field(0.5, ge=0, description="weight of the label (cross-entropy) replay term")
    memory_size: int = Field(200, ge=0, description="reservoir buffer capacity, in samples")
    replay_batch_size: int | None = Field(None, ge=1, description="samples per buffer minibatch, each of the two (null = train batch size)")


def derpp_loss(
    ce: Tensor, replay_logits: Tensor | None, stored_logits: Tensor | None, replay_ce: Tensor | None, alpha: float, beta: float,
) -> tuple[Tensor, dict[str, float]]:
    """Total DER++ loss from its pieces: ``ce + alpha * MSE(replay_logits, stored_logits) + beta * replay_ce``.

    Args:
        ce: cross-entropy of the stream batch.
        replay_logits, stored_logits: [m, n_classes] current and recorded logits of the first
            buffer minibatch (None to skip the term).
        replay_ce: cross-entropy of the second buffer minibatch (None to skip the term).

    Returns:
        (total loss, the named terms for logging).
    """
    total = ce
    terms = {"loss_ce": float(ce.detach())}
    if replay_logits is not None and stored_logits is not None:
        mse = F.mse_loss(replay_logits, stored_logits)
        total = total + alpha * mse
        terms["loss_logits"] = float(mse.detach())
    if replay_ce is not None:
        total = total + beta * replay_ce
        terms["loss_replay_ce"] = float(replay_ce.detach())
    return total, terms


class LogitReservoir:
    """A reservoir buffer whose rows also carry the logits recorded at insertion.

    The acceptance decisions are :class:`~cl.memory.ReservoirMemory`'s own (one implementation of
    algorithm R): it is fed each sample's position in the stream, so after an offer the slots that
    hold positions from this batch are exactly the slots it wrote, and the payload (input and
    logits) is written to the same slots here.
    """

    def __init__(self, capacity: int, n_classes: int, generator: torch.Generator) -> None:
        self.slots = ReservoirMemory(capacity, generator)  # x = stream position of the sample in each slot
        self.n_classes = n_classes
        self.generator = generator
        self._x: Tensor | None = None
        self._logits = torch.empty(capacity, n_classes)

    @property
    def capacity(self) -> int:
        return self.slots.capacity

    @property
    def n_seen(self) -> int:
        return self.slots.n_seen

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def x(self) -> Tensor | None:
        return None if self._x is None else self._x[: len(self)]

    @property
    def y(self) -> Tensor:
        return self.slots.y

    @property
    def t(self) -> Tensor:
        return self.slots.t

    @property
    def logits(self) -> Tensor:
        return self._logits[: len(self)]

    @property
    def positions(self) -> Tensor:
        """Stream position (0-based, over every offered sample) of the sample held in each slot."""
        return torch.empty(0, dtype=torch.int64) if self.slots.x is None else self.slots.x

    @property
    def nbytes(self) -> int:
        """Bytes of the stored inputs, labels, task ids and logits (the position bookkeeping included)."""
        if self._x is None:
            return 0
        per_row = self._x[0].element_size() * self._x[0].numel() + 3 * 8 + self.n_classes * 4
        return per_row * len(self)

    def class_counts(self) -> dict[int, int]:
        return self.slots.class_counts()

    def add(self, x: Tensor, y: Tensor, t: Tensor | int, logits: Tensor) -> None:
        """Offer a batch in stream order, with the logits to record for each of its samples."""
        b, start = len(y), self.slots.n_seen
        self.slots.add(torch.arange(start, start + b), y, t)
        if b == 0 or self.capacity == 0:
            return
        x = x.detach().cpu()
        if self._x is None:
            self._x = torch.empty((self.capacity, *x.shape[1:]), dtype=x.dtype)
        written = torch.nonzero(self.positions >= start).flatten()
        rows = self.positions[written] - start
        self._x[written] = x[rows]
        self._logits[written] = logits.detach().float().cpu()[rows]

    def sample(self, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``min(n, len)`` distinct stored samples, uniformly at random: (x, y, task ids, logits)."""
        if self._x is None or len(self) == 0:
            raise RuntimeError("cannot sample from an empty memory")
        idx = torch.randperm(len(self), generator=self.generator)[:n]
        return self._x[idx], self.y[idx], self.t[idx], self._logits[idx]

    def state_dict(self) -> dict[str, Any]:
        return {"slots": self.slots.state_dict(), "x": None if self.x is None else self.x.clone(), "logits": self.logits.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.slots.load_state_dict(state["slots"])
        self._logits = torch.empty(self.capacity, self.n_classes)
        if state["x"] is None:
            self._x = None
            return
        x = state["x"]
        self._x = torch.empty((self.capacity, *x.shape[1:]), dtype=x.dtype)
        self._x[: len(x)] = x
        self._logits[: len(x)] = state["logits"]


@STRATEGIES.register("derpp", config=DERppConfig, help="DER++: reservoir replay of labels and of the logits recorded at insertion")
class DERpp(Finetune):
    domain_incremental: ClassVar[bool] = True  # the logit term does not assume new classes per experience
    stateful = ("head", "_memory")

    def __init__(self, cfg: DERppConfig, ctx: StrategyContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: DERppConfig = cfg
        self._memory = LogitReservoir(cfg.memory_size, ctx.n_classes, self.generator)

    def _replay(self, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        mx, my, mt, mz = self._memory.sample(n)
        return mx, my.to(self.device), mt, mz.to(self.device)

    def observe(self, x: Tensor, y: Tensor, task_id: int) -> dict[str, float]:
        assert self.optimizer is not None, "before_experience must run first"
        self.train_mode(True)
        t = torch.full((len(y),), task_id)
        logits = self.head(self.encode(x))
        ce = self.classification_loss(logits, y.to(self.device), *self.label_ranges(t))
        replay_logits = stored = replay_ce = None
        if len(self._memory):
            m = self.cfg.replay_batch_size or len(y)
            if self.cfg.alpha > 0:
                mx, _, _, stored = self._replay(m)
                replay_logits = self.head(self.encode(mx))
            if self.cfg.beta > 0:
                mx, my, mt, _ = self._replay(m)
                replay_ce = self.classification_loss(self.head(self.encode(mx)), my, *self.label_ranges(mt))
        loss, terms = derpp_loss(ce, replay_logits, stored, replay_ce, self.cfg.alpha, self.cfg.beta)
        self.optimizer_step(loss, self.optimizer)
        self._memory.add(x, y, task_id, logits)
        return {"loss": float(loss.detach()), **terms}
