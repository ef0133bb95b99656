"""Generative classifier: the Multi-Similarity loss by hand, NCM/KDE scores, memory re-embedding."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cl.config import parse_run_config
from cl.engine.evaluate import evaluate
from cl.engine.loop import prepare
from cl.strategies.generative_classifier import kde_scores, ncm_scores
from cl.strategies.losses import multi_similarity_loss, proxy_softmax_loss
from tests.conftest import tiny_config


def test_multi_similarity_loss_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
    y = torch.tensor([0, 0, 1, 1])
    # S01=.8 S02=0 S03=.6 S12=.6 S13=.96 S23=.8. Anchors 0 and 2: no negative within the margin of
    # their hardest positive -> skipped. Anchors 1 and 3: positive S=.8 kept, negative S=.96 kept.
    loss, anchors = multi_similarity_loss(z, y, alpha=2.0, beta=40.0, lam=0.5, margin=0.1)
    per_anchor = 0.5 * math.log(1 + math.exp(-2 * 0.3)) + (1 / 40) * math.log(1 + math.exp(40 * 0.46))
    assert anchors == 2
    assert float(loss) == pytest.approx(2 * per_anchor / 4, rel=1e-6)


def test_multi_similarity_mining_edge_cases():
    z = torch.randn(6, 4, requires_grad=True)
    loss, anchors = multi_similarity_loss(z, torch.arange(6))  # no positives at all
    assert anchors == 0 and loss.item() == 0.0
    loss.backward()  # still part of the graph
    loss, anchors = multi_similarity_loss(z, torch.zeros(6, dtype=torch.long))  # no negatives
    assert anchors == 0 and loss.item() == 0.0
    # an exact duplicate of the anchor is a positive (excluded by index, not by similarity)
    # anchors 0 and 1 (duplicates): positive S=1 kept (1 - .1 < .95), negative S=.95 kept (.95 + .1 > 1);
    # anchor 2 has no positive
    dup = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.95, math.sqrt(1 - 0.95**2)]])
    _, anchors = multi_similarity_loss(dup, torch.tensor([0, 0, 1]), margin=0.1)
    assert anchors == 2


def test_multi_similarity_gradient_pulls_positives_together():
    z = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]], requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])
    loss, _ = multi_similarity_loss(z, y)
    loss.backward()
    with torch.no_grad():
        moved = torch.nn.functional.normalize(z - 0.1 * z.grad, dim=1)
    assert float(moved[1] @ moved[3]) < 0.96  # the kept negative pair is pushed apart


def test_proxy_softmax_only_competes_over_allowed_classes():
    z = torch.tensor([[1.0, 0.0]])
    proxies = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    allowed = torch.tensor([True, True, False])
    expected = -torch.log_softmax(torch.tensor([2.0, 0.0]), 0)[0]  # scale 2, cos 1 and 0
    assert float(proxy_softmax_loss(z, torch.tensor([0]), proxies, allowed, 2.0)) == pytest.approx(float(expected))


def test_ncm_and_kde_scores_by_hand():
    mem_z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    mem_y = torch.tensor([0, 0, 1])
    q = torch.tensor([[1.0, 0.0]])
    ncm = ncm_scores(q, mem_z, mem_y, 3)
    assert ncm[0, 0] == pytest.approx(1 / math.sqrt(2)) and ncm[0, 1] == pytest.approx(-1.0) and ncm[0, 2] == float("-inf")
    kde = kde_scores(q, mem_z, mem_y, 3, temperature=2.0)
    assert kde[0, 0] == pytest.approx(math.log((math.exp(2.0) + 1.0) / 2)) and kde[0, 1] == pytest.approx(-2.0)
    assert kde[0, 2] == float("-inf")


@pytest.mark.parametrize("classifier", ["ncm", "kde"])
def test_memory_is_re_embedded_once_per_evaluation(tmp: Path, shared_cache: Path, classifier: str):
    cfg = parse_run_config(tiny_config(tmp, cache_dir=str(shared_cache), train={"epochs": 1, "eval_batch_size": 7},
                                       benchmark={"scenario": "online"},
                                       strategy={"name": "generative_classifier", "memory_size": 30, "classifier": classifier}))
    prep = prepare(cfg)
    s, exps = prep.strategy, prep.bench.experiences
    for exp in exps:
        s.before_experience(exp)
        for x, y in exp.train.batches(10):
            terms = s.observe(x, y, exp.task_id)
            assert math.isfinite(terms["loss"])
    before = s.memory_encodings
    cil = evaluate(s, exps, trained=3, batch_size=7, future=False).cil  # 20 test samples per task -> 9 predict calls
    assert s.memory_encodings == before + 1
    assert all(a is not None for a in cil)
    s.observe(exps[0].train.x[:10], exps[0].train.y[:10], 0)  # any update invalidates the cache
    evaluate(s, exps, trained=3, batch_size=7, future=False)
    assert s.memory_encodings == before + 2


def test_generative_classifier_has_no_softmax_head_at_inference(tmp: Path, shared_cache: Path):
    cfg = parse_run_config(tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "generative_classifier", "memory_size": 30, "gamma": 0.0}))
    prep = prepare(cfg)
    s = prep.strategy
    assert not any(p is s.proxies for p in s.trainable_parameters())  # gamma 0: proxies unused
    exp = prep.bench.experiences[0]
    s.before_experience(exp)
    s.observe(exp.train.x[:10], exp.train.y[:10], 0)
    scores = s.predict(exp.test.x[:4], None)
    seen = set(s.memory.y.tolist())
    assert all(torch.isinf(scores[:, c]).all() for c in range(6) if c not in seen)  # no memory sample, no score


def test_gamma_defaults_to_the_metric_loss_alone_and_a_positive_gamma_trains_the_proxies(tmp: Path, shared_cache: Path):
    plain = prepare(parse_run_config(tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "generative_classifier", "memory_size": 30})))
    assert plain.strategy.cfg.gamma == 0.0 and not any(p is plain.strategy.proxies for p in plain.strategy.trainable_parameters())
    prep = prepare(parse_run_config(tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "generative_classifier", "memory_size": 30, "gamma": 1.0})))
    s = prep.strategy
    assert any(p is s.proxies for p in s.trainable_parameters())
    exp = prep.bench.experiences[0]
    s.before_experience(exp)
    before = s.proxies.detach().clone()
    pick = torch.cat([torch.nonzero(exp.train.y == c)[:5, 0] for c in exp.classes[:2]])  # a softmax over one class has no gradient
    s.observe(exp.train.x[pick], exp.train.y[pick], 0)
    moved = (s.proxies.detach() - before).abs().sum(dim=1) > 0
    assert moved.tolist() == [c in exp.classes[:2] for c in range(len(moved))]  # only the proxies of the classes seen are trained


def test_offline_the_memory_is_class_balanced_and_replay_matches_the_batch(tmp, shared_cache):
    from cl.config import parse_run_config
    from cl.engine.loop import prepare
    from cl.memory import ClassBalancedMemory, ReservoirMemory
    from tests.conftest import tiny_config

    prep = prepare(parse_run_config(tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "generative_classifier", "memory_size": 24})))
    strategy = prep.strategy
    assert isinstance(strategy._memory, ClassBalancedMemory)
    for exp in prep.bench.experiences:
        strategy.before_experience(exp)
        strategy.observe(exp.train.x[:16], exp.train.y[:16], exp.task_id)
        strategy.after_experience(exp)
    assert sorted(strategy._memory.class_counts().values()) == [4] * 6
    sampled = []
    real = strategy._memory.sample
    strategy._memory.sample = lambda n: (sampled.append(n), real(n))[1]
    strategy.observe(exp.train.x[:16], exp.train.y[:16], exp.task_id)
    assert sampled == [16]  # the batch size, like ER (was a fixed 10)
    online = prepare(parse_run_config(tiny_config(tmp, cache_dir=str(shared_cache), train={"epochs": 1}, strategy={"name": "generative_classifier", "memory_size": 24},
                                                  benchmark={"scenario": "online"})))
    assert isinstance(online.strategy._memory, ReservoirMemory)  # the paper's online setting is unchanged
