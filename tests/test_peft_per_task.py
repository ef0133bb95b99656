"""PEFT-per-task on a tiny ViT: task isolation, routing, task inference, merged evaluation, storage, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cl.config import ConfigError, parse_run_config
from cl.engine.loop import prepare, run
from cl.peft import bank
from tests.conftest import tiny_config

VIT = {
    "name": "vit_tiny_patch16_224",
    "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
    "weights": {"source": "pretrain", "pretrain": {"epochs": 2, "batch_size": 32}},
}


def cfg(tmp: Path, cache: Path, scenario: str = "class_incremental", **strategy):
    return parse_run_config(tiny_config(
        tmp, cache_dir=str(cache), backbone=VIT, benchmark={"scenario": scenario},
        strategy={"name": "peft_per_task", "lr": 0.01, **strategy}, train={"epochs": 2, "batch_size": 16}))


def train_task(s, exp, epochs: int = 2):
    s.before_experience(exp)
    for epoch in range(epochs):
        for x, y in exp.train.batches(16, torch.Generator().manual_seed(epoch)):
            s.observe(x, y, exp.task_id)
    s.after_experience(exp)


@pytest.mark.parametrize("peft", [{"name": "lora", "rank": 2}, {"name": "adapter", "bottleneck": 4}, {"name": "vpt", "tokens": 2}])
def test_earlier_modules_and_heads_are_bit_identical_after_later_tasks(tmp: Path, shared_cache: Path, peft: dict):
    prep = prepare(cfg(tmp, shared_cache, peft=peft))
    s, exps = prep.strategy, prep.bench.experiences
    backbone = {k: v.clone() for k, v in s.model.state_dict().items()}
    train_task(s, exps[0])
    first = {k: v.clone() for k, v in s.modules[0].state_dict().items()}
    head = {k: v.clone() for k, v in s.heads["0"].state_dict().items()}
    x = exps[0].test.x[:8]
    before = s.predict(x, 0)
    train_task(s, exps[1])
    assert set(s.modules) == {0, 1} and s.modules[0] is not s.modules[1]
    assert all(torch.equal(v, s.modules[0].state_dict()[k]) for k, v in first.items())
    assert all(torch.equal(v, s.heads["0"].state_dict()[k]) for k, v in head.items())
    assert all(torch.equal(v, s.model.state_dict()[k]) for k, v in backbone.items())  # the backbone never moves
    assert torch.equal(s.predict(x, 0), before)
    assert not any(torch.equal(v, s.modules[1].state_dict()[k]) for k, v in first.items() if v.numel() > 1)


def test_task_routing_and_class_incremental_inference(tmp: Path, shared_cache: Path):
    prep = prepare(cfg(tmp, shared_cache, peft={"name": "lora", "rank": 2}))
    s, exps = prep.strategy, prep.bench.experiences
    for exp in exps[:2]:
        train_task(s, exp)
    x = exps[1].test.x[:8]
    routed = s.predict(x, 1)
    lo, hi = exps[1].class_range
    assert torch.isfinite(routed[:, lo:hi]).all() and torch.isinf(routed[:, :lo]).all() and torch.isinf(routed[:, hi:]).all()
    inferred = s.infer_task(x)
    assert set(inferred.tolist()) <= {0, 1}
    scores = s.predict(x, None)
    for row, t in zip(scores, inferred.tolist()):  # each sample is scored by its inferred task only
        tlo, thi = exps[t].class_range
        assert torch.isfinite(row[tlo:thi]).all() and torch.isinf(row[:tlo]).all() and torch.isinf(row[thi:]).all()


def test_max_score_inference_uses_calibrated_heads(tmp: Path, shared_cache: Path):
    prep = prepare(cfg(tmp, shared_cache, peft={"name": "lora", "rank": 2}, task_inference="max_score"))
    s, exps = prep.strategy, prep.bench.experiences
    for exp in exps[:2]:
        train_task(s, exp)
    x = torch.cat([exps[0].test.x[:6], exps[1].test.x[:6]])
    z = torch.stack([(s._task_logits(x, t).max(1).values - s.calibration[t][0]) / s.calibration[t][1] for t in (0, 1)], 1)
    assert torch.equal(s.infer_task(x), z.argmax(1))


def test_merged_evaluation_equals_hooked(tmp: Path, shared_cache: Path):
    plain = prepare(cfg(tmp, shared_cache, peft={"name": "lora", "rank": 2}))
    merged = prepare(cfg(tmp, shared_cache, peft={"name": "lora", "rank": 2}, merge_eval=True))
    for prep in (plain, merged):
        torch.manual_seed(0)
        train_task(prep.strategy, prep.bench.experiences[0])
    x = plain.bench.experiences[0].test.x[:8]
    torch.testing.assert_close(merged.strategy.predict(x, 0), plain.strategy.predict(x, 0), rtol=0, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(merged.strategy.model.state_dict().values(), plain.strategy.model.state_dict().values()))


def test_first_session_variant_trains_one_module(tmp: Path, shared_cache: Path):
    prep = prepare(cfg(tmp, shared_cache, peft={"name": "adapter", "bottleneck": 4}, share="first_session"))
    s, exps = prep.strategy, prep.bench.experiences
    train_task(s, exps[0])
    first = {k: v.clone() for k, v in s.modules[0].state_dict().items()}
    train_task(s, exps[1])
    assert set(s.modules) == {0}
    assert all(torch.equal(v, s.modules[0].state_dict()[k]) for k, v in first.items())


def test_state_dict_round_trip(tmp: Path, shared_cache: Path):
    a = prepare(cfg(tmp, shared_cache, peft={"name": "adapter", "bottleneck": 4, "bits": 1}))
    for exp in a.bench.experiences[:2]:
        train_task(a.strategy, exp)
    b = prepare(cfg(tmp, shared_cache, peft={"name": "adapter", "bottleneck": 4, "bits": 1}))
    b.strategy.load_state_dict(a.strategy.state_dict())
    x = a.bench.experiences[1].test.x[:8]
    assert torch.equal(b.strategy.predict(x, None), a.strategy.predict(x, None))
    assert b.strategy.storage_bytes() == a.strategy.storage_bytes()


def test_end_to_end_run_writes_bank_and_task_inference(tmp: Path, shared_cache: Path):
    m = run(cfg(tmp, shared_cache, peft={"name": "lora", "rank": 2}))
    assert m is not None
    assert m["task_inference_acc"] is not None and len(m["task_inference_matrix"]) == 3
    assert all(b > 0 for b in m["stored_bytes_per_task"])
    run_dir = Path(tmp / "runs" / "tiny" / "peft_per_task" / "seed0")
    files = sorted(p.name for p in (run_dir / "peft_bank").iterdir())
    assert files == ["task0.safetensors", "task1.safetensors", "task2.safetensors"]
    tensors, config = bank.load(run_dir / "peft_bank" / "task1.safetensors")
    assert config["name"] == "lora" and config["task"] == 1 and "head.weight" in tensors
    assert json.loads((run_dir / "metrics.json").read_text())["task_aware"]["final_avg_acc"] is not None


def test_bad_peft_configs_are_one_line_errors(tmp: Path, shared_cache: Path):
    with pytest.raises(ConfigError, match="unknown peft method 'loraa'"):
        cfg(tmp, shared_cache, peft={"name": "loraa"})
    with pytest.raises(ConfigError, match="unknown key 'strategy.peft.rnk'"):
        cfg(tmp, shared_cache, peft={"name": "lora", "rnk": 2})
    with pytest.raises(ConfigError, match="strategy.merge_eval: 'vpt' is not mergeable"):
        cfg(tmp, shared_cache, peft={"name": "vpt"}, merge_eval=True)
    with pytest.raises(ConfigError, match="backbone.trainable: peft_per_task trains modules on a frozen backbone"):
        parse_run_config(tiny_config(tmp, backbone={**VIT, "trainable": "all"}, strategy={"name": "peft_per_task"}))


def test_aper_adapts_once_then_only_adds_prototypes(tmp: Path, shared_cache: Path):
    config = tiny_config(tmp, cache_dir=str(shared_cache), backbone=VIT, strategy={"name": "aper", "lr": 0.01, "peft": {"name": "adapter", "bottleneck": 4}},
                         train={"epochs": 2, "batch_size": 16})
    prep = prepare(parse_run_config(config))
    s, exps = prep.strategy, prep.bench.experiences
    init = {k: v.clone() for k, v in s.module.state_dict().items()}
    train_task(s, exps[0])
    adapted = {k: v.clone() for k, v in s.module.state_dict().items()}
    assert any(not torch.equal(init[k], v) for k, v in adapted.items())
    train_task(s, exps[1])
    assert all(torch.equal(adapted[k], v) for k, v in s.module.state_dict().items())
    lo, hi = exps[1].class_range
    x = exps[1].train.x
    feats = s.embed(x)
    assert feats.shape[1] == 2 * prep.strategy.ctx.feature_dim  # [pretrained, adapted]
    for c in range(lo, hi):
        torch.testing.assert_close(s.sums[c] / s.counts[c], feats[exps[1].train.y == c].double().mean(0), rtol=1e-5, atol=1e-5)
    scores = s.predict(exps[0].test.x[:4], None)
    assert torch.isfinite(scores[:, :hi]).all() and torch.isinf(scores[:, hi:]).all()


def test_l2p_selects_prompts_by_key_and_trains_only_its_pool(tmp: Path, shared_cache: Path):
    config = tiny_config(tmp, cache_dir=str(shared_cache), backbone=VIT, strategy={"name": "l2p", "lr": 0.01, "pool_size": 4, "length": 2, "top_k": 2},
                         train={"epochs": 1, "batch_size": 16})
    prep = prepare(parse_run_config(config))
    s, exps = prep.strategy, prep.bench.experiences
    backbone = {k: v.clone() for k, v in s.model.state_dict().items()}
    x = exps[0].train.x[:8]
    with torch.no_grad():
        query = s.model(s.ctx.backbone.transform(x, s.device))
    _, q, keys = s.forward(x)
    torch.testing.assert_close(q, query)
    sims = torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(s.pool["key"], dim=1).T
    expected = s.pool["key"][sims.topk(2, dim=1).indices]
    assert torch.equal(keys, expected)
    before = {k: v.clone() for k, v in s.pool.items()}
    train_task(s, exps[0], epochs=1)
    assert all(torch.equal(v, s.model.state_dict()[k]) for k, v in backbone.items())
    assert any(not torch.equal(before[k], v) for k, v in s.pool.items())
    scores = s.predict(exps[0].test.x[:4], None)
    hi = exps[0].class_range[1]
    assert torch.isfinite(scores[:, :hi]).all() and torch.isinf(scores[:, hi:]).all()
    assert s.model.forward_features(s.ctx.backbone.transform(x, s.device)).shape[1] == 1 + 16  # no prompts outside forward


def test_l2p_refuses_a_convnet(tmp: Path, shared_cache: Path):
    with pytest.raises(ConfigError, match="'l2p' needs a timm ViT"):
        prepare(parse_run_config(tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "l2p"})))


def test_evaluation_takes_task_inference_and_scores_from_one_inference(tmp: Path, shared_cache: Path, monkeypatch):
    from cl.engine.evaluate import evaluate

    prep = prepare(cfg(tmp, shared_cache, peft={"name": "lora", "rank": 2}))
    s, exps = prep.strategy, prep.bench.experiences
    for exp in exps[:2]:
        train_task(s, exp)
    expected = [float((s.infer_task(e.test.x) == j).float().mean()) for j, e in enumerate(exps[:2])]
    calls = []
    infer = s.infer_task
    monkeypatch.setattr(s, "infer_task", lambda x: calls.append(len(x)) or infer(x))
    row = evaluate(s, exps, trained=2, batch_size=64, future=False)
    assert row.task_inference[:2] == pytest.approx(expected) and row.task_inference[2] is None
    assert sum(calls) == sum(len(e.test) for e in exps[:2])  # each test sample inferred once


@pytest.mark.parametrize("inference", ["prototype", "max_score"])
def test_storage_counts_what_task_inference_keeps(tmp: Path, shared_cache: Path, inference: str):
    prep = prepare(cfg(tmp, shared_cache, peft={"name": "lora", "rank": 2}, task_inference=inference))
    s, exps = prep.strategy, prep.bench.experiences
    for exp in exps[:2]:
        train_task(s, exp)
    heads = sum(p.numel() * 4 for p in s.heads.parameters())
    modules = sum(bank.packed_nbytes(p) for p in s.packed.values())
    kept = 4 * s.ctx.feature_dim * 4 if inference == "prototype" else 2 * 2 * 4  # 4 class means / 2 (mean, std)
    assert s.storage_bytes() == heads + modules + kept
