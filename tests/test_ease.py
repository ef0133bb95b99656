"""EASE on a tiny ViT: the prototype complement and subspace ensemble by hand, adapter isolation,
gradients, inference cost, state round trip, the contract before training, and the CLI."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch

from cl.cli import main
from cl.config import ConfigError, parse_run_config
from cl.engine.loop import prepare, run
from cl.strategies.ease import complete_prototypes, cosine, ensemble_logits, subspace_weights
from tests.conftest import tiny_config, write_yaml

VIT = {
    "name": "vit_tiny_patch16_224",
    "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
    "weights": {"source": "pretrain", "pretrain": {"epochs": 2, "batch_size": 32}},
}
EASE = {"name": "ease", "bottleneck": 4, "lr": 0.05}


def config(tmp: Path, cache: Path, **strategy) -> dict:
    return tiny_config(tmp, cache_dir=str(cache), backbone=VIT, strategy={**EASE, **strategy}, train={"epochs": 1, "batch_size": 16})


def make(tmp: Path, cache: Path, **strategy):
    return prepare(parse_run_config(config(tmp, cache, **strategy)))


def train_task(s, exp, epochs: int = 1) -> None:
    s.before_experience(exp)
    for epoch in range(epochs):
        for x, y in exp.train.batches(16, torch.Generator().manual_seed(epoch)):
            s.observe(x, y, exp.task_id)
    s.after_experience(exp)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path):
    """One strategy trained on all three tasks, with snapshots taken along the way."""
    tmp = tmp_path_factory.mktemp("ease")
    prep = make(tmp, shared_cache)
    s, exps = prep.strategy, prep.bench.experiences
    snaps = {}
    for exp in exps:
        train_task(s, exp)
        snaps[exp.task_id] = [{k: v.clone() for k, v in a.state_dict().items()} for a in s.adapters]
    return tmp, prep, snaps


# ---- the maths by hand ---------------------------------------------------------------------------


def test_prototype_complement_by_hand():
    old_own = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # cosines depend on direction only
    new_own = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    new_target = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    e = math.e
    # row 0: cos = [1, 0] -> softmax [e, 1]/(e+1); row 1: cos = [0, 1] -> [1, e]/(e+1)
    expected = torch.tensor([[2 * e / (e + 1), 4 / (e + 1)], [2 / (e + 1), 4 * e / (e + 1)]])
    torch.testing.assert_close(complete_prototypes(old_own, new_own, new_target), expected)
    # a 45-degree old prototype: cos = [1/√2, 1/√2] -> equal weights -> the mean of the targets
    torch.testing.assert_close(complete_prototypes(torch.tensor([[1.0, 1.0]]), new_own, new_target), torch.tensor([[1.0, 2.0]]))


def test_subspace_weights_and_ensemble_logits_by_hand():
    owner = torch.tensor([0, 0, 1, 2])  # 4 classes of 3 tasks
    w = subspace_weights(owner, 3, alpha=0.1)
    expected_w = torch.tensor([[1, 1, 0.05, 0.05], [0.05, 0.05, 1, 0.05], [0.05, 0.05, 0.05, 1]])
    torch.testing.assert_close(w, expected_w)
    cos = torch.tensor([[[0.9, 0.1, 0.2, 0.3]], [[0.4, 0.5, 0.8, 0.0]], [[0.2, 0.6, 0.1, 0.7]]])  # [J=3, B=1, C=4]
    expected = torch.tensor([[0.9 + 0.05 * (0.4 + 0.2), 0.1 + 0.05 * (0.5 + 0.6), 0.8 + 0.05 * (0.2 + 0.1), 0.7 + 0.05 * (0.3 + 0.0)]])
    torch.testing.assert_close(ensemble_logits(cos, owner, 0.1), expected)
    # one subspace: only its own cosines, no division by zero
    torch.testing.assert_close(ensemble_logits(cos[:1, :, :2], owner[:2], 0.1), cos[0, :, :2])


# ---- the strategy ----------------------------------------------------------------------------------


def test_predict_before_and_during_the_first_experience(tmp: Path, shared_cache: Path):
    prep = make(tmp, shared_cache)
    s, exp = prep.strategy, prep.bench.experiences[0]
    x = exp.test.x[:5]
    for task_id in (None, 0):
        scores = s.predict(x, task_id)
        assert scores.shape == (5, prep.bench.n_classes) and not torch.isnan(scores).any() and torch.isinf(scores).all()
    s.before_experience(exp)  # an adapter under training is no subspace yet (online evaluation mid-task)
    assert torch.isinf(s.predict(x, None)).all()


def test_only_the_current_adapter_and_head_get_gradients(tmp: Path, shared_cache: Path):
    prep = make(tmp, shared_cache)
    s, exps = prep.strategy, prep.bench.experiences
    train_task(s, exps[0])
    s.before_experience(exps[1])
    fresh = s.adapters[1]  # the official init: AdaptFormer-parallel, up-projection and biases zero, s = 0.1, dropout 0.1
    assert fresh.cfg.placement == "parallel" and fresh.scale == 0.1 and fresh.drop.p == 0.1 and fresh.identity_at_init()
    assert all(not u.weight.any() and not u.bias.any() and not d.bias.any() and d.weight.any() for d, u in zip(fresh.down, fresh.up))
    assert fresh.num_parameters() == 2 * (32 * 4 + 4 + 4 * 32 + 32)  # blocks x (d·r + r + r·d + d)
    x, y = next(exps[1].train.batches(16))
    s.adapters[0].requires_grad_(True)  # even if it could receive gradients, the graph must not reach it
    s.optimizer.zero_grad()
    lo = exps[1].class_range[0]
    loss = s.classification_loss(s.head(s._features(x, 1)), y - lo)
    loss.backward()
    assert all(p.grad is None for p in s.adapters[0].parameters())
    assert all(p.grad is None for p in s.model.parameters())
    assert all(p.grad is not None for p in list(s.adapters[1].parameters()) + list(s.head.parameters()))
    assert s.adapters[1].up[0].weight.grad.abs().sum() > 0 and s.head.sigma.grad.abs() > 0
    assert {id(p) for g in s.optimizer.param_groups for p in g["params"]} == {id(p) for p in list(s.adapters[1].parameters()) + list(s.head.parameters())}


def test_old_adapters_are_bit_identical_and_the_backbone_never_moves(trained):
    _, prep, snaps = trained
    s = prep.strategy
    assert len(s.adapters) == 3 and len({id(a) for a in s.adapters}) == 3
    for t in (1, 2):
        for i in range(t):
            assert all(torch.equal(v, snaps[t][i][k]) for k, v in snaps[i][i].items()), (t, i)
    assert any(not torch.equal(v, snaps[0][0][k]) for k, v in snaps[1][1].items())  # each task has its own, trained adapter
    assert all(not p.requires_grad for a in s.adapters for p in a.parameters())
    assert s.head is None and not s.model.training


def test_prototypes_are_class_means_and_complements_follow_the_official_subspaces(trained):
    _, prep, _ = trained
    s, exps = prep.strategy, prep.bench.experiences
    ranges = [e.class_range for e in exps]
    with torch.no_grad():
        for t, exp in enumerate(exps):  # true prototypes: task t's classes in subspaces 0..t
            for j in range(t + 1):
                f = s._features(exp.train.x, j)
                for c in range(*ranges[t]):
                    torch.testing.assert_close(s.prototypes[j][c], f[exp.train.y == c].mean(0), rtol=1e-5, atol=1e-5)
    P = s.prototypes
    (a0, b0), (a1, b1), (a2, b2) = ranges
    # old task 0 in subspace 1: similarities in subspace 0 against the classes of tasks 1..2
    torch.testing.assert_close(P[1][a0:b0], complete_prototypes(P[0][a0:b0], P[0][a1:b2], P[1][a1:b2]))
    # old task 0 in subspace 2, and old task 1 in subspace 2: against task 2's classes only
    torch.testing.assert_close(P[2][a0:b0], complete_prototypes(P[0][a0:b0], P[0][a2:b2], P[2][a2:b2]))
    torch.testing.assert_close(P[2][a1:b1], complete_prototypes(P[1][a1:b1], P[1][a2:b2], P[2][a2:b2]))
    x = exps[0].test.x[:6]
    with torch.no_grad():
        cos = torch.stack([cosine(s._features(x, j), P[j][: b2]) for j in range(3)])
    expected = torch.stack([cos[0] + 0.05 * (cos[1] + cos[2]), cos[1] + 0.05 * (cos[0] + cos[2]), cos[2] + 0.05 * (cos[0] + cos[1])])
    owner = torch.tensor([0] * (b0 - a0) + [1] * (b1 - a1) + [2] * (b2 - a2))
    by_hand = expected[owner, :, torch.arange(b2)].T
    torch.testing.assert_close(s.predict(x, None), by_hand)


def test_without_recalc_each_complement_is_filled_once(tmp: Path, shared_cache: Path):
    prep = make(tmp, shared_cache, recalc_sim=False)
    s, exps = prep.strategy, prep.bench.experiences
    for exp in exps:
        train_task(s, exp)
    P = s.prototypes
    (a0, b0), (a1, b1), _ = [e.class_range for e in exps]
    # subspace 1 was completed when task 1 arrived, against task 1's classes, and never again
    torch.testing.assert_close(P[1][a0:b0], complete_prototypes(P[0][a0:b0], P[0][a1:b1], P[1][a1:b1]))


def test_inference_cost_grows_with_the_tasks(tmp: Path, shared_cache: Path):
    prep = make(tmp, shared_cache)
    s, exps = prep.strategy, prep.bench.experiences
    passes = []
    handle = s.model.patch_embed.register_forward_hook(lambda *_: passes.append(1))
    x = exps[0].test.x[:4]
    try:
        for t, exp in enumerate(exps):
            train_task(s, exp)
            passes.clear()
            scores = s.predict(x, None)
            assert len(passes) == t + 1
            hi = exp.class_range[1]
            assert torch.isfinite(scores[:, :hi]).all() and torch.isinf(scores[:, hi:]).all()
    finally:
        handle.remove()
    assert s.storage_bytes() == 3 * s.adapters[0].num_parameters() * 4 + prep.bench.n_classes * 3 * s.ctx.feature_dim * 4


def test_pretrained_subspace_adds_one_pass_and_a_beta_term(tmp: Path, shared_cache: Path):
    prep = make(tmp, shared_cache, beta=0.5)
    s, exps = prep.strategy, prep.bench.experiences
    for exp in exps[:2]:
        train_task(s, exp)
    hi = exps[1].class_range[1]
    with torch.no_grad():
        plain = s._features(exps[0].train.x, None)
        for c in range(exps[0].class_range[1]):
            torch.testing.assert_close(s.pretrained[c], plain[exps[0].train.y == c].mean(0), rtol=1e-5, atol=1e-5)
        x = exps[1].test.x[:4]
        cos = torch.stack([cosine(s._features(x, j), s.prototypes[j][:hi]) for j in range(2)])
        expected = ensemble_logits(cos, s.owner[:hi], 0.1) + 0.5 * cosine(s._features(x, None), s.pretrained[:hi])
    passes = []
    handle = s.model.patch_embed.register_forward_hook(lambda *_: passes.append(1))
    try:
        scores = s.predict(x, None)
    finally:
        handle.remove()
    assert len(passes) == 3  # two adapters + the pretrained model
    torch.testing.assert_close(scores[:, :hi], expected)
    assert torch.isinf(scores[:, hi:]).all()
    assert s.storage_bytes() == 2 * s.adapters[0].num_parameters() * 4 + hi * 3 * s.ctx.feature_dim * 4


def test_state_round_trip_gives_identical_predictions(trained, shared_cache: Path):
    tmp, prep, _ = trained
    s = prep.strategy
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    fresh = make(tmp, shared_cache).strategy
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    x = prep.bench.experiences[1].test.x[:8]
    assert torch.equal(fresh.predict(x, None), s.predict(x, None))
    assert fresh.storage_bytes() == s.storage_bytes()
    assert all(torch.equal(p, q) for a, b in zip(fresh.adapters, s.adapters) for p, q in zip(a.parameters(), b.parameters()))


def test_cli_run_and_resume(tmp: Path, shared_cache: Path, capsys):
    cfg = config(tmp, shared_cache)
    assert main(["run", str(write_yaml(tmp / "ease.yaml", cfg))]) == 0
    full = json.loads(next((tmp / "runs").rglob("metrics.json")).read_text())
    assert len(full["acc_matrix"]) == 3 and 0 <= full["final_acc"] <= 1 and full["trainable_params"] > 0
    resumed_cfg = parse_run_config({**cfg, "out_dir": str(tmp / "b")})
    assert run(resumed_cfg, stop_after=1) is None
    resumed = run(resumed_cfg, resume=True)
    for key in ("acc_matrix", "acc_matrix_task_aware", "stored_bytes_per_task"):
        assert resumed[key] == full[key], key
    bad = write_yaml(tmp / "bad.yaml", {**cfg, "strategy": {**EASE, "alpha": -1}})
    capsys.readouterr()
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "strategy.alpha" in err and err.count("\n") == 1


def test_bad_backbones_are_one_line_errors(tmp: Path, shared_cache: Path):
    with pytest.raises(ConfigError, match="backbone.trainable: ease trains per-task adapters on a frozen backbone"):
        parse_run_config(tiny_config(tmp, backbone={**VIT, "trainable": "all"}, strategy=EASE))
    with pytest.raises(ConfigError, match="'ease' needs a timm ViT"):
        prepare(parse_run_config(tiny_config(tmp, cache_dir=str(shared_cache), strategy=EASE)))


def test_an_online_stream_is_refused_in_one_line(tmp: Path):
    """The prototypes are a second pass over the task after training, which an online stream does not have (as slca)."""
    with pytest.raises(ConfigError, match=r"ease re-reads each task's training data"):
        parse_run_config(tiny_config(tmp, backbone=VIT, benchmark={"scenario": "online"}, train={"epochs": 1}, strategy={"name": "ease"}))
