"""SLCA on a tiny ViT: two learning rates, frozen old heads, class statistics, Gaussian sampling,
the task-normalised loss by hand, alignment touching only the heads, resume, CLI."""

from __future__ import annotations

import copy
import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cl.cli import main as cli_main
from cl.config import ConfigError, parse_run_config
from cl.engine.loop import prepare
from cl.strategies.fecam import unpack_upper
from cl.strategies.slca import SLCAConfig, sample_gaussians, task_normalised_logits
from tests.conftest import tiny_config, write_yaml
from tests.test_peft_per_task import VIT

FAST = {"name": "slca", "ca_epochs": 2, "ca_samples_per_class": 16}


def config(tmp: Path, cache: Path, train: dict | None = None, **strategy):
    return parse_run_config(tiny_config(tmp, cache_dir=str(cache), backbone={**VIT, "trainable": "all"},
                                        strategy={**FAST, **strategy}, train={"epochs": 1, "batch_size": 16, **(train or {})}))


def train_task(s, exp, seed: int = 0) -> None:
    s.before_experience(exp)
    for x, y in exp.train.batches(16, torch.Generator().manual_seed(seed)):
        assert math.isfinite(s.observe(x, y, exp.task_id)["loss"])
    s.after_experience(exp)


def backbone_state(s) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in s.ctx.backbone.model.state_dict().items()}


def test_defaults_follow_the_official_code():
    cfg = SLCAConfig()
    assert (cfg.optimizer, cfg.lr, cfg.backbone_lr, cfg.momentum, cfg.weight_decay) == ("sgd", 0.01, 1e-4, 0.9, 5e-4)
    assert (cfg.ca_epochs, cfg.ca_samples_per_class, cfg.ca_lr, cfg.ca_logit_norm, cfg.cov_jitter) == (5, 256, 0.01, 0.1, 1e-4)
    assert cfg.ca_mean_decay and not cfg.keep_aligned


def test_refuses_a_frozen_backbone_and_an_online_stream(tmp: Path):
    with pytest.raises(ConfigError, match=r"backbone.trainable: slca fine-tunes the backbone"):
        parse_run_config(tiny_config(tmp, backbone=VIT, strategy={"name": "slca"}))
    with pytest.raises(ConfigError, match=r"slca re-reads each task's training data"):
        parse_run_config(tiny_config(tmp, backbone={**VIT, "trainable": "all"}, benchmark={"scenario": "online"}, train={"epochs": 1},
                                     strategy={"name": "slca"}))


def test_task_normalised_logits_by_hand():
    logits = torch.tensor([[3.0, 0.0, 4.0], [1.0, 2.0, 2.0]])
    bounds = [(0, 1), (1, 3)]
    # row 0: task norms |3| = 3 and ‖(0, 4)‖ = 4, mean 3.5; row 1: 1 and ‖(2, 2)‖ = 2√2, mean (1 + 2√2)/2
    expected = torch.tensor([[3.0, 0.0, 4.0], [1.0, 2.0, 2.0]]) / torch.tensor([[3.5], [(1 + 2 * 2**0.5) / 2]]) / 0.1
    torch.testing.assert_close(task_normalised_logits(logits, bounds, 0.1), expected, rtol=1e-5, atol=1e-5)
    y = torch.tensor([2, 0])
    by_hand = -(torch.log_softmax(expected[0], 0)[2] + torch.log_softmax(expected[1], 0)[0]) / 2
    assert F.cross_entropy(task_normalised_logits(logits, bounds, 0.1), y).item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_samples_have_the_stored_mean_and_covariance():
    mean = torch.tensor([[1.0, -2.0, 0.5]])
    a = torch.tensor([[1.0, 0.0, 0.0], [0.5, 2.0, 0.0], [-0.3, 0.4, 0.7]])
    cov = a @ a.T
    g = torch.Generator().manual_seed(0)
    x = sample_gaussians(mean, torch.linalg.cholesky(cov)[None], 20000, g)[0]
    # standard errors at n = 20000: mean ~ sqrt(4.25/n) ≈ 0.015, covariance entries ≈ 0.04 at most
    torch.testing.assert_close(x.mean(0), mean[0], atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.12, rtol=0)
    again = sample_gaussians(mean, torch.linalg.cholesky(cov)[None], 20000, torch.Generator().manual_seed(0))[0]
    assert torch.equal(x, again)  # the seeded generator fixes the draw


def test_two_learning_rates_both_move_and_the_loop_schedule_scales_both(tmp: Path, shared_cache: Path):
    prep = prepare(config(tmp, shared_cache, train={"lr_schedule": "cosine"}))
    s, exp = prep.strategy, prep.bench.experiences[0]
    assert not s.ctx.cached_features and exp.train.x.dtype == torch.uint8
    s.before_experience(exp)
    backbone_group, head_group = s.optimizer.param_groups
    assert (backbone_group["lr"], head_group["lr"]) == (1e-4, 0.01)
    assert {id(p) for p in backbone_group["params"]} == {id(p) for p in s.ctx.backbone.model.parameters()}
    assert {id(p) for p in head_group["params"]} == {id(p) for p in s.heads["0"].parameters()}
    before, head = backbone_state(s), copy.deepcopy(s.heads["0"].state_dict())
    x, y = exp.train.x[:16], exp.train.y[:16]
    s.lr_position = (2, 4, 0)  # halfway through a cosine schedule: both rates halved
    s.observe(x, y, 0)
    assert (backbone_group["lr"], head_group["lr"]) == pytest.approx((0.5e-4, 0.005))
    assert any(not torch.equal(v, s.ctx.backbone.model.state_dict()[k]) for k, v in before.items())
    assert all(not torch.equal(v, s.heads["0"].state_dict()[k]) for k, v in head.items())


def test_each_group_steps_at_its_own_rate(tmp: Path, shared_cache: Path):
    # one plain SGD step: the update is -lr × gradient, with each group's own rate (rates large
    # enough for float32 to resolve the backbone's update)
    prep = prepare(config(tmp, shared_cache, momentum=0.0, weight_decay=0.0, backbone_lr=0.05, lr=0.01))
    s, exp = prep.strategy, prep.bench.experiences[0]
    s.before_experience(exp)
    p = dict(s.ctx.backbone.model.named_parameters())["patch_embed.proj.weight"]
    w = s.heads["0"].weight
    before_p, before_w = p.detach().clone(), w.detach().clone()
    s.train_mode(True)
    loss = s.classification_loss(s.heads["0"](s.encode(exp.train.x[:16])), exp.train.y[:16])
    grad_p, grad_w = torch.autograd.grad(loss, [p, w])
    s.observe(exp.train.x[:16], exp.train.y[:16], 0)
    assert grad_p.abs().sum() > 0
    torch.testing.assert_close(p.detach() - before_p, -0.05 * grad_p, rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(w.detach() - before_w, -0.01 * grad_w, rtol=1e-3, atol=1e-7)


def test_old_heads_are_frozen_and_the_next_task_starts_from_the_pre_alignment_heads(tmp: Path, shared_cache: Path):
    prep = prepare(config(tmp, shared_cache))
    s, exps = prep.strategy, prep.bench.experiences
    train_task(s, exps[0])
    assert s.backup is not None and len(s.heads) == 1  # no alignment after the first task
    head0 = copy.deepcopy(s.heads["0"].state_dict())
    trained_backbone = backbone_state(s)
    s.before_experience(exps[1])
    for x, y in exps[1].train.batches(16, torch.Generator().manual_seed(0)):
        s.observe(x, y, 1)
    assert all(torch.equal(v, s.heads["0"].state_dict()[k]) for k, v in head0.items())  # bit-identical after the next task
    assert not any(p.requires_grad for p in s.heads["0"].parameters())
    assert any(not torch.equal(v, s.ctx.backbone.model.state_dict()[k]) for k, v in trained_backbone.items())
    s.after_experience(exps[1])
    aligned = copy.deepcopy(s.heads.state_dict())
    assert not torch.equal(aligned["0.weight"], head0["weight"])  # alignment moved the old head too
    assert torch.equal(s.backup["0.weight"], head0["weight"])
    s.before_experience(exps[2])
    assert torch.equal(s.heads["0"].weight, head0["weight"])  # the official recall(): alignment does not compound
    kept = prepare(config(tmp, shared_cache, keep_aligned=True)).strategy
    train_task(kept, exps[0])
    train_task(kept, exps[1])
    aligned = copy.deepcopy(kept.heads.state_dict())
    kept.before_experience(exps[2])
    assert torch.equal(kept.heads["0"].weight, aligned["0.weight"])


def test_class_statistics_are_eval_mode_feature_moments(tmp: Path, shared_cache: Path):
    prep = prepare(config(tmp, shared_cache, ca_epochs=0))
    s, exps = prep.strategy, prep.bench.experiences
    train_task(s, exps[0])
    s.train_mode(False)
    with torch.no_grad():
        feats = s.encode(exps[0].train.x).double()
    d = s.ctx.feature_dim
    for c in (0, 1):
        f = feats[exps[0].train.y == c]
        torch.testing.assert_close(s.means[c], f.mean(0).float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(unpack_upper(s.covs[c], d), (torch.cov(f.T) + 1e-4 * torch.eye(d, dtype=torch.float64)).float(), rtol=1e-4, atol=1e-5)
    assert s.has_stats.tolist() == [True, True, False, False, False, False]
    assert s.storage_bytes() == (sum(p.numel() for p in s.ctx.backbone.model.parameters()) * 4 + 2 * (2 * (d + 1) * 4) + 2 * (d + d * (d + 1) // 2) * 4)


def test_alignment_changes_only_the_heads_and_uses_the_task_normalised_loss(tmp: Path, shared_cache: Path):
    prep = prepare(config(tmp, shared_cache, ca_epochs=0))
    s, exps = prep.strategy, prep.bench.experiences
    train_task(s, exps[0])
    train_task(s, exps[1])  # ca_epochs 0: nothing aligned yet
    backbone, means, covs = backbone_state(s), s.means.clone(), s.covs.clone()
    heads = copy.deepcopy(s.heads.state_dict())
    s.cfg = s.cfg.model_copy(update={"ca_epochs": 3, "ca_samples_per_class": 64})
    losses = s.align()
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert all(not torch.equal(v, s.heads.state_dict()[k]) for k, v in heads.items())
    assert all(torch.equal(v, s.ctx.backbone.model.state_dict()[k]) for k, v in backbone.items())
    assert torch.equal(s.means, means) and torch.equal(s.covs, covs)
    assert not any(p.requires_grad for p in s.heads.parameters())


def test_predict_contract_and_resume_is_bit_identical(tmp: Path, shared_cache: Path):
    cfg = config(tmp, shared_cache)
    prep = prepare(cfg)
    a, exps = prep.strategy, prep.bench.experiences
    x = exps[0].test.x[:8]
    before = a.predict(x, None)
    assert before.shape == (8, 6) and torch.isneginf(before).all()
    train_task(a, exps[0])
    train_task(a, exps[1])
    scores = a.predict(x, None)
    assert torch.isfinite(scores[:, :4]).all() and torch.isneginf(scores[:, 4:]).all()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = prepare(cfg).strategy
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert torch.equal(b.predict(x, None), scores)
    train_task(a, exps[2])  # restores the pre-alignment heads, trains, aligns with the generator
    train_task(b, exps[2])
    assert torch.equal(b.predict(x, None), a.predict(x, None))
    assert all(torch.equal(v, b.ctx.backbone.model.state_dict()[k]) for k, v in a.ctx.backbone.model.state_dict().items())


def test_cli_end_to_end(tmp: Path, shared_cache: Path):
    raw = tiny_config(tmp, cache_dir=str(shared_cache), backbone={**VIT, "trainable": "all"}, strategy=FAST, train={"epochs": 1, "batch_size": 16})
    path = write_yaml(tmp / "slca.yaml", raw)
    assert cli_main(["run", str(path)]) == 0
    metrics = json.loads((tmp / "runs" / "tiny" / "slca" / "seed0" / "metrics.json").read_text())
    assert 0 <= metrics["final_avg_acc"] <= 1 and len(metrics["acc_matrix"]) == 3
    assert metrics["trainable_params"] > sum(32 * n + n for n in (2, 2, 2))  # the backbone trains too
