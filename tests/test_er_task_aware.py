"""Task-aware ER: the rebalancing weight, detached old rows, the replay loss's effect."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cl.config import parse_run_config
from cl.engine.loop import prepare, run
from cl.strategies.er_task_aware import TaskHeads, rebalance_weight
from tests.conftest import tiny_config


@pytest.mark.parametrize(
    "kind, expected",
    [("none", 1.0), ("old_tasks", 2.0), ("class_ratio", 4 / 2), ("memory_ratio", 3000 / 200), ("constant", 0.3)],
)
def test_rebalance_weight_by_hand(kind: str, expected: float):
    # third task (index 2), 4 old classes, 2 current, 3000 old training samples, memory 200
    assert rebalance_weight(kind, 2, 4, 2, 3000, 200, value=0.3) == pytest.approx(expected)


def test_rebalance_weight_first_task_and_errors():
    assert all(rebalance_weight(k, 0, 0, 2, 0, 200) == 0.0 for k in ("none", "old_tasks", "class_ratio", "memory_ratio"))
    assert rebalance_weight("memory_ratio", 1, 2, 2, 100, 0) == 0.0
    with pytest.raises(ValueError, match="unknown rebalance"):
        rebalance_weight("bogus", 1, 2, 2, 100, 10)


def test_task_heads_detach_old_blocks():
    heads = TaskHeads(3)
    heads.add_task(2, torch.device("cpu"))
    heads.add_task(2, torch.device("cpu"))
    f = torch.randn(5, 3, requires_grad=True)
    heads(f, trainable_from=1).sum().backward()
    assert heads.weights[0].grad is None and heads.weights[1].grad is not None
    assert f.grad is not None  # features still get the gradient (a partially tuned backbone learns)


def make(tmp: Path, cache: Path, **strategy):
    cfg = parse_run_config(tiny_config(tmp, cache_dir=str(cache), strategy={"name": "er_task_aware", "memory_size": 12,
                                                                             "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, **strategy}))
    return prepare(cfg)


def train(prep, experiences):
    s = prep.strategy
    for exp in experiences:
        s.before_experience(exp)
        for _ in range(3):
            for x, y in exp.train.batches(8, torch.Generator().manual_seed(0)):
                s.observe(x, y, exp.task_id)
        s.after_experience(exp)


def test_old_rows_are_bit_identical_after_training_new_tasks(tmp: Path, shared_cache: Path):
    """With momentum and weight decay: old rows must not even be in the optimiser."""
    prep = make(tmp, shared_cache)
    exps = prep.bench.experiences
    train(prep, exps[:1])
    s = prep.strategy
    w0, b0 = s.heads.weights[0].detach().clone(), s.heads.biases[0].detach().clone()
    train(prep, exps[1:])
    assert torch.equal(s.heads.weights[0], w0) and torch.equal(s.heads.biases[0], b0)
    assert s.weight == pytest.approx(4 / 2)  # class_ratio at the third task
    optimised = {id(p) for g in s.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(s.heads.weights[2]), id(s.heads.biases[2])}


def test_without_detach_old_rows_move(tmp: Path, shared_cache: Path):
    prep = make(tmp, shared_cache, detach=False)
    exps = prep.bench.experiences
    train(prep, exps[:1])
    w0 = prep.strategy.heads.weights[0].detach().clone()
    train(prep, exps[1:2])
    assert not torch.equal(prep.strategy.heads.weights[0], w0)


def test_replay_loss_only_pushes_current_rows_down_on_old_samples(tmp: Path, shared_cache: Path):
    """With old rows detached, the replay term's gradient on the current rows lowers their logits on memory samples."""
    prep = make(tmp, shared_cache, rebalance="constant", rebalance_value=1.0)
    exps = prep.bench.experiences
    train(prep, exps[:1])
    s = prep.strategy
    s.before_experience(exps[1])
    mx, my, _ = s.memory.sample(12)
    logits = s.heads(s.encode(mx), trainable_from=1)
    loss = torch.nn.functional.cross_entropy(logits, my)
    grads = torch.autograd.grad(loss, [s.heads.weights[1], s.heads.biases[1]])
    # d loss / d b_c = mean softmax_c > 0 for a class that is never the label: descent lowers it
    assert (grads[1] > 0).all()


def test_resume_restores_task_heads(tmp: Path, shared_cache: Path):
    base = tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "er_task_aware", "memory_size": 12})
    full = run(parse_run_config({**base, "out_dir": str(tmp / "a")}))
    cfg = parse_run_config({**base, "out_dir": str(tmp / "b")})
    run(cfg, stop_after=2)
    assert run(cfg, resume=True)["acc_matrix"] == full["acc_matrix"]


@pytest.mark.parametrize("replay_from, current_in_replay", [("old_tasks", False), ("all", True)])
def test_online_replay_holds_old_tasks_only_by_default(tmp: Path, shared_cache: Path, replay_from: str, current_in_replay: bool):
    cfg = parse_run_config(tiny_config(tmp, cache_dir=str(shared_cache), train={"epochs": 1}, benchmark={"scenario": "online"},
                                       strategy={"name": "er_task_aware", "memory_size": 40, "replay_from": replay_from}))
    prep = prepare(cfg)
    s, exps = prep.strategy, prep.bench.experiences
    replayed = []
    real = s._memory.sample
    s._memory.sample = lambda n, before_task=None: (lambda out: (replayed.append(out[2]), out)[1])(real(n, before_task))
    for exp in exps[:2]:
        s.before_experience(exp)
        for start in range(0, len(exp.train), 8):
            s.observe(exp.train.x[start : start + 8], exp.train.y[start : start + 8], exp.task_id)
        s.after_experience(exp)
    tasks = torch.cat(replayed)
    assert len(tasks) and (tasks == 0).any()  # task 1's steps replayed task 0 ...
    assert bool((tasks == 1).any()) == current_in_replay  # ... and, by default, never the task being learnt
