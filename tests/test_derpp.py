"""DER++: logits recorded at insertion, the loss by hand, reservoir statistics, reduction to finetune,
resumable state, and a CLI run."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cl.cli import main
from cl.strategies.derpp import LogitReservoir, derpp_loss
from tests.conftest import tiny_config, write_yaml
from tests.test_strategies import make

DERPP = {"name": "derpp", "lr": 0.05, "memory_size": 40}


def batches(exp, n: int = 16):
    return list(exp.train.batches(n, torch.Generator().manual_seed(exp.index)))


def test_derpp_loss_by_hand():
    ce, replay_ce = torch.tensor(0.7), torch.tensor(0.4)
    replay_logits = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    stored = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    total, terms = derpp_loss(ce, replay_logits, stored, replay_ce, alpha=0.3, beta=0.5)
    # MSE = (1 + 0 + 4 + 9) / 4 = 3.5; 0.7 + 0.3 * 3.5 + 0.5 * 0.4 = 1.95
    assert float(total) == pytest.approx(1.95)
    assert terms == pytest.approx({"loss_ce": 0.7, "loss_logits": 3.5, "loss_replay_ce": 0.4})
    total, terms = derpp_loss(ce, None, None, None, alpha=0.3, beta=0.5)
    assert float(total) == pytest.approx(0.7) and set(terms) == {"loss_ce"}


def test_stored_logits_are_those_at_insertion_and_never_change(tmp: Path, shared_cache: Path):
    prep = make(tmp, shared_cache, DERPP)
    s, exp = prep.strategy, prep.bench.experiences[0]
    s.before_experience(exp)
    (x1, y1), *rest = batches(exp)
    with torch.no_grad():
        expected = s.head(x1)  # the model that observes the batch, before this step's update
    s.observe(x1, y1, 0)
    mem = s.memory
    assert len(mem) == 16 and torch.equal(mem.positions, torch.arange(16))  # filling phase: everything, in order
    assert torch.equal(mem.logits, expected) and torch.equal(mem.x, x1) and torch.equal(mem.y, y1)
    assert mem.logits.shape[1] == prep.bench.n_classes  # full width: the head spans every class from the start
    for x, y in rest:
        s.observe(x, y, 0)
    first = torch.nonzero(mem.positions < 16).flatten()
    assert len(first) > 0
    assert torch.equal(mem.logits[first], expected[mem.positions[first]])  # untouched by later steps
    with torch.no_grad():
        assert not torch.allclose(s.head(mem.x[first]), mem.logits[first])  # while the model itself moved on


def test_observe_loss_matches_a_hand_computation(tmp: Path, shared_cache: Path):
    prep = make(tmp, shared_cache, {**DERPP, "alpha": 0.3, "beta": 0.5, "replay_batch_size": 5})
    s, exp = prep.strategy, prep.bench.experiences[0]
    s.before_experience(exp)
    (x1, y1), (x2, y2), *_ = batches(exp)
    s.observe(x1, y1, 0)
    # replay the strategy's two buffer draws with a copy of its generator
    g = torch.Generator().manual_seed(0)
    g.set_state(s.generator.get_state())
    i1 = torch.randperm(len(s.memory), generator=g)[:5]
    i2 = torch.randperm(len(s.memory), generator=g)[:5]
    mem, seen = s.memory, s.seen_classes
    with torch.no_grad():
        ce = F.cross_entropy(s.head(x2)[:, :seen], y2)
        mse = ((s.head(mem.x[i1]) - mem.logits[i1]) ** 2).mean()
        replay_ce = F.cross_entropy(s.head(mem.x[i2])[:, :seen], mem.y[i2])
    terms = s.observe(x2, y2, 0)
    assert terms["loss"] == pytest.approx(float(ce + 0.3 * mse + 0.5 * replay_ce), rel=1e-5)
    assert terms["loss_logits"] == pytest.approx(float(mse), rel=1e-5)


def test_reservoir_is_uniform_over_the_stream_and_rows_stay_aligned():
    n, capacity, trials = 60, 10, 1500
    g = torch.Generator().manual_seed(7)
    counts = torch.zeros(n)
    for _ in range(trials):
        mem = LogitReservoir(capacity, 3, g)
        for start in range(0, n, 7):
            ids = torch.arange(start, min(start + 7, n))
            mem.add(ids.float()[:, None], ids, 0, ids.float()[:, None] * torch.tensor([1.0, -1.0, 2.0]))
        assert mem.n_seen == n and len(mem) == capacity
        assert torch.equal(mem.positions, mem.y) and torch.equal(mem.x[:, 0].long(), mem.y)
        assert torch.equal(mem.logits, mem.y.float()[:, None] * torch.tensor([1.0, -1.0, 2.0]))
        counts[mem.y] += 1
    expected = trials * capacity / n  # every stream item kept with probability capacity / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 110, chi2  # 59 dof: mean 59, p(chi2 > 110) < 1e-4
    assert abs(counts[:20].mean() - expected) < 0.1 * expected and abs(counts[-20:].mean() - expected) < 0.1 * expected


def test_alpha_beta_zero_is_finetune(tmp: Path, shared_cache: Path):
    der = make(tmp, shared_cache, {**DERPP, "alpha": 0.0, "beta": 0.0})
    fin = make(tmp, shared_cache, {"name": "finetune", "lr": 0.05})
    assert torch.equal(der.strategy.head.weight, fin.strategy.head.weight)
    for exp in der.bench.experiences[:2]:
        for s in (der.strategy, fin.strategy):
            s.before_experience(exp)
        for x, y in batches(exp):
            a, b = der.strategy.observe(x, y, exp.task_id), fin.strategy.observe(x, y, exp.task_id)
            assert a["loss"] == b["loss"]
    assert len(der.strategy.memory) == 40  # the buffer filled, yet contributed nothing
    assert torch.equal(der.strategy.head.weight, fin.strategy.head.weight) and torch.equal(der.strategy.head.bias, fin.strategy.head.bias)


def test_state_round_trip_keeps_buffer_and_logits_and_resumes_bit_identically(tmp: Path, shared_cache: Path):
    prep = make(tmp, shared_cache, {**DERPP, "memory_size": 12})
    exps = prep.bench.experiences
    s = prep.strategy
    for exp in exps[:2]:
        s.before_experience(exp)
        for x, y in batches(exp):
            s.observe(x, y, exp.task_id)
        s.after_experience(exp)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    fresh = make(tmp, shared_cache, {**DERPP, "memory_size": 12}).strategy
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    for name in ("x", "y", "t", "logits", "positions"):
        assert torch.equal(getattr(fresh.memory, name), getattr(s.memory, name)), name
    assert fresh.memory.n_seen == s.memory.n_seen == sum(len(e.train) for e in exps[:2])
    assert fresh.memory.nbytes == s.memory.nbytes == 12 * (prep.backbone.feature_dim * 4 + 24 + 6 * 4)
    for strat in (s, fresh):
        strat.before_experience(exps[2])
        for x, y in batches(exps[2]):
            strat.observe(x, y, 2)
    assert torch.equal(fresh.head.weight, s.head.weight) and torch.equal(fresh.memory.logits, s.memory.logits)
    x = exps[0].test.x[:8]
    assert torch.equal(fresh.predict(x, None), s.predict(x, None))


def test_cli_run_writes_metrics(tmp: Path, shared_cache: Path, capsys):
    cfg = tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "derpp", "lr": 0.05, "memory_size": 12}, train={"epochs": 1})
    assert main(["run", str(write_yaml(tmp / "derpp.yaml", cfg))]) == 0
    metrics = json.loads(next((tmp / "runs").rglob("metrics.json")).read_text())
    assert len(metrics["acc_matrix"]) == 3 and 0 <= metrics["final_acc"] <= 1 and math.isfinite(metrics["forgetting"])
    assert metrics["memory_size"] == 12
    bad = write_yaml(tmp / "bad.yaml", {**cfg, "strategy": {"name": "derpp", "alpha": -1}})
    capsys.readouterr()
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "strategy.alpha" in err and err.count("\n") == 1
