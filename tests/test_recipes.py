"""Training recipes: learning-rate schedules with warm-up and gradient clipping, applied in every
strategy's optimiser step; defaults leave runs (and their identities) as they were."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cl.config import ConfigError, TrainConfig, parse_run_config
from cl.engine.loop import prepare, run
from cl.engine.rundir import result_config
from tests.conftest import tiny_config


def test_lr_factor_by_hand():
    cos = TrainConfig(lr_schedule="cosine", warmup_steps=4)
    assert cos.lr_factor(0, 10, 0) == pytest.approx(0.25 * 1.0)  # warm-up 1/4, cosine at 0
    assert cos.lr_factor(3, 10, 0) == pytest.approx(1.0 * 0.5 * (1 + math.cos(math.pi * 3 / 10)))
    assert cos.lr_factor(5, 10, 0) == pytest.approx(0.5)
    assert cos.lr_factor(10, 10, 0) == pytest.approx(0.0, abs=1e-12)
    step = TrainConfig(lr_schedule="step", lr_milestones=[1, 3], lr_gamma=0.1)
    assert [step.lr_factor(0, 9, e) for e in range(5)] == pytest.approx([1, 0.1, 0.1, 0.01, 0.01])
    assert TrainConfig().lr_factor(7, 9, 2) == 1.0 and not TrainConfig().scheduled
    assert TrainConfig(warmup_steps=2).lr_factor(0, 9, 0) == 0.5 and TrainConfig(warmup_steps=2).lr_factor(5, 9, 0) == 1.0


def _prep(tmp: Path, shared_cache: Path, **train):
    strategy = {"name": "finetune", "lr": 0.1, "momentum": 0.0}
    return prepare(parse_run_config(tiny_config(tmp, cache_dir=str(shared_cache), strategy=strategy, train={"epochs": 1, "batch_size": 16, **train})))


def test_the_schedule_sets_every_groups_rate_at_each_step(tmp: Path, shared_cache: Path):
    prep = _prep(tmp, shared_cache, lr_schedule="cosine", warmup_steps=2)
    s, exp = prep.strategy, prep.bench.experiences[0]
    s.before_experience(exp)
    x, y = next(exp.train.batches(16, torch.Generator().manual_seed(0)))
    seen = []
    for k in range(4):
        s.lr_position = (k, 4, 0)
        s.observe(x, y, exp.task_id)
        seen.append([g["lr"] for g in s.optimizer.param_groups][0])
    want = [0.1 * prep.cfg.train.lr_factor(k, 4, 0) for k in range(4)]
    assert seen == pytest.approx(want) and want[0] == pytest.approx(0.05) and want[1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_clipping_bounds_the_update(tmp: Path, shared_cache: Path):
    prep = _prep(tmp, shared_cache, grad_clip_norm=1e-3)
    s, exp = prep.strategy, prep.bench.experiences[0]
    s.before_experience(exp)
    params = [p for g in s.optimizer.param_groups for p in g["params"]] if s.optimizer else []
    x, y = next(exp.train.batches(16, torch.Generator().manual_seed(0)))
    s.observe(x, y, exp.task_id)  # creates the optimiser if the strategy does so lazily
    params = [p for g in s.optimizer.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    s.observe(x, y, exp.task_id)
    step = math.sqrt(sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(params, before)))
    assert 0 < step <= 0.1 * 1e-3 * (1 + 1e-4)  # SGD without momentum: |update| = lr x |clipped gradient|


def test_defaults_keep_the_run_identity_and_other_values_change_it(tmp: Path, shared_cache: Path):
    base = tiny_config(tmp, cache_dir=str(shared_cache))
    plain = result_config(parse_run_config(base))
    assert "lr_schedule" not in plain["train"] and "grad_clip_norm" not in plain["train"]
    cosine = result_config(parse_run_config({**base, "train": {**base.get("train", {}), "lr_schedule": "cosine"}}))
    assert cosine["train"]["lr_schedule"] == "cosine"


def test_a_scheduled_run_end_to_end_differs_and_is_finite(tmp: Path, shared_cache: Path):
    data = tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "finetune", "lr": 0.05},
                       train={"epochs": 2, "batch_size": 16, "lr_schedule": "step", "lr_milestones": [1], "warmup_steps": 3, "grad_clip_norm": 5.0})
    metrics = run(parse_run_config(data))
    assert 0.0 <= metrics["final_acc"] <= 1.0


@pytest.mark.parametrize("train, strategy, message", [
    ({"lr_milestones": [2]}, {"name": "er"}, "only used by lr_schedule: step"),
    ({"lr_schedule": "cosine"}, {"name": "avalanche", "method": "replay"}, "runs its own training loop"),
    ({"grad_clip_norm": 1.0}, {"name": "avalanche", "method": "replay"}, "runs its own training loop"),
])
def test_settings_a_strategy_would_ignore_are_refused(tmp: Path, train: dict, strategy: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        parse_run_config(tiny_config(tmp, strategy=strategy, train=train))
