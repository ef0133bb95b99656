"""Avalanche's strategies wrapped in our loop: they run on the same stream and land in metrics.json."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from cl.config import parse_run_config
from cl.engine.loop import run
from tests.conftest import tiny_config

METHODS = ["naive", "replay", "er_ace", "scr", "lwf", "ewc", "gdumb"]


@pytest.mark.parametrize("method", METHODS)
def test_offline_methods_run_through_the_loop(tmp: Path, shared_cache: Path, method: str):
    m = run(parse_run_config(tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "avalanche", "method": method, "memory_size": 12})))
    R = m["acc_matrix"]
    assert len(R) == 3 and all(0 <= R[i][j] <= 1 for i in range(3) for j in range(i + 1))
    assert math.isfinite(m["final_acc"]) and m["trainable_params"] > 0
    if method in ("replay", "er_ace", "scr", "gdumb"):
        assert 0 < m["memory_size"] <= 12
    if method == "gdumb":  # trained on the memory of all seen classes, not on the first experience only
        assert R[2][1] + R[2][2] > 0
    assert not (tmp / "runs" / "tiny" / "avalanche" / "seed0" / "ckpt").exists()  # not resumable: no checkpoints


@pytest.mark.parametrize("method", ["naive", "replay", "er_ace", "scr"])
def test_online_methods_train_per_stream_batch(tmp: Path, shared_cache: Path, method: str):
    cfg = tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "avalanche", "method": method, "memory_size": 12},
                      benchmark={"scenario": "online", "online": {"batch_size": 10, "eval_every": 60}}, train={"epochs": 1})
    m = run(parse_run_config(cfg))
    assert m["anytime"]["samples"] == [60, 120, 180]


def test_avalanche_on_images_keeps_frozen_backbone_layers_in_eval(tmp: Path, shared_cache: Path):
    cfg = tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "avalanche", "method": "replay", "memory_size": 12},
                      backbone={"name": "test_resnet", "trainable": "last_blocks", "trainable_blocks": 1,
                                "weights": {"source": "pretrain", "pretrain": {"epochs": 2, "batch_size": 32}}})
    from cl.engine.loop import prepare

    prep = prepare(parse_run_config(cfg))
    s = prep.strategy
    assert not s.ctx.cached_features
    stats = prep.backbone.model.layer1[0].bn1.running_mean.clone()
    exp = prep.bench.experiences[0]
    s.before_experience(exp)
    s.train_experience(exp, exp.train, 1, 16)
    assert (prep.backbone.model.layer1[0].bn1.running_mean == stats).all()  # Avalanche's model.train() did not reach it
    assert s.predict(exp.test.x[:4], None).shape == (4, 6)


@pytest.mark.parametrize("buffer, counts", [("class_balanced", [4, 4, 4, 4, 4, 4]), ("experience_balanced", None)])
def test_avalanche_replay_buffer_is_class_balanced_like_our_er(tmp: Path, shared_cache: Path, buffer: str, counts):
    from collections import Counter

    from cl.engine.loop import prepare, _training_data
    import torch

    cfg = parse_run_config(tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "avalanche", "method": "replay", "memory_size": 24, "buffer": buffer},
                                       benchmark={"base_classes": 2, "n_experiences": 3, "class_order": [0, 1, 2, 3, 4, 5],
                                                  "dataset": {"name": "synthetic", "n_classes": 6, "train_per_class": 30, "test_per_class": 10, "image_size": 16}}))
    prep = prepare(cfg)
    for i, exp in enumerate(prep.bench.experiences):
        prep.strategy.before_experience(exp)
        prep.strategy.train_experience(exp, _training_data(prep.bench, i, "current"), 1, 16)
    policy = next(p.storage_policy for p in prep.strategy.av.plugins if hasattr(p, "storage_policy"))
    labels = Counter(int(y) for y in torch.as_tensor(list(policy.buffer.targets)))
    if counts is not None:  # 24 / 6 classes, as our class-balanced ER keeps
        assert [labels[c] for c in range(6)] == counts
    else:  # Avalanche's default: 8 per experience, whatever the classes in it
        assert sum(labels.values()) == 24
