"""Training recipes: learning-rate schedules with warm-up and gradient clipping, applied in every
strategy's optimiser step; defaults leave runs (and their identities) as they were."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cl.config import ConfigError, TrainConfig, parse_run_config
from cl.engine.loop import prepare, run
from cl.engine.rundir import result_config
from tests.conftest import tiny_config


def test_lr_factor_by_hand():
    cos = TrainConfig(lr_schedule="cosine", warmup_steps=4)
    assert cos.lr_factor(0, 10, 0) == pytest.approx(0.25 * 1.0)  # warm-up 1/4, cosine at 0
    assert cos.lr_factor(3, 10, 0) == pytest.approx(1.0 * 0.5 * (1 + math.cos(math.pi * 3 / 10)))
    assert cos.lr_factor(5, 10, 0) == pytest.approx(0.5)
    assert cos.lr_factor(10, 10, 0) == pytest.approx(0.0, abs=1e-12)
    step = TrainConfig(lr_schedule="step", lr_milestones=[1, 3], lr_gamma=0.1)
    assert [step.lr_factor(0, 9, e) for e in range(5)] == pytest.approx([1, 0.1, 0.1, 0.01, 0.01])
    assert TrainConfig().lr_factor(7, 9, 2) == 1.0 and not TrainConfig().scheduled
    assert TrainConfig(warmup_steps=2).lr_factor(0, 9, 0) == 0.5 and TrainConfig(warmup_steps=2).lr_factor(5, 9, 0) == 1.0


def _prep(tmp: Path, shared_cache: Path, **train):
    strategy = {"name": "finetune", "lr": 0.1, "momentum": 0.0}
    return prepare(parse_run_config(tiny_config(tmp, cache_dir=str(shared_cache), strategy=strategy, train={"epochs": 1, "batch_size": 16, **train})))


def test_the_schedule_sets_every_groups_rate_at_each_step(tmp: Path, shared_cache: Path):
    prep = _prep(tmp, shared_cache, lr_schedule="cosine", warmup_steps=2)
    s, exp = prep.strategy, prep.bench.experiences[0]
    s.before_experience(exp)
    x, y = next(exp.train.batches(16, torch.Generator().manual_seed(0)))
    seen = []
    for k in range(4):
        s.lr_position = (k, 4, 0)
        s.observe(x, y, exp.task_id)
        seen.append([g["lr"] for g in s.optimizer.param_groups][0])
    want = [0.1 * prep.cfg.train.lr_factor(k, 4, 0) for k in range(4)]
    assert seen == pytest.approx(want) and want[0] == pytest.approx(0.05) and want[1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_clipping_bounds_the_update(tmp: Path, shared_cache: Path):
    prep = _prep(tmp, shared_cache, grad_clip_norm=1e-3)
    s, exp = prep.strategy, prep.bench.experiences[0]
    s.before_experience(exp)
    params = [p for g in s.optimizer.param_groups for p in g["params"]] if s.optimizer else []
    x, y = next(exp.train.batches(16, torch.Generator().manual_seed(0)))
    s.observe(x, y, exp.task_id)  # creates the optimiser if the strategy does so lazily
    params = [p for g in s.optimizer.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    s.observe(x, y, exp.task_id)
    step = math.sqrt(sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(params, before)))
    assert 0 < step <= 0.1 * 1e-3 * (1 + 1e-4)  # SGD without momentum: |update| = lr x |clipped gradient|


def test_defaults_keep_the_run_identity_and_other_values_change_it(tmp: Path, shared_cache: Path):
    base = tiny_config(tmp, cache_dir=str(shared_cache))
    plain = result_config(parse_run_config(base))
    assert "lr_schedule" not in plain["train"] and "grad_clip_norm" not in plain["train"]
    cosine = result_config(parse_run_config({**base, "train": {**base.get("train", {}), "lr_schedule": "cosine"}}))
    assert cosine["train"]["lr_schedule"] == "cosine"


def test_a_scheduled_run_end_to_end_differs_and_is_finite(tmp: Path, shared_cache: Path):
    data = tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "finetune", "lr": 0.05},
                       train={"epochs": 2, "batch_size": 16, "lr_schedule": "step", "lr_milestones": [1], "warmup_steps": 3, "grad_clip_norm": 5.0})
    metrics = run(parse_run_config(data))
    assert 0.0 <= metrics["final_acc"] <= 1.0


@pytest.mark.parametrize("train, strategy, message", [
    ({"lr_milestones": [2]}, {"name": "er"}, "only used by lr_schedule: step"),
    ({"lr_schedule": "cosine"}, {"name": "avalanche", "method": "replay"}, "runs its own training loop"),
    ({"grad_clip_norm": 1.0}, {"name": "avalanche", "method": "replay"}, "runs its own training loop"),
    ({"label_smoothing": 0.1}, {"name": "simplecil"}, "strategy simplecil .as configured. trains no cross-entropy"),
    ({"label_smoothing": 0.1}, {"name": "ranpac", "first_session": None}, "strategy ranpac .as configured. trains no cross-entropy"),
    ({"label_smoothing": 0.1}, {"name": "avalanche", "method": "replay"}, "trains no cross-entropy"),
])
def test_settings_a_strategy_would_ignore_are_refused(tmp: Path, train: dict, strategy: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        parse_run_config(tiny_config(tmp, strategy=strategy, train=train))


def test_label_smoothing_by_hand_and_masked_classes_get_none_of_it():
    from cl.strategies.base import masked_cross_entropy

    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.0, 0.0]])
    y = torch.tensor([2, 1])
    lo, hi = torch.tensor([1, 0]), torch.tensor([3, 2])  # sample 0 competes over {1, 2}, sample 1 over {0, 1}
    eps = 0.1

    def by_hand(row, label, allowed):
        z = math.log(sum(math.exp(row[c]) for c in allowed))
        logp = {c: row[c] - z for c in allowed}
        return (1 - eps) * -logp[label] + eps * -sum(logp.values()) / len(allowed)

    expected = (by_hand([1.0, 2.0, 3.0, 4.0], 2, [1, 2]) + by_hand([0.5, -1.0, 2.0, 0.0], 1, [0, 1])) / 2
    assert masked_cross_entropy(logits, y, lo, hi, eps).item() == pytest.approx(expected, rel=1e-6)
    # with one range for all, it is torch's label smoothing on the classes of that range
    same = masked_cross_entropy(logits, torch.tensor([2, 1]), torch.tensor([1, 1]), torch.tensor([3, 3]), eps)
    torch_ls = torch.nn.functional.cross_entropy(logits[:, 1:3], torch.tensor([1, 0]), label_smoothing=eps)
    assert same.item() == pytest.approx(torch_ls.item(), rel=1e-6)
    # unmasked: torch's label smoothing over every class; eps = 0: plain cross-entropy, bit for bit
    assert masked_cross_entropy(logits, y, smoothing=eps).item() == pytest.approx(torch.nn.functional.cross_entropy(logits, y, label_smoothing=eps).item(), rel=1e-6)
    plain = torch.nn.functional.cross_entropy(logits.masked_fill(torch.tensor([[True, False, False, True], [False, False, True, True]]), float("-inf")), y)
    assert torch.equal(masked_cross_entropy(logits, y, lo, hi), plain)


def test_label_smoothing_changes_the_training_loss_and_the_identity(tmp: Path, shared_cache: Path):
    import json

    losses = {}
    for eps in (0.0, 0.2):
        data = tiny_config(tmp, cache_dir=str(shared_cache), run_name=f"ls{int(eps * 10)}", strategy={"name": "finetune", "lr": 0.05},
                           train={"epochs": 2, "batch_size": 16, "label_smoothing": eps})
        cfg = parse_run_config(data)
        if eps == 0.0:
            assert "label_smoothing" not in result_config(cfg)["train"]  # the default keeps older runs' identity
        else:
            assert result_config(cfg)["train"]["label_smoothing"] == 0.2
        metrics = run(cfg)
        log = [json.loads(line) for line in (cfg.run_dir() / "log.jsonl").read_text().splitlines()]
        losses[eps] = [e["loss"] for e in log if e["event"] == "epoch"]
        assert 0.0 <= metrics["final_acc"] <= 1.0
    # smoothing keeps the loss away from 0: the smoothed loss is larger once the model is confident
    assert losses[0.2][-1] > losses[0.0][-1]


def test_augmented_transform_is_the_plain_one_moved_and_flipped():
    from cl.data.transforms import AugmentedTransform, BatchTransform

    plain = BatchTransform(in_channels=1, channels=1, size=None, mean=(0.5,), std=(0.25,))
    x = torch.randint(0, 256, (8, 1, 6, 6), dtype=torch.uint8)
    flipped = AugmentedTransform(plain, torch.Generator().manual_seed(0), padding=0, flip=True)(x)
    base = plain(x)
    for a, b in zip(flipped, base):  # each sample: itself or its mirror image
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
    moved = AugmentedTransform(plain, torch.Generator().manual_seed(0), padding=2, flip=False)(x)
    assert moved.shape == base.shape and not torch.equal(moved, base)
    assert AugmentedTransform(plain, torch.Generator(), 2, True).to_dict() == plain.to_dict()  # describes the wrapped transform


def _augmented(tmp: Path, shared_cache: Path, **extra):
    return tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "er", "memory_size": 24, "lr": 0.05},
                       backbone={"name": "test_resnet", "cache_features": False,
                                 "weights": {"source": "pretrain", "pretrain": {"epochs": 2, "batch_size": 32}}},
                       train={"epochs": 2, "batch_size": 16, "augment": {"crop_padding": 2, "hflip": True}}, **extra)


def test_augmentation_runs_resumes_bit_for_bit_and_leaves_evaluation_alone(tmp: Path, shared_cache: Path):
    import json

    whole = run(parse_run_config(_augmented(tmp, shared_cache, run_name="whole")))
    cfg = parse_run_config(_augmented(tmp, shared_cache, run_name="halves"))
    assert run(cfg, stop_after=1) is None
    halves = run(cfg, resume=True)
    assert halves["acc_matrix"] == whole["acc_matrix"]  # the augmentation draws are checkpointed with the loop
    plain = run(parse_run_config({**_augmented(tmp, shared_cache, run_name="plain"), "train": {"epochs": 2, "batch_size": 16}}))
    assert plain["acc_matrix"] != whole["acc_matrix"]  # it does change training
    log = [json.loads(line) for line in (cfg.run_dir() / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(e["loss"]) for e in log if e["event"] == "epoch")


def test_evaluation_and_the_backbone_transform_are_not_augmented(tmp: Path, shared_cache: Path):
    from cl.data.transforms import BatchTransform
    from cl.engine.loop import _Loop

    prep = prepare(parse_run_config(_augmented(tmp, shared_cache)))
    seen = []
    observe = prep.strategy.observe

    def spy(x, y, t):
        seen.append(type(prep.backbone.transform).__name__)
        return observe(x, y, t)

    prep.strategy.observe = spy
    loop = _Loop.__new__(_Loop)
    loop._init_state(prep)
    loop.progress = type("P", (), {"start_epoch": lambda *a: None, "step": lambda *a: None, "end_epoch": lambda *a: None})()
    loop.log = type("L", (), {"write": lambda *a, **k: None})()
    prep.strategy.before_experience(prep.bench.experiences[0])
    loop._train_offline(prep.bench.experiences[0], 0)
    assert seen and set(seen) == {"AugmentedTransform"}
    assert isinstance(prep.backbone.transform, BatchTransform)  # restored after every observe


def test_augmentation_on_cached_features_is_refused(tmp: Path, shared_cache: Path):
    data = tiny_config(tmp, cache_dir=str(shared_cache), train={"augment": {}})
    with pytest.raises(ConfigError, match="train.augment needs images, but this run trains on cached features"):
        parse_run_config(data)
    with pytest.raises(ConfigError, match="train.augment: strategy avalanche runs its own training loop"):
        parse_run_config(tiny_config(tmp, strategy={"name": "avalanche", "method": "replay"}, backbone={"name": "test_resnet", "cache_features": False}, train={"augment": {}}))


def test_augmentation_that_does_nothing_or_hides_the_image_is_refused(tmp: Path, shared_cache: Path):
    with pytest.raises(ConfigError, match="augment nothing: remove train.augment"):
        parse_run_config(_augmented(tmp, shared_cache) | {"train": {"augment": {"crop_padding": 0, "hflip": False}}})
    data = _augmented(tmp, shared_cache)
    data["train"] = {**data["train"], "augment": {"crop_padding": 9}}
    with pytest.raises(ConfigError, match=r"crop_padding: 9 pixels would shift most of each 16-pixel input out of view \(at most 8\)"):
        prepare(parse_run_config(data))
