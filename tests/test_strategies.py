"""Every registered strategy on a tiny stream, plus each strategy's own maths."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cl.config import parse_run_config
from cl.engine.loop import prepare
from cl.registry import STRATEGIES
from cl.strategies.base import masked_cross_entropy
from tests.conftest import tiny_config

# Per-strategy settings for the shared matrix (composer-style: defaults live with the entry).
SETTINGS: dict[str, dict] = {
    "finetune": {"name": "finetune", "lr": 0.05},
    "er": {"name": "er", "lr": 0.05, "memory_size": 12},
    "joint": {"name": "joint", "lr": 0.05},
    "simplecil": {"name": "simplecil"},
    "ranpac": {"name": "ranpac", "projection_dim": 64, "first_session": None},
    "er_task_aware": {"name": "er_task_aware", "lr": 0.05, "memory_size": 12},
    "generative_classifier": {"name": "generative_classifier", "lr": 0.05, "memory_size": 24},
    "avalanche": {"name": "avalanche", "method": "replay", "lr": 0.05, "memory_size": 12},
    "derpp": {"name": "derpp", "lr": 0.05, "memory_size": 12},
    "icarl": {"name": "icarl", "lr": 0.05, "memory_size": 12},
    "fecam": {"name": "fecam"},
}


def make(tmp: Path, cache: Path, strategy: dict, **over):
    cfg = parse_run_config(tiny_config(tmp, cache_dir=str(cache), strategy=strategy, **over))
    return prepare(cfg)


def train_stream(prep, epochs: int = 1):
    s = prep.strategy
    for exp in prep.bench.experiences:
        s.before_experience(exp)
        if s.trains_itself:
            s.train_experience(exp, exp.train, epochs, 16)
            s.after_experience(exp)
            continue
        for _ in range(min(epochs, s.max_epochs or epochs)):
            for x, y in exp.train.batches(16, torch.Generator().manual_seed(exp.index)):
                terms = s.observe(x, y, exp.task_id)
                assert all(torch.isfinite(torch.tensor(v)) for v in terms.values())
        s.after_experience(exp)


# Strategies that train inside the backbone (BatchNorm, PEFT modules) cannot use this matrix's
# cached-feature fixture; each has its own file.
TESTED_ELSEWHERE = {"confit": "tests/test_confit.py", "peft_per_task": "tests/test_peft_per_task.py", "aper": "tests/test_peft_per_task.py", "l2p": "tests/test_peft_per_task.py",
                    "slca": "tests/test_slca.py", "ease": "tests/test_ease.py",
                    "dualprompt": "tests/test_prompts.py", "coda_prompt": "tests/test_prompts.py"}


def test_matrix_covers_every_registered_strategy():
    assert set(SETTINGS) | set(TESTED_ELSEWHERE) == set(STRATEGIES.names())
    assert not set(SETTINGS) & set(TESTED_ELSEWHERE)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_strategy_runs_and_state_round_trips(tmp: Path, shared_cache: Path, name: str):
    prep = make(tmp, shared_cache, SETTINGS[name])
    assert prep.strategy.ctx.cached_features  # frozen backbone + feature strategy -> cached path
    x = prep.bench.experiences[0].test.x[:8]
    # the contract: predict may be called before the first experience (forward transfer, the initial
    # row of the accuracy matrix); scores of the right shape, -inf allowed, never NaN
    for task_id in (None, 0):
        before = prep.strategy.predict(x, task_id)
        assert before.shape == (8, prep.bench.n_classes) and not torch.isnan(before).any()
    train_stream(prep)
    scores = prep.strategy.predict(x, None)
    assert scores.shape == (8, prep.bench.n_classes)
    assert torch.isfinite(scores).all() or name == "generative_classifier"  # it scores classes present in memory

    if not prep.strategy.resumable:
        return
    buf = io.BytesIO()
    torch.save(prep.strategy.state_dict(), buf)
    fresh = make(tmp, shared_cache, SETTINGS[name])
    fresh.strategy.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert torch.equal(fresh.strategy.predict(x, None), scores)


def test_masked_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0, 5.0], [0.0, 3.0, 1.0, 1.0]])
    y = torch.tensor([0, 2])
    lo, hi = torch.tensor([0, 2]), torch.tensor([2, 4])
    # sample 0 competes over {0, 1}; sample 1 over {2, 3}
    expected = (-F.log_softmax(torch.tensor([2.0, 1.0]), 0)[0] - F.log_softmax(torch.tensor([1.0, 1.0]), 0)[0]) / 2
    assert masked_cross_entropy(logits, y, lo, hi) == pytest.approx(float(expected))


def test_finetune_loss_ignores_unseen_classes(tmp: Path, shared_cache: Path):
    prep = make(tmp, shared_cache, SETTINGS["finetune"])
    s, exp = prep.strategy, prep.bench.experiences[0]
    s.before_experience(exp)
    before = s.head.weight.detach().clone()
    s.observe(exp.train.x[:16], exp.train.y[:16], 0)
    changed = (s.head.weight.detach() != before).any(dim=1)
    assert changed[:2].all() and not changed[2:].any()  # rows of unseen classes get no gradient


def test_simplecil_prototypes_are_class_means(tmp: Path, shared_cache: Path):
    prep = make(tmp, shared_cache, SETTINGS["simplecil"])
    train_stream(prep, epochs=3)  # max_epochs = 1: extra epochs must not double-count
    s = prep.strategy
    feats = torch.cat([e.train.x for e in prep.bench.experiences])
    labels = torch.cat([e.train.y for e in prep.bench.experiences])
    means = torch.stack([feats[labels == c].mean(0) for c in range(6)])
    assert torch.allclose((s.sums / s.counts[:, None]).float(), means, atol=1e-5)
    x = prep.bench.experiences[1].test.x[:5]
    expected = F.normalize(x, dim=1) @ F.normalize(means, dim=1).T
    assert torch.allclose(s.predict(x, None), expected, atol=1e-5)
    assert s.storage_bytes() == 6 * prep.backbone.feature_dim * 4


def test_simplecil_cannot_score_unseen_classes(tmp: Path, shared_cache: Path):
    prep = make(tmp, shared_cache, SETTINGS["simplecil"])
    s, exp = prep.strategy, prep.bench.experiences[0]
    s.before_experience(exp)
    s.observe(exp.train.x, exp.train.y, 0)
    scores = s.predict(exp.test.x[:3], None)
    assert torch.isfinite(scores[:, :2]).all() and torch.isinf(scores[:, 2:]).all()


def test_er_memory_is_class_balanced_and_replayed(tmp: Path, shared_cache: Path):
    prep = make(tmp, shared_cache, SETTINGS["er"])
    train_stream(prep)
    mem = prep.strategy.memory
    assert mem.class_counts() == {c: 2 for c in range(6)}
    assert mem.x.dtype == torch.float32 and mem.x.shape[1] == prep.backbone.feature_dim  # cached features stored
    assert set(mem.t.tolist()) == {0, 1, 2}


def test_er_online_uses_a_reservoir(tmp: Path, shared_cache: Path):
    prep = make(tmp, shared_cache, SETTINGS["er"], benchmark={"scenario": "online"}, train={"epochs": 1})
    train_stream(prep)
    assert type(prep.strategy.memory).__name__ == "ReservoirMemory"
    assert prep.strategy.memory.n_seen == sum(len(e.train) for e in prep.bench.experiences)


def test_image_mode_trains_only_the_unfrozen_backbone_blocks(tmp: Path, shared_cache: Path):
    prep = make(tmp, shared_cache, SETTINGS["finetune"], backbone={"name": "test_resnet", "trainable": "last_blocks", "trainable_blocks": 1,
                                                                  "weights": {"source": "pretrain", "pretrain": {"epochs": 2, "batch_size": 32}}})
    s = prep.strategy
    assert not s.ctx.cached_features and prep.bench.experiences[0].train.x.dtype == torch.uint8
    before = {n: p.detach().clone() for n, p in prep.backbone.model.named_parameters()}
    bn_stats = {n: b.clone() for n, b in prep.backbone.model.named_buffers() if "running_mean" in n}
    train_stream(prep)
    for n, p in prep.backbone.model.named_parameters():
        if n.startswith("layer4."):
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n  # frozen parameters bit-identical
    for n, b in prep.backbone.model.named_buffers():
        if "running_mean" in n and not n.startswith("layer4."):
            assert torch.equal(b, bn_stats[n]), n  # frozen BN layers stay in eval mode
    assert "backbone" in s.state_dict()
    assert s.storage_bytes() > sum(p.numel() for p in prep.backbone.trainable_parameters())
