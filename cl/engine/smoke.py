"""Smoke rehearsal: any config with its real architecture and input size, on a few samples.

``cl run --smoke`` / ``cl sweep --smoke`` rewrite a validated config so that it runs end to end on
CPU in seconds to minutes and writes a complete run directory, to check that a config (a GPU-scale
one included) has not rotted before paying for it. What changes, and only that:

* ``smoke: true`` (recorded in the resolved config and metrics; a smoke run can never be taken for,
  or mixed with, a real one) and ``out_dir`` → ``<out_dir>/smoke``;
* data: at most :data:`TRAIN_PER_CLASS` training samples per class (one per domain and class in a
  domain-incremental stream; more if a validation split needs them) and :data:`TEST_PER_CLASS` test
  sample per class; online, anytime evaluation every 16 samples;
* training: one epoch, at most :data:`MAX_STEPS` optimiser steps per experience, batches of at most
  :data:`BATCH` (strategies that train themselves, Avalanche's, take the epoch whole); tasks not
  trained yet are not evaluated (no forward transfer); pretraining one epoch, and so does a ToCom compensator's distillation; replay memories
  clamped to half the training samples; shift probes one sample per class.

Backbone, input size, strategy, scenario and the number of experiences stay as written. Weights stay
too: a config that loads hub weights needs them in the local cache (or ``--set
backbone.weights.source=none`` to rehearse with random weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cl.config import RunConfig, deep_merge, parse_run_config

TRAIN_PER_CLASS = 4
TEST_PER_CLASS = 1
MAX_STEPS = 2
BATCH = 8


def smoke_data(data: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
    """The raw config ``data`` (validated as ``cfg``) rewritten for a smoke run."""
    bench = cfg.benchmark
    val = bench.validation
    # domain-incremental data are subsampled per (domain, class): one each is already every class per experience
    per_class = 1 if bench.scenario == "domain_incremental" else TRAIN_PER_CLASS
    train_per_class = per_class + (val.per_class if val is not None and val.per_class else 0)
    n_train = bench.dataset.num_classes() * train_per_class
    update: dict[str, Any] = {
        "smoke": True,
        "out_dir": _smoke_dir(cfg.out_dir),
        "benchmark": {
            "train_per_class": min(bench.train_per_class or train_per_class, train_per_class),
            "test_per_class": TEST_PER_CLASS,
            "online": {"eval_every": min(bench.online.eval_every, 16), "batch_size": min(bench.online.batch_size, BATCH)},
        },
        "train": {
            "epochs": 1,
            "max_steps": MAX_STEPS,
            "batch_size": min(cfg.train.batch_size, BATCH),
            "eval_batch_size": min(cfg.train.eval_batch_size, 64),
            "eval_future_tasks": False,
        },
        "shift": {"per_class": 1},
    }
    pretrain = cfg.backbone.weights.pretrain
    if pretrain is not None:
        small = {"epochs": 1, "batch_size": min(pretrain.batch_size, 32)}
        if pretrain.benchmark is not None:  # a source benchmark: as few samples as the stream
            small["benchmark"] = {"train_per_class": min(pretrain.benchmark.train_per_class or train_per_class, train_per_class),
                                  "test_per_class": TEST_PER_CLASS}
        update["backbone"] = {"weights": {"pretrain": small}}
    tome = cfg.backbone.tome
    if tome is not None and tome.compensator is not None and tome.compensator.path is None:  # its distillation: one short epoch
        update.setdefault("backbone", {})["tome"] = {"compensator": {"epochs": 1, "batch_size": min(tome.compensator.batch_size, BATCH)}}
    memory = getattr(cfg.strategy, "memory_size", None)
    if memory is not None:
        update["strategy"] = {"memory_size": max(1, min(memory, n_train // 2))}
    return deep_merge(data, update)


def _smoke_dir(out_dir: str) -> str:
    path = Path(out_dir)
    return str(path if path.name == "smoke" else path / "smoke")


def smoke_config(data: dict[str, Any], cfg: RunConfig) -> tuple[dict[str, Any], RunConfig]:
    """(raw, validated) smoke version of a config."""
    new = smoke_data(data, cfg)
    return new, parse_run_config(new)
