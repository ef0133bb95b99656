"""iCaRL: herding and NME by hand, the BCE and KD losses by hand, exemplar sets per task, the frozen
previous model, resumable state, and a CLI run."""

from __future__ import annotations

import io
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cl.cli import main
from cl.strategies.icarl import ExemplarMemory, class_means, herding, icarl_bce, kd_loss, nme_scores
from tests.conftest import tiny_config, write_yaml
from tests.test_strategies import make

ICARL = {"name": "icarl", "lr": 0.05, "memory_size": 12}


def batches(exp, n: int = 16):
    return list(exp.train.batches(n, torch.Generator().manual_seed(exp.index)))


def train(s, exps, steps: int | None = None) -> None:
    for exp in exps:
        s.before_experience(exp)
        for x, y in itertools.islice(batches(exp), steps):
            s.observe(x, y, exp.task_id)
        s.after_experience(exp)


# ---- maths by hand ----------------------------------------------------------------------------


def test_herding_by_hand():
    # normalised: e1, e1, e2 (the first row is 3 e1: normalisation makes it a copy of row 1); μ = (2/3, 1/3)
    f = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # k=1: ‖μ - e1‖ = 0.471 < ‖μ - e2‖ = 0.943 -> row 0 (first of the tie)
    # k=2: with row 1 the mean is e1 (0.471); with row 2 it is (1/2, 1/2) (0.236) -> row 2
    # k=3: only row 1 is left (without replacement), and the mean is then μ itself
    assert herding(f, 3).tolist() == [0, 2, 1]
    assert herding(f, 10).tolist() == [0, 2, 1]  # never more than the class has
    assert herding(f, 1).tolist() == [0]


def test_herding_matches_brute_force():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(9, 4))
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    mu = unit.mean(0)
    chosen: list[int] = []
    for _ in range(6):  # brute force: the exemplar set's mean with every candidate added, in turn
        costs = {i: np.linalg.norm(mu - unit[chosen + [i]].mean(0)) for i in range(9) if i not in chosen}
        chosen.append(min(costs, key=costs.get))
    assert herding(torch.tensor(feats), 6).tolist() == chosen
    assert len(set(herding(torch.tensor(feats), 9).tolist())) == 9


def test_class_means_and_nme_scores_by_hand():
    feats = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, -2.0]])
    labels = torch.tensor([0, 0, 2])
    means, present = class_means(feats, labels, 3)
    # class 0: mean of (0.6, 0.8) and (1, 0) = (0.8, 0.4), normalised (2, 1)/√5; class 2: (0, -1)
    assert torch.allclose(means[0], torch.tensor([2.0, 1.0]) / math.sqrt(5))
    assert torch.allclose(means[2], torch.tensor([0.0, -1.0]))
    assert present.tolist() == [True, False, True]
    scores = nme_scores(torch.tensor([[0.0, 2.0]]), means, present)
    # (0, 1) against (2, 1)/√5: 4/5 + (1 - 1/√5)² ; against (0, -1): 4
    assert scores[0, 0].item() == pytest.approx(-(0.8 + (1 - 1 / math.sqrt(5)) ** 2), rel=1e-6)
    assert scores[0, 1].item() == float("-inf") and scores[0, 2].item() == pytest.approx(-4.0)


def test_bce_loss_by_hand():
    logits = torch.tensor([[0.0, 1.0, -1.0]])
    # the old class 0 gets the old model's sigmoid 0.8 as target; new classes one-hot (label 2)
    loss = icarl_bce(logits, torch.tensor([2]), torch.tensor([[0.8]]))
    softplus1 = math.log(1 + math.e)  # -log(1 - σ(1)) = -log σ(-1)
    expected = (-(0.8 * math.log(0.5) + 0.2 * math.log(0.5)) + softplus1 + softplus1) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert icarl_bce(logits, torch.tensor([1]), None).item() == pytest.approx((math.log(2) + math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-1))) / 3, rel=1e-6)


def test_kd_loss_by_hand():
    # T = 2: target softmax(0, 0) = (1/2, 1/2); log_softmax(1/2, 0) = (1/2 - L, -L), L = log(1 + e^{1/2})
    lse = math.log(1 + math.exp(0.5))
    assert kd_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), 2.0).item() == pytest.approx(lse - 0.25, rel=1e-6)


def test_exemplar_memory_truncates_in_herding_order():
    mem = ExemplarMemory(8, torch.Generator().manual_seed(0))
    mem.extend(torch.tensor([[10.0], [11.0], [12.0], [13.0]]), torch.tensor([0, 0, 0, 0]), torch.zeros(4, dtype=torch.long))
    mem.extend(torch.tensor([[20.0], [21.0], [22.0], [23.0]]), torch.tensor([1, 1, 1, 1]), torch.zeros(4, dtype=torch.long))
    mem.reduce(2)
    assert mem.x[:, 0].tolist() == [10.0, 11.0, 20.0, 21.0]  # each class keeps its first (herding) picks


# ---- the strategy -----------------------------------------------------------------------------


def test_exemplar_sets_after_each_task_are_herded_and_truncated(tmp: Path, shared_cache: Path):
    prep = make(tmp, shared_cache, ICARL)
    s, exps = prep.strategy, prep.bench.experiences
    expected_counts = [{0: 6, 1: 6}, {c: 3 for c in range(4)}, {c: 2 for c in range(6)}]
    previous = None
    for exp, counts in zip(exps, expected_counts):
        train(s, [exp], steps=2)
        assert s.memory.class_counts() == counts
        for c in exp.classes:  # new classes: herding on the (cached, frozen) features of the class
            rows = torch.nonzero(exp.train.y == c).flatten()
            picks = exp.train.x[rows[herding(exp.train.x[rows], counts[c])]]
            assert torch.equal(s.memory.x[s.memory.y == c], picks)
        if previous is not None:  # old classes: a prefix of their previous set
            for c, xs in previous.items():
                kept = s.memory.x[s.memory.y == c]
                assert torch.equal(kept, xs[: len(kept)])
        previous = {c: s.memory.x[s.memory.y == c].clone() for c in counts}
    # NME means are the normalised means of the exemplars' normalised features
    means, present = class_means(s.memory.x, s.memory.y, 6)
    assert torch.allclose(s.means, means) and present.all()
    x = exps[0].test.x[:5]
    assert torch.allclose(s.predict(x, None), nme_scores(x, means, present))


def test_predict_before_training_and_cnn_masks_unseen(tmp: Path, shared_cache: Path):
    prep = make(tmp, shared_cache, {**ICARL, "classifier": "cnn", "loss": "ce_kd"})
    s, exps = prep.strategy, prep.bench.experiences
    x = exps[0].test.x[:4]
    assert torch.isinf(s.predict(x, None)).all()
    train(s, exps[:1], steps=1)
    scores = s.predict(x, None)
    assert torch.equal(scores[:, :2], s.head(x)[:, :2]) and torch.isinf(scores[:, 2:]).all()


@pytest.mark.parametrize("loss", ["bce", "ce_kd"])
def test_distillation_targets_come_from_the_frozen_previous_model(tmp: Path, shared_cache: Path, loss: str):
    prep = make(tmp, shared_cache, {**ICARL, "loss": loss})
    s, exps = prep.strategy, prep.bench.experiences
    train(s, exps[:1], steps=3)
    snapshot = {k: v.clone() for k, v in s.head.state_dict().items()}
    exp = exps[1]
    s.before_experience(exp)
    assert s.known == 2
    for x, y in batches(exp)[:3]:
        # the exemplars this step appends, and the loss by hand (previous model = the snapshot)
        g = torch.Generator()
        g.set_state(s.generator.get_state())
        n_mem, n = len(s.memory), len(exp.train)
        order = torch.randperm(n_mem, generator=g) if s._order is None or s._served >= n else s._order
        served = 0 if s._order is None or s._served >= n else s._served
        idx = order[served * n_mem // n : min(served + len(y), n) * n_mem // n]
        xa, ya = torch.cat([x, s.memory.x[idx]]), torch.cat([y, s.memory.y[idx]])
        with torch.no_grad():
            logits = s.head(xa)
            old = F.linear(xa, snapshot["weight"], snapshot["bias"])[:, :2]
            if loss == "bce":
                targets = torch.cat([torch.sigmoid(old), F.one_hot(ya, 4)[:, 2:].float()], dim=1)
                expected = F.binary_cross_entropy_with_logits(logits[:, :4], targets)
            else:
                expected = F.cross_entropy(logits[:, :4], ya) - (F.softmax(old / 2, 1) * F.log_softmax(logits[:, :2] / 2, 1)).sum(1).mean()
        terms = s.observe(x, y, exp.task_id)
        assert terms["loss"] == pytest.approx(float(expected), rel=1e-5)
        assert all(torch.equal(v, snapshot[k]) for k, v in s.old_head.state_dict().items())  # bit-identical
    assert not torch.equal(s.head.weight, snapshot["weight"])


def test_trained_backbone_is_distilled_from_its_frozen_copy(tmp: Path, shared_cache: Path):
    backbone = {"name": "test_resnet", "trainable": "last_blocks", "trainable_blocks": 1,
                "weights": {"source": "pretrain", "pretrain": {"epochs": 2, "batch_size": 32}}}
    prep = make(tmp, shared_cache, ICARL, backbone=backbone)
    s, exps = prep.strategy, prep.bench.experiences
    assert not s.ctx.cached_features and s.old_backbone is not None
    train(s, exps[:1], steps=2)
    frozen = {k: v.clone() for k, v in prep.backbone.model.state_dict().items()}
    assert all(torch.equal(v, frozen[k]) for k, v in s.old_backbone.state_dict().items())
    s.before_experience(exps[1])
    for x, y in batches(exps[1])[:2]:
        s.observe(x, y, 1)
    assert all(torch.equal(v, frozen[k]) for k, v in s.old_backbone.state_dict().items())
    assert not all(torch.equal(v, frozen[k]) for k, v in prep.backbone.model.state_dict().items())
    assert not any(p.requires_grad for p in s.old_backbone.parameters())
    assert s.memory.x.dtype == torch.uint8  # exemplars stored as images when the backbone trains
    assert "old_backbone" in s.state_dict()


def test_state_round_trip_resumes_bit_identically(tmp: Path, shared_cache: Path):
    prep = make(tmp, shared_cache, ICARL)
    s, exps = prep.strategy, prep.bench.experiences
    train(s, exps[:2], steps=3)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    fresh = make(tmp, shared_cache, ICARL).strategy
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert fresh.known == s.known and torch.equal(fresh.means, s.means) and torch.equal(fresh.has_mean, s.has_mean)
    assert torch.equal(fresh.memory.x, s.memory.x) and torch.equal(fresh.memory.y, s.memory.y)
    assert torch.equal(fresh.old_head.weight, s.old_head.weight)
    x = exps[0].test.x[:8]
    assert torch.equal(fresh.predict(x, None), s.predict(x, None))
    for strat in (s, fresh):
        train(strat, exps[2:], steps=3)
    assert torch.equal(fresh.head.weight, s.head.weight) and torch.equal(fresh.predict(x, None), s.predict(x, None))


def test_each_exemplar_is_mixed_in_once_per_epoch(tmp: Path, shared_cache: Path):
    prep = make(tmp, shared_cache, ICARL)
    s, exps = prep.strategy, prep.bench.experiences
    train(s, exps[:1], steps=1)
    s.before_experience(exps[1])
    for _ in range(2):  # two epochs
        s.before_epoch(0)
        used = []
        for x, _ in batches(exps[1]):
            extra = s._exemplar_batch(len(x))
            used += [] if extra is None else extra[0].tolist()
        assert sorted(used) == sorted(s.memory.x.tolist())


def test_cli_run_writes_metrics_and_refuses_a_too_small_memory(tmp: Path, shared_cache: Path, capsys):
    cfg = tiny_config(tmp, cache_dir=str(shared_cache), strategy=ICARL, train={"epochs": 1})
    assert main(["run", str(write_yaml(tmp / "icarl.yaml", cfg))]) == 0
    metrics = json.loads(next((tmp / "runs").rglob("metrics.json")).read_text())
    assert len(metrics["acc_matrix"]) == 3 and 0 <= metrics["final_acc"] <= 1 and math.isfinite(metrics["forgetting"])
    assert metrics["memory_size"] == 12
    bad = write_yaml(tmp / "bad.yaml", {**cfg, "strategy": {**ICARL, "memory_size": 5}})
    capsys.readouterr()
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "strategy.memory_size" in err and err.count("\n") == 1


def test_an_online_stream_is_refused_in_one_line(tmp: Path):
    """Herding re-reads the whole task after training: a second pass an online stream does not have (as slca)."""
    from cl.config import ConfigError, parse_run_config

    with pytest.raises(ConfigError, match=r"icarl re-reads each task's training data"):
        parse_run_config(tiny_config(tmp, benchmark={"scenario": "online"}, train={"epochs": 1}, strategy={"name": "icarl", "memory_size": 12}))
