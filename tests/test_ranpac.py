"""RanPAC: the ridge solution, λ selection, incremental = joint accumulation, and Phase 1 (first-session PEFT)."""

from __future__ import annotations

from pathlib import Path

import torch

import json

import pytest
import yaml

from cl.config import ConfigError, parse_run_config
from cl.engine.loop import prepare, run
from cl.strategies.ranpac import RanPACConfig, ridge_solve, select_ridge
from tests.conftest import tiny_config
from tests.test_peft_per_task import VIT


def test_ridge_solve_by_hand():
    G = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    C = torch.tensor([[2.0], [8.0]], dtype=torch.float64)
    # (G + 2I)^-1 C = [2/4, 8/6]
    torch.testing.assert_close(ridge_solve(G, C, 2.0), torch.tensor([[0.5], [8 / 6]], dtype=torch.float64))


def test_select_ridge_prefers_little_regularisation_for_clean_linear_data():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(200, 5, generator=g, dtype=torch.float64)
    y = h @ torch.randn(5, 3, generator=g, dtype=torch.float64)
    assert select_ridge(h, y, [1e-6, 1e2, 1e6], 0.2, torch.Generator().manual_seed(1)) == 1e-6
    noise = torch.randn(200, 3, generator=g, dtype=torch.float64)  # targets unrelated to h: shrink to zero
    assert select_ridge(h, noise, [1e-6, 1e6], 0.2, torch.Generator().manual_seed(1)) == 1e6


def test_accumulated_statistics_equal_one_batch_and_give_the_ridge_classifier(tmp: Path, shared_cache: Path):
    cfg = parse_run_config(tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "ranpac", "projection_dim": 32, "first_session": None}))
    prep = prepare(cfg)
    s, exps = prep.strategy, prep.bench.experiences
    for exp in exps:
        s.before_experience(exp)
        for x, y in exp.train.batches(7, torch.Generator().manual_seed(0)):
            s.observe(x, y, exp.task_id)
        s.after_experience(exp)
    x_all = torch.cat([e.train.x for e in exps])
    y_all = torch.cat([e.train.y for e in exps])
    h = torch.relu(x_all.float() @ s.W_rand).double()
    torch.testing.assert_close(s.G, h.T @ h, rtol=1e-6, atol=1e-6)  # float32 projections, batched differently
    y1 = torch.nn.functional.one_hot(y_all, 6).double()
    torch.testing.assert_close(s.C, h.T @ y1, rtol=1e-6, atol=1e-6)
    x = exps[0].test.x[:5]
    expected = (torch.relu(x.float() @ s.W_rand).double() @ torch.linalg.solve(h.T @ h + s.ridge * torch.eye(32, dtype=torch.float64), h.T @ y1)).float()
    torch.testing.assert_close(s.predict(x, None), expected, rtol=1e-4, atol=1e-4)


def test_defaults_follow_the_paper():
    cfg = RanPACConfig()
    assert cfg.ridge_grid == [10.0**k for k in range(-8, 9)]  # the official grid, 1e-8 ... 1e8
    assert cfg.first_session is not None and cfg.first_session.name == "adapter"  # Phase 1 on by default
    assert cfg.first_session.bottleneck == 64  # the official AdaptFormer width (ffn_num=64)
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.schedule) == ("sgd", 0.01, 0.9, 5e-4, "cosine")


def phase1_config(tmp: Path, cache: Path, **strategy):
    return parse_run_config(tiny_config(
        tmp, cache_dir=str(cache), backbone=VIT, train={"epochs": 2, "batch_size": 16},
        strategy={"name": "ranpac", "projection_dim": 48, "first_session": {"name": "adapter", "bottleneck": 4}, **strategy}))


def test_phase1_trains_only_the_first_sessions_module_then_accumulates_adapted_features(tmp: Path, shared_cache: Path):
    prep = prepare(phase1_config(tmp, shared_cache))
    s, exps = prep.strategy, prep.bench.experiences
    assert not s.ctx.cached_features  # Phase 1 needs images
    backbone = {k: v.clone() for k, v in s.ctx.backbone.model.state_dict().items()}
    init = {k: v.clone() for k, v in s.module.state_dict().items()}
    lrs = []
    s.before_experience(exps[0])
    for epoch in range(2):
        s.before_epoch(epoch)
        lrs.append(s.optimizer.param_groups[0]["lr"])
        for x, y in exps[0].train.batches(16, torch.Generator().manual_seed(epoch)):
            assert "loss" in s.observe(x, y, 0)
    assert lrs == pytest.approx([0.01, 0.005])  # cosine over 2 epochs
    assert torch.count_nonzero(s.G) == 0  # nothing accumulated while adapting
    s.after_experience(exps[0])
    trained = {k: v.clone() for k, v in s.module.state_dict().items()}
    assert any(not torch.equal(v, trained[k]) for k, v in init.items())  # Phase 1 moved the module
    assert all(not p.requires_grad for p in s.module.parameters())
    # the first task's statistics are those of the adapted features
    x0, y0 = exps[0].train.x, exps[0].train.y
    s.module.attach(s.ctx.backbone.model)
    with torch.no_grad():
        h = torch.relu(s.ctx.backbone.model(s.ctx.backbone.transform(x0, s.device)) @ s.W_rand).double()
    s.module.detach()
    torch.testing.assert_close(s.G, h.T @ h, rtol=1e-5, atol=1e-4)
    for exp in exps[1:]:
        s.before_experience(exp)
        assert s.max_epochs == 1 and not s.adapting
        for x, y in exp.train.batches(16, torch.Generator().manual_seed(0)):
            assert s.observe(x, y, exp.task_id) == {}
        s.after_experience(exp)
    assert all(torch.equal(v, s.module.state_dict()[k]) for k, v in trained.items())  # bit-identical after later tasks
    assert all(torch.equal(v, s.ctx.backbone.model.state_dict()[k]) for k, v in backbone.items())  # the backbone never moves
    assert s.ridge in s.cfg.ridge_grid


def test_phase1_end_to_end_and_resume_state(tmp: Path, shared_cache: Path):
    cfg = phase1_config(tmp, shared_cache)
    m = run(cfg)
    assert m is not None and m["trainable_params"] == 2 * (2 * 32 * 4 + 4 + 32)
    run_dir = tmp / "runs" / "tiny" / "ranpac" / "seed0"
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["strategy"]["first_session"]["name"] == "adapter"  # the resolved config names the Phase 1 module
    assert json.loads((run_dir / "metrics.json").read_text())["final_avg_acc"] is not None
    prep = prepare(cfg)
    a, exps = prep.strategy, prep.bench.experiences
    b = prepare(cfg).strategy
    a.before_experience(exps[0])
    for x, y in exps[0].train.batches(16, torch.Generator().manual_seed(0)):
        a.observe(x, y, 0)
    a.after_experience(exps[0])
    b.load_state_dict(a.state_dict())
    x = exps[0].test.x[:8]
    assert torch.equal(b.predict(x, None), a.predict(x, None))


def test_phase1_refuses_a_backbone_it_cannot_adapt(tmp: Path, shared_cache: Path):
    cfg = parse_run_config(tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "ranpac", "projection_dim": 8}))
    with pytest.raises(ConfigError, match=r"strategy.first_session.name: 'adapter' applies to vit backbones, not resnet; .*first_session: null"):
        prepare(cfg)


def test_phase1_refuses_an_online_stream(tmp: Path):
    raw = tiny_config(tmp, backbone=VIT, benchmark={"scenario": "online"}, train={"epochs": 1}, strategy={"name": "ranpac", "projection_dim": 8})
    with pytest.raises(ConfigError, match="strategy.first_session: RanPAC's Phase 1 .* online"):
        parse_run_config(raw)
    raw["strategy"]["first_session"] = None
    parse_run_config(raw)  # Phase 2 alone is single-pass


def test_default_module_is_written_out_and_can_be_tweaked_from_the_command_line(tmp: Path):
    implicit = parse_run_config(tiny_config(tmp, backbone=VIT, strategy={"name": "ranpac"}))
    explicit = parse_run_config(tiny_config(tmp, backbone=VIT, strategy={"name": "ranpac", "first_session": {"name": "adapter", "bottleneck": 64}}))
    dumped = implicit.model_dump()["strategy"]["first_session"]
    assert dumped["bottleneck"] == 64 and dumped["placement"] == "parallel"  # the resolved config records every value
    assert implicit.model_dump() == explicit.model_dump()  # one config, however it was written
    tweaked = parse_run_config(tiny_config(tmp, backbone=VIT, strategy={"name": "ranpac", "first_session": {"bottleneck": 16}}))
    assert tweaked.strategy.first_session.name == "adapter" and tweaked.strategy.first_session.bottleneck == 16


def test_one_bit_phase1_is_stored_packed_and_used_as_stored(tmp: Path, shared_cache: Path):
    prep = prepare(phase1_config(tmp, shared_cache, first_session={"name": "adapter", "bottleneck": 4, "bits": 1}))
    s, exp = prep.strategy, prep.bench.experiences[0]
    s.before_experience(exp)
    for x, y in exp.train.batches(16, torch.Generator().manual_seed(0)):
        s.observe(x, y, 0)
    s.after_experience(exp)
    module_bytes = s.storage_bytes() - sum(t.numel() * t.element_size() for t in (s.G, s.C, s.W_rand))
    assert module_bytes == sum(-(-p.numel() // 8) + 8 for p in s.module.parameters())  # packed bits + (μ, σ), no float bias
    assert s.module.quantised_weights_loaded  # the forward uses the stored levels
    for p in s.module.parameters():
        assert p.unique().numel() <= 2  # each matrix holds exactly its two levels μ ± 0.6745σ
