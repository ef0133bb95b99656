"""Running Avalanche's own strategies on exactly our stream and backbone, for side-by-side benchmarks.

Quirks of Avalanche 0.6 handled here:

* ``SupervisedTemplate`` calls ``model.train()`` every epoch, which would put a frozen BatchNorm
  backbone into training mode and let its running statistics drift; :class:`FrozenExtractor`
  keeps the backbone in eval mode whatever ``train()`` is called with.
* Avalanche's samplers iterate datasets item by item; to give it its best case the stream is
  rebuilt from pre-transformed float tensors (same samples, same class order, same split).
"""

from __future__ import annotations

import re
import time
import warnings
from typing import Any

import torch
from torch import nn

from cl.data.benchmark import Benchmark


class FrozenExtractor(nn.Module):
    """A frozen backbone that stays in eval mode (no BN statistic updates, no dropout)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenExtractor":
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.backbone(x)


def float_scenario(bench: Benchmark, transform: Any, batch: int = 2048) -> Any:
    """The same class-incremental stream as ``bench``, over pre-transformed float images."""
    from avalanche.benchmarks import nc_benchmark
    from avalanche.benchmarks.utils import DataAttribute
    from avalanche.benchmarks.utils.classification_dataset import ClassificationDataset

    def dataset(x_uint8: torch.Tensor, y: torch.Tensor) -> Any:
        x = torch.cat([transform(x_uint8[i : i + batch]) for i in range(0, len(x_uint8), batch)])
        return ClassificationDataset(
            [torch.utils.data.TensorDataset(x, y)],
            data_attributes=[
                DataAttribute(y.tolist(), "targets"),
                DataAttribute([0] * len(y), "targets_task_labels", use_in_getitem=True),
            ],
        )

    sizes = [len(e.classes) for e in bench.experiences]
    return nc_benchmark(
        dataset(bench.source.x_train, bench.source.y_train),
        dataset(bench.source.x_test, bench.source.y_test),
        n_experiences=len(sizes),
        task_labels=False,
        fixed_class_order=bench.class_order,
        per_exp_classes={0: sizes[0]} if bench.config.base_classes is not None else None,
        class_ids_from_zero_from_first_exp=True,
    )


def accuracy_matrix_from_evaluator(metrics: dict[str, Any], n: int) -> list[float | None]:
    row: list[float | None] = [None] * n
    for key, value in metrics.items():
        m = re.match(r"Top1_Acc_Exp/eval_phase/test_stream/Task\d+/Exp(\d+)$", key)
        if m and int(m.group(1)) < n:
            row[int(m.group(1))] = float(value)
    return row


def run_avalanche(strategy: Any, scenario: Any) -> dict[str, Any]:
    """Train on each experience, evaluate on the experiences seen so far; time both."""
    n = len(scenario.train_stream)
    rows: list[list[float | None]] = []
    train_time = eval_time = 0.0
    for i, exp in enumerate(scenario.train_stream):
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # Avalanche's replay plugin warns on every call
            warnings.simplefilter("ignore")
            strategy.train(exp)
        t1 = time.perf_counter()
        metrics = strategy.eval(scenario.test_stream[: i + 1])
        eval_time += time.perf_counter() - t1
        train_time += t1 - t0
        rows.append(accuracy_matrix_from_evaluator(metrics, n))
    return {"acc_matrix": rows, "train_time_s": train_time, "eval_time_s": eval_time}


def quiet_evaluator() -> Any:
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    return EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
