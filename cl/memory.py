"""Replay buffers holding compact samples (uint8 images or cached features), with seeded sampling.

Two filling policies:

* :class:`ReservoirMemory` - online: every stream sample ends up in the buffer with probability
  ``capacity / n_seen`` (Vitter's algorithm R), whatever the stream length.
* :class:`ClassBalancedMemory` - per experience: after each experience the capacity is re-split
  evenly across all classes seen so far (water-filling when a class has too few samples).

Buffers store inputs exactly as the strategy received them, plus labels and task ids, and sample
with their own ``torch.Generator`` so they are reproducible and resumable.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from cl.data.disk import as_tensor


class ReplayMemory:
    """Storage and sampling shared by the filling policies: rows ``[0, size)`` are valid."""

    def __init__(self, capacity: int, generator: torch.Generator) -> None:
        if capacity < 0:
            raise ValueError(f"memory capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.generator = generator
        self.size = 0
        self._x: Tensor | None = None
        self._y = torch.empty(0, dtype=torch.int64)
        self._t = torch.empty(0, dtype=torch.int64)

    @property
    def x(self) -> Tensor | None:
        return None if self._x is None else self._x[: self.size]

    @property
    def y(self) -> Tensor:
        return self._y[: self.size]

    @property
    def t(self) -> Tensor:
        return self._t[: self.size]

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        """Bytes of the stored samples, labels and task ids."""
        if self._x is None:
            return 0
        per_row = self._x[0].element_size() * self._x[0].numel() + 2 * 8
        return per_row * self.size

    def sample(self, n: int, before_task: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``min(n, len)`` distinct stored samples, uniformly at random: (x, y, task ids). With
        ``before_task``, only among the samples of tasks ``< before_task`` (possibly none)."""
        if self._x is None or self.size == 0:
            raise RuntimeError("cannot sample from an empty memory")
        if before_task is None:
            idx = torch.randperm(self.size, generator=self.generator)[:n]
        else:
            pool = torch.nonzero(self._t[: self.size] < before_task).flatten()
            idx = pool[torch.randperm(len(pool), generator=self.generator)[:n]]
        return self._x[idx], self._y[idx], self._t[idx]

    def class_counts(self) -> dict[int, int]:
        return {int(c): int(n) for c, n in zip(*torch.unique(self.y, return_counts=True))}

    def state_dict(self) -> dict[str, Any]:
        return {"x": None if self.x is None else self.x.clone(), "y": self.y.clone(), "t": self.t.clone(), "capacity": self.capacity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.capacity = state["capacity"]
        self._set(state["x"], state["y"], state["t"])

    def _allocate(self, like: Tensor) -> None:
        self._x = torch.empty((self.capacity, *like.shape[1:]), dtype=like.dtype)
        self._y = torch.empty(self.capacity, dtype=torch.int64)
        self._t = torch.empty(self.capacity, dtype=torch.int64)

    def _set(self, x: Tensor | None, y: Tensor, t: Tensor) -> None:
        if x is None:
            self._x, self.size = None, 0
            return
        self._allocate(x)
        self.size = len(y)
        assert self._x is not None
        self._x[: self.size], self._y[: self.size], self._t[: self.size] = x, y, t


def _as_task_tensor(t: Tensor | int, n: int) -> Tensor:
    return torch.full((n,), t, dtype=torch.int64) if isinstance(t, int) else t.detach().cpu().to(torch.int64)


class ReservoirMemory(ReplayMemory):
    """Reservoir sampling over the whole stream (Vitter 1985, algorithm R)."""

    def __init__(self, capacity: int, generator: torch.Generator) -> None:
        super().__init__(capacity, generator)
        self.n_seen = 0

    def add(self, x: Tensor, y: Tensor, t: Tensor | int = 0) -> None:
        """Offer a batch of stream samples, in stream order."""
        b = len(y)
        if b and self.capacity:
            t = _as_task_tensor(t, b)
            x, y = x.detach().cpu(), y.detach().cpu().to(torch.int64)
            if self._x is None:
                self._allocate(x)
            assert self._x is not None
            position = self.n_seen + torch.arange(b, dtype=torch.float64)  # 0-based stream index
            # While filling, sample i goes to slot i; then to a uniform slot in [0, i], kept if < capacity.
            draw = torch.floor(torch.rand(b, generator=self.generator, dtype=torch.float64) * (position + 1))
            slot = torch.where(position < self.capacity, position, draw).long()
            accepted = torch.nonzero(slot < self.capacity).flatten()
            # Sequential semantics: when two samples of a batch hit one slot, the later one wins.
            last = {int(slot[i]): int(i) for i in accepted}
            slots = torch.tensor(list(last.keys()), dtype=torch.long)
            rows = torch.tensor(list(last.values()), dtype=torch.long)
            if len(rows):
                self._x[slots], self._y[slots], self._t[slots] = x[rows], y[rows], t[rows]
            self.size = min(self.capacity, self.n_seen + b)
        self.n_seen += b

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "n_seen": self.n_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.n_seen = state["n_seen"]


def balanced_quotas(available: dict[int, int], capacity: int) -> dict[int, int]:
    """Split ``capacity`` across classes as evenly as possible without exceeding availability.

    Water-filling: classes with fewer samples than an even share keep all they have and the
    spare capacity goes to the others; remainders go to the smaller class ids.
    """
    quotas = {c: 0 for c in available}
    remaining = capacity
    open_classes = sorted(c for c, n in available.items() if n > 0)
    while remaining > 0 and open_classes:
        share, extra = divmod(remaining, len(open_classes))
        for i, c in enumerate(open_classes):
            take = min(share + (i < extra), available[c] - quotas[c])
            quotas[c] += take
            remaining -= take
        open_classes = [c for c in open_classes if quotas[c] < available[c]]
    return quotas


class ClassBalancedMemory(ReplayMemory):
    """Per-experience update keeping an equal number of samples per seen class."""

    def update(self, x: Tensor, y: Tensor, t: Tensor | int = 0) -> None:
        """Merge one experience's data ``(x, y)`` into the buffer and rebalance.

        Stored samples of a class are kept in preference to new ones (they are already a random
        subset); new samples enter in a random order, so shrinking a class drops a random subset.
        """
        if self.capacity == 0 or len(y) == 0:
            return
        t = _as_task_tensor(t, len(y))
        order = torch.randperm(len(y), generator=self.generator)
        n_old = self.size if self.x is not None else 0
        ys = torch.cat([self.y, y.detach().cpu().to(torch.int64)[order]])
        ts = torch.cat([self.t, t[order]])
        quotas = balanced_quotas({int(c): int((ys == c).sum()) for c in torch.unique(ys)}, self.capacity)
        keep = torch.cat([torch.nonzero(ys == c).flatten()[:q] for c, q in sorted(quotas.items())])
        # Only the kept new samples are gathered (images on disk are decoded here, and only these).
        from_new = keep >= n_old
        new_x = x[order[keep[from_new] - n_old]]
        new_x = as_tensor(new_x).detach().cpu()
        xs = torch.empty((len(keep), *new_x.shape[1:]), dtype=new_x.dtype)
        xs[from_new] = new_x
        if n_old:
            assert self.x is not None
            xs[~from_new] = self.x[keep[~from_new]]
        self._set(xs, ys[keep], ts[keep])


def resolve_memory_policy(policy: str, scenario: str) -> str:
    """"auto": a reservoir in the online scenario (no experience boundaries to refill at), else a
    class-balanced memory refilled after each experience."""
    if policy != "auto":
        return policy
    return "reservoir" if scenario == "online" else "class_balanced"


def create_memory(policy: str, capacity: int, generator: torch.Generator) -> ReplayMemory:
    if policy == "reservoir":
        return ReservoirMemory(capacity, generator)
    if policy == "class_balanced":
        return ClassBalancedMemory(capacity, generator)
    raise ValueError(f"unknown memory policy '{policy}' (allowed: reservoir, class_balanced)")
