"""ConFiT: staged schedule, per-task BN state, Xconv at evaluation, ablations, task inference, save/load."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from cl.config import ConfigError, parse_run_config
from cl.engine.loop import prepare, run
from cl.strategies.confit import stage_of
from tests.conftest import tiny_config

BACKBONE = {"name": "test_resnet", "trainable": "all", "weights": {"source": "pretrain", "pretrain": {"epochs": 2, "batch_size": 32}}}


def cfg(tmp: Path, cache: Path, scenario: str = "task_incremental", **strategy):
    return parse_run_config(tiny_config(tmp, cache_dir=str(cache), backbone=BACKBONE, benchmark={"scenario": scenario},
                                        strategy={"name": "confit", "lr": 0.05, **strategy}, train={"epochs": 5, "batch_size": 16}))


def train_task(s, exp, epochs: int = 5):
    s.before_experience(exp)
    for epoch in range(epochs):
        s.before_epoch(epoch)
        for x, y in exp.train.batches(16, torch.Generator().manual_seed(epoch)):
            s.observe(x, y, exp.task_id)
    s.after_experience(exp)


def test_stage_boundaries_follow_the_official_code():
    assert [stage_of(e, 10, [0.2, 0.5]) for e in range(10)] == [0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
    assert [stage_of(e, 5, [0.2, 0.5]) for e in range(5)] == [0, 1, 2, 2, 2]
    assert [stage_of(e, 4, [0.2, 0.5]) for e in range(4)] == [0, 0, 2, 2]  # the official loop, not [1, 1, 2, 2]
    assert [stage_of(e, 3, [0.2, 0.5]) for e in range(3)] == [0, 2, 2]
    assert [stage_of(e, 1, [0.2, 0.5]) for e in range(1)] == [0]  # classifier only, not everything


def test_which_parameters_train_at_each_epoch(tmp: Path, shared_cache: Path):
    prep = prepare(cfg(tmp, shared_cache))
    s, exp = prep.strategy, prep.bench.experiences[0]
    s.before_experience(exp)
    bn_params = {id(p) for bn in s.bns.values() for p in (bn.weight, bn.bias)}
    head = {id(p) for p in s.head.parameters()}
    expected = {0: head, 1: head | bn_params, 2: head | {id(p) for p in s.model.parameters()}}
    for epoch, stage in enumerate([0, 1, 2, 2, 2]):
        before = {n: p.detach().clone() for n, p in s.model.named_parameters()}
        s.before_epoch(epoch)
        optimised = {id(p) for g in s.optimizer.param_groups for p in g["params"]}
        assert optimised == expected[stage], epoch
        assert {id(p) for p in s.model.parameters() if p.requires_grad} == expected[stage] - head
        x, y = exp.train.x[:16], exp.train.y[:16]
        s.observe(x, y, 0)
        changed = {n for n, p in s.model.named_parameters() if not torch.equal(p, before[n])}
        allowed = {n for n, p in s.model.named_parameters() if id(p) in expected[stage]}
        assert changed <= allowed and (stage == 0 or changed), (epoch, changed - allowed)


def test_new_optimiser_per_stage_carries_no_momentum(tmp: Path, shared_cache: Path):
    prep = prepare(cfg(tmp, shared_cache, momentum=0.9))
    s, exp = prep.strategy, prep.bench.experiences[0]
    s.before_experience(exp)
    s.before_epoch(0)
    s.observe(exp.train.x[:16], exp.train.y[:16], 0)
    first = s.optimizer
    s.before_epoch(1)
    assert s.optimizer is not first and not s.optimizer.state  # fresh state
    s.before_epoch(1)
    assert s.optimizer is s.optimizer  # same stage: kept


@pytest.mark.parametrize("bn", ["per_task", "xconv", "xconv_spatial"])
def test_old_task_state_is_bit_identical_after_later_tasks(tmp: Path, shared_cache: Path, bn: str):
    prep = prepare(cfg(tmp, shared_cache, bn=bn))
    s, exps = prep.strategy, prep.bench.experiences
    train_task(s, exps[0])
    saved = {k: v.clone() for k, v in s.bank[0].items()}
    assert any(".input_tracker." in k for k in saved) and any(k.endswith("running_var") for k in saved)
    for exp in exps[1:]:
        train_task(s, exp)
    assert saved.keys() == s.bank[0].keys() and all(torch.equal(saved[k], s.bank[0][k]) for k in saved)


def test_task_state_loads_and_restores(tmp: Path, shared_cache: Path):
    prep = prepare(cfg(tmp, shared_cache, bn="xconv"))
    s, exps = prep.strategy, prep.bench.experiences
    train_task(s, exps[0])
    train_task(s, exps[1])
    bn_name, bn = next(iter(s.bns.items()))
    live = bn.running_var.clone()
    with s.task_state(0):
        assert torch.equal(bn.running_var, s.bank[0][f"{bn_name}.running_var"])  # task 0's variance
        pair = next(p for p in s.pairs if p.bn_name == bn_name)
        assert torch.allclose(bn.running_mean, s.recovered_means(0)[bn_name])  # Xconv-recovered mean
        assert not torch.equal(bn.running_mean, s.bank[0][f"{bn_name}.running_mean"]) and pair is not None
    assert torch.equal(bn.running_var, live)


@pytest.mark.parametrize("recover_current", [False, True])
def test_the_task_just_trained_keeps_its_stored_statistics(tmp: Path, shared_cache: Path, recover_current: bool):
    prep = prepare(cfg(tmp, shared_cache, bn="xconv", recover_current=recover_current))
    s, exps = prep.strategy, prep.bench.experiences
    train_task(s, exps[0])
    train_task(s, exps[1])
    bn_name, bn = next(iter(s.bns.items()))
    with s.task_state(1):  # the task just trained: its own stored mean (official), unless asked otherwise
        stored = torch.equal(bn.running_mean, s.bank[1][f"{bn_name}.running_mean"])
        recovered = torch.allclose(bn.running_mean, s.recovered_means(1)[bn_name])
    assert (stored, recovered) == ((False, True) if recover_current else (True, recovered))
    with s.task_state(0):  # older tasks are always corrected
        assert torch.allclose(bn.running_mean, s.recovered_means(0)[bn_name])


def test_frozen_bn_keeps_pretrained_statistics(tmp: Path, shared_cache: Path):
    prep = prepare(cfg(tmp, shared_cache, bn="frozen"))
    s = prep.strategy
    stats = {n: b.running_mean.clone() for n, b in s.bns.items()}
    train_task(s, prep.bench.experiences[0])
    assert all(torch.equal(b.running_mean, stats[n]) for n, b in s.bns.items())
    assert not s.bank[0]  # nothing stored per task


def test_save_load_round_trip_of_per_task_state(tmp: Path, shared_cache: Path):
    config = cfg(tmp, shared_cache, scenario="class_incremental", bn="xconv")
    prep = prepare(config)
    s, exps = prep.strategy, prep.bench.experiences
    for exp in exps[:2]:
        train_task(s, exp)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    fresh = prepare(config).strategy
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    x = exps[0].test.x[:8]
    for task in (0, 1, None):
        assert torch.equal(fresh.predict(x, task), s.predict(x, task)), task
    assert torch.equal(fresh.infer_task(x), s.infer_task(x))


def test_two_task_run_and_class_incremental_task_inference(tmp: Path, shared_cache: Path):
    config = tiny_config(tmp, cache_dir=str(shared_cache), backbone=BACKBONE, strategy={"name": "confit", "lr": 0.05},
                         benchmark={"n_experiences": 2, "base_classes": 3}, train={"epochs": 5, "batch_size": 16})
    m = run(parse_run_config(config))
    assert len(m["acc_matrix"]) == 2
    assert m["task_inference_matrix"] is not None and 0 <= m["task_inference_acc"] <= 1
    assert m["stored_bytes_per_task"][1] > 0  # the second task's BN state and tracker means
    per_task = m["stored_bytes_per_task"][1]
    assert per_task < m["stored_bytes_per_task"][0] / 5  # far smaller than the fine-tuned backbone


def test_max_softmax_task_inference(tmp: Path, shared_cache: Path):
    prep = prepare(cfg(tmp, shared_cache, scenario="class_incremental", task_inference="max_softmax"))
    s, exps = prep.strategy, prep.bench.experiences
    for exp in exps[:2]:
        train_task(s, exp)
    tasks = s.infer_task(exps[1].test.x)
    assert set(tasks.tolist()) <= {0, 1} and len(tasks) == len(exps[1].test)


def test_confit_requires_a_fully_trainable_batchnorm_backbone(tmp: Path):
    with pytest.raises(ConfigError, match="confit fine-tunes the whole backbone"):
        parse_run_config(tiny_config(tmp, strategy={"name": "confit"}))


def test_probes_of_the_task_just_trained_save_as_separate_tensors(tmp: Path, shared_cache: Path):
    from safetensors.torch import save_file

    prep = prepare(cfg(tmp, shared_cache, bn="xconv"))
    s, exps = prep.strategy, prep.bench.experiences
    train_task(s, exps[0])
    x = exps[0].test.x[:4]
    out = s.probe(x, x, 0)  # task 0 is the task just trained: every variant uses its stored mean
    name = next(iter(s.bns))
    assert torch.equal(out[f"bn_running_xconv/{name}"], out[f"bn_running_per_task/{name}"])
    save_file({k: v.contiguous() for k, v in out.items()}, str(tmp / "probe.safetensors"))  # shared storage would be refused
