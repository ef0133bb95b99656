"""Probe features saved after every experience, for representational-shift analysis.

A fixed probe set per task (``shift.per_class`` test samples of each of its classes) is passed
through the strategy after every experience. What is saved, per task ``j`` (keys
``task<j>/<kind>/<name>`` in ``probes/exp<i>.safetensors``):

* ``feat/<layer>``: spatially average-pooled features of every block timm's
  ``forward_intermediates`` exposes, plus ``feat/embedding``, what the strategy's classifier sees
  (float16: these are only compared with each other);
* ``bn_batch/<layer>``, ``bn_running/<layer>``, ``bn_std/<layer>``: for every BatchNorm layer, the
  true mean of its input on the probe set, the running mean the network used for it, and the
  running standard deviation it divided by (float32);
* ``labels/y``: the probe labels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from cl.config import ShiftConfig
from cl.data.benchmark import Benchmark
from cl.utils import atomic_save


class ProbeRecorder:
    """Fixed per-task probe sets; ``record`` runs them through the strategy and saves the result."""

    def __init__(self, cfg: ShiftConfig, inputs: Benchmark, images: Benchmark, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.sets: list[tuple[Tensor, Tensor, Tensor]] = []
        g = torch.Generator().manual_seed(cfg.seed)
        for exp_in, exp_img in zip(inputs.experiences, images.experiences):
            rows = []
            for c in exp_in.classes:
                idx = torch.nonzero(exp_in.test.y == c).flatten()
                rows.append(idx[torch.randperm(len(idx), generator=g)[: cfg.per_class]])
            keep = torch.cat(rows)
            self.sets.append((exp_in.test.x[keep], exp_img.test.x[keep], exp_in.test.y[keep]))

    def record(self, strategy: Any, experience: int) -> Path:
        tensors: dict[str, Tensor] = {}
        order: dict[str, list[str]] = {"feat": [], "bn": []}
        for task, (x_in, x_img, y) in enumerate(self.sets[: experience + 1]):
            out = strategy.probe(x_in, x_img, task, layers=self.cfg.layers, bn=self.cfg.bn_stats)
            for key, t in out.items():
                kind, name = key.split("/", 1)
                t = t.detach().cpu()
                tensors[f"task{task}/{key}"] = (t.half() if kind == "feat" else t.float()).contiguous()
                bucket = "feat" if kind == "feat" else "bn"
                if name not in order[bucket]:
                    order[bucket].append(name)
            tensors[f"task{task}/labels/y"] = y.contiguous()
        path = self.run_dir / "probes" / f"exp{experience}.safetensors"
        meta = {k: json.dumps(v) for k, v in order.items()}
        atomic_save(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        return path
