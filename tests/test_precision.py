"""Mixed precision on CPU: with ``precision: bf16`` the backbone (and its PEFT modules) computes under
bf16 autocast and returns float32, heads and losses stay float32; runs train with finite losses and
land close to fp32; fp16 does the same with a gradient scaler; a deep copy of the model keeps its own
forward; bf16 features never share a cache entry with fp32 ones; absent devices are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cl.config import ConfigError, parse_run_config
from cl.engine.loop import run
from cl.utils import autocast_forward, resolve_device
from tests.conftest import tiny_config


@pytest.mark.parametrize("strategy", [{"name": "er", "memory_size": 24}, {"name": "simplecil"}, {"name": "finetune"},
                                      {"name": "er", "memory_size": 24, "lr": 0.01}])
def test_bf16_runs_close_to_fp32(tmp: Path, shared_cache: Path, strategy: dict):
    results = {}
    for precision in ("fp32", "bf16"):
        cfg = parse_run_config(tiny_config(tmp / precision, cache_dir=str(shared_cache), strategy=strategy, precision=precision))
        metrics = run(cfg)
        log = [json.loads(line) for line in (cfg.run_dir() / "log.jsonl").read_text().splitlines()]
        losses = [e["loss"] for e in log if e["event"] == "epoch" and "loss" in e]
        if strategy["name"] != "simplecil":  # the others train: every epoch logs a finite loss
            assert losses and bool(torch.isfinite(torch.tensor(losses)).all()), losses
        results[precision] = metrics["final_acc"]
    assert abs(results["bf16"] - results["fp32"]) <= 0.15, results


@pytest.mark.parametrize("low", ["bf16", "fp16"])
def test_peft_modules_train_inside_the_autocast_backbone(tmp: Path, shared_cache: Path, low: str):
    from tests.test_peft_per_task import VIT

    accs = {}
    for precision in ("fp32", low):
        cfg = parse_run_config(tiny_config(tmp / precision, cache_dir=str(shared_cache), backbone=VIT, precision=precision,
                                           strategy={"name": "peft_per_task", "lr": 0.01, "peft": {"name": "lora", "rank": 2}}))
        accs[precision] = run(cfg)["task_aware"]["final_acc"]
    assert abs(accs[low] - accs["fp32"]) <= 0.15, accs


def test_fp16_steps_go_through_a_gradient_scaler(tmp: Path, shared_cache: Path):
    from cl.engine.loop import prepare
    from tests.test_peft_per_task import VIT

    cfg = parse_run_config(tiny_config(tmp, cache_dir=str(shared_cache), backbone=VIT, precision="fp16",
                                       strategy={"name": "peft_per_task", "lr": 0.01, "peft": {"name": "lora", "rank": 2}}))
    prep = prepare(cfg)
    strategy, exp = prep.strategy, prep.bench.experiences[0]
    strategy.before_experience(exp)
    trainable = [p for p in strategy.trainable_parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    x, y = next(exp.train.batches(8))
    loss = strategy.observe(x, y, exp.task_id)["loss"]
    scaler = strategy._grad_scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled() and scaler.get_scale() > 1
    assert torch.isfinite(torch.tensor(loss)) and any(not torch.equal(a, b) for a, b in zip(before, trainable))


def test_bf16_features_have_their_own_cache_entry(tmp: Path):
    from cl.engine.loop import prepare_inputs

    keys = set()
    for precision in ("fp32", "bf16"):
        cfg = parse_run_config(tiny_config(tmp, strategy={"name": "simplecil"}, precision=precision))
        inputs = prepare_inputs(cfg, want_features=True)
        assert inputs.setup["feature_cache"] == "miss"  # bf16 never reuses the fp32 features
        keys |= {p.name for p in (tmp / "cache" / "features").iterdir()}
    assert len(keys) == 2


def test_absent_devices_are_refused(tmp: Path):
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device: 'cuda' requested but no CUDA device"):
            resolve_device("cuda")
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")


def test_autocast_forward_returns_float32_and_survives_a_deep_copy():
    import copy

    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", channels=(8, 16, 16, 16), stem_width=8, num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        autocast_forward(model, torch.device("cpu"))
        out = model(x)
        assert out.dtype == torch.float32 and not torch.equal(out, plain)  # computed in bf16, handed back as fp32
        torch.testing.assert_close(out, plain, rtol=0.05, atol=0.05)
        twin = copy.deepcopy(model)  # ConFiT keeps such a copy as its reference extractor
        for p in twin.parameters():
            p.mul_(2)
        assert not torch.allclose(twin(x), model(x))  # the copy runs its own weights, not the original's
        assert torch.equal(model(x), out)


def test_an_absent_mps_device_is_refused(tmp: Path):
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(ConfigError, match="device: 'mps' requested but no MPS device"):
        resolve_device("mps")
