"""ToCom (cl.models.tocom): the chunked low-rank maths, exact merging into qkv, self-distillation,
caching and provenance, the backbone.tome section (run identity, feature cache) and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from cl.cli import main
from cl.config import CompensatorConfig, ConfigError, TomeConfig, parse_run_config
from cl.data.transforms import BatchTransform
from cl.engine.rundir import result_config, result_hash
from cl.models.tocom import (
    TokenCompensator, TomeRuntime, chunk_mask, delta_weight, draw_pair, load_compensator, save_compensator, soft_kl,
    tocom_num_parameters, train_compensator,
)
from cl.models.tome import TokenMerging
from tests.conftest import tiny_config, write_yaml

KW = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 0}
VIT = {"name": "vit_tiny_patch16_224", "kwargs": {k: v for k, v in KW.items() if k != "num_classes"},
       "weights": {"source": "pretrain", "pretrain": {"epochs": 2, "batch_size": 32}}}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is as fast, and far faster on a shared, oversubscribed CPU."""
    from cl.utils import torch_threads

    with torch_threads(1):
        yield


def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **KW).eval()


def random_compensator(model, r_max=4, dim=2, seed=0):
    comp = TokenCompensator.for_model(model, r_max, dim, dropout=0.0)
    with torch.no_grad():
        comp.up.copy_(torch.randn(comp.up.shape, generator=torch.Generator().manual_seed(seed)) * 0.2)
    return comp.eval()


def test_chunk_masks_and_delta_by_hand():
    assert chunk_mask(0, 4, 2).tolist() == [0] * 8
    assert chunk_mask(1, 4, 2).tolist() == [0] * 6 + [1, 1]
    assert chunk_mask(3, 4, 2).tolist() == [0, 0] + [1] * 6
    with pytest.raises(ValueError):
        chunk_mask(5, 4, 2)
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(5, 8, generator=g), torch.randn(8, 3, generator=g)
    # 1 -> 3 switches on chunks 2 and 3, i.e. channels 2..5 (the last 2*3 minus the last 2*1)
    assert torch.allclose(delta_weight(up, down, 1, 3, 4, 2), up[:, 2:6] @ down[2:6], atol=1e-6)
    assert torch.allclose(delta_weight(up, down, 3, 1, 4, 2), -up[:, 2:6] @ down[2:6], atol=1e-6)


def test_delta_is_additive_and_zero_on_the_diagonal():
    g = torch.Generator().manual_seed(1)
    up, down = torch.randn(6, 12, generator=g), torch.randn(12, 6, generator=g)
    d = lambda a, b: delta_weight(up, down, a, b, 4, 3)  # noqa: E731
    for a, b, c in [(0, 2, 4), (3, 1, 2), (4, 0, 1), (2, 2, 3)]:
        assert torch.allclose(d(a, b) + d(b, c), d(a, c), atol=1e-5)
    assert all(torch.equal(d(a, a), torch.zeros(6, 6)) for a in range(5))


def test_parameter_count_on_vit_b16_shapes():
    assert tocom_num_parameters(12, 768, 16, 2) == 1_179_648
    comp = TokenCompensator(12, 768, 16, 2)
    assert sum(p.numel() for p in comp.parameters()) == 1_179_648 and comp.down.shape[2] == 32
    assert torch.equal(comp.up, torch.zeros_like(comp.up))  # zero-init: a fresh compensator changes nothing


def test_soft_kl_matches_a_numpy_reference():
    s, t = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]), torch.tensor([[0.5, 1.0, 1.0], [2.0, 0.0, 1.0]])
    for tau in (1.0, 2.0):
        ps, pt = (np.exp(a / tau) / np.exp(a / tau).sum(1, keepdims=True) for a in (s.numpy(), t.numpy()))
        ref = (pt * (np.log(pt) - np.log(ps))).sum() * tau * tau / s.numel()
        assert soft_kl(s, t, tau).item() == pytest.approx(ref, rel=1e-5)
    assert soft_kl(s, s).item() == pytest.approx(0.0, abs=1e-7)


def test_pairs_are_distinct_and_cover_every_ordered_pair():
    g = torch.Generator().manual_seed(0)
    pairs = [draw_pair(3, g) for _ in range(2400)]
    assert all(a != b and 0 <= a <= 3 and 0 <= b <= 3 for a, b in pairs)
    counts = {p: pairs.count(p) for p in set(pairs)}
    assert len(counts) == 12 and min(counts.values()) > 140 and max(counts.values()) < 260  # 200 expected each


def test_branch_leaves_keys_untouched_and_adds_s_delta():
    m = vit()
    comp = random_compensator(m).attach(m)
    comp.pair, comp.scale = (1, 3), 0.5
    x = torch.randn(2, 5, 32)
    qkv = m.blocks[0].attn.qkv
    out = qkv(x)
    comp.detach()
    plain = qkv(x)
    dq, dv = comp.delta(0, 1, 3)
    assert torch.equal(out[..., 32:64], plain[..., 32:64])
    assert torch.allclose(out[..., :32], plain[..., :32] + 0.5 * x @ dq.T, atol=1e-5)
    assert torch.allclose(out[..., 64:], plain[..., 64:] + 0.5 * x @ dv.T, atol=1e-5)


@pytest.mark.parametrize("r_s,r_t", [(0, 3), (4, 1)])
def test_merged_weights_equal_the_hooked_compensator(r_s: int, r_t: int):
    m = vit()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    comp = random_compensator(m)
    with TokenMerging(m, r=r_t):
        comp.attach(m)
        comp.pair, comp.scale = (r_s, r_t), 0.1
        hooked = m(x)
        comp.detach()
        plain = m(x)
        merged = comp.merged_qkv(m, r_s, r_t, 0.1)
        backup = {k: v.clone() for k, v in m.state_dict().items()}
        m.load_state_dict(merged, strict=False)
        folded = m(x)
        m.load_state_dict(backup)
    assert torch.allclose(folded, hooked, atol=1e-5) and not torch.allclose(hooked, plain, atol=1e-4)


def test_runtime_phases_switch_r_and_the_compensator():
    m = vit()
    comp = random_compensator(m)
    rt = TomeRuntime(m, TomeConfig(r_train=0, r_eval=3, scale=0.1, compensator=CompensatorConfig(r_max=4)), comp, "abc")
    x = torch.randn(2, 3, 16, 16)
    try:
        m(x)
        assert rt.tome.tokens_per_block == [17, 17] and comp.pair == (0, 0)
        with rt.phase("eval"):
            m(x)
            assert rt.tome.tokens_per_block == [17, 14] and comp.pair == (0, 3)
        assert rt.current == "train" and rt.key()["compensator"] == "abc"
    finally:
        rt.detach()


def _images(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8), torch.arange(n) % 3


def _gap(m, comp, x, transform, loss: str, head=None) -> float:
    """Mean distillation loss over every ordered pair of rates on fixed images (dropout off)."""
    from torch.nn.functional import mse_loss

    total, pairs = 0.0, [(a, b) for a in range(5) for b in range(5) if a != b]
    with torch.no_grad(), TokenMerging(m) as tome:
        comp.eval().attach(m)
        for r_s, r_t in pairs:
            tome.r, comp.pair = r_s, (r_s, r_s)
            teacher = m(transform(x))
            tome.r, comp.pair = r_t, (r_s, r_t)
            student = m(transform(x))
            total += (soft_kl(head(student), head(teacher)) if loss == "kl" else mse_loss(student, teacher)).item()
        comp.detach()
    return total / len(pairs)


def test_distillation_reduces_the_merging_gap_and_leaves_the_backbone():
    from cl.utils import torch_threads

    m = vit()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x, y = _images(96)
    transform = BatchTransform(3, 3, None, (0.5,) * 3, (0.25,) * 3)
    ccfg = CompensatorConfig(r_max=4, dim=2, epochs=8, batch_size=16, lr=2e-2, weight_decay=0.0, dropout=0.0, loss="mse", augment=False)
    with torch_threads(1):
        comp, stats = train_compensator(m, x, y, transform, ccfg, torch.device("cpu"))
        untrained = _gap(m, TokenCompensator.for_model(m, 4, 2), x, transform, "mse")
        trained = _gap(m, comp, x, transform, "mse")
    assert len(stats["history"]) == 8 and all(np.isfinite(h["loss"]) for h in stats["history"])
    assert trained < 0.9 * untrained, (trained, untrained)  # measured: 21% lower
    assert comp.up.abs().sum() > 0 and all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert "forward" not in vars(m.blocks[0]) and not m.blocks[0].attn.qkv._forward_hooks  # everything removed


def test_kl_head_is_fitted_on_teacher_features():
    from cl.models.tocom import fit_head

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 3
    y = torch.arange(60) % 3
    feats = centres[y] + torch.randn(60, 8, generator=g) * 0.3
    head = fit_head(feats, y, seed=0, steps=100)
    assert (head(feats).argmax(1) == y).float().mean() == 1.0 and not any(p.requires_grad for p in head.parameters())


def test_file_roundtrip_and_refusal_for_another_backbone(tmp: Path):
    m = vit()
    comp = random_compensator(m)
    sha = save_compensator(tmp / "c.safetensors", comp, "a" * 64)
    again, sha2 = load_compensator(tmp / "c.safetensors", m, "a" * 64, CompensatorConfig(r_max=4))
    assert sha2 == sha and torch.equal(again.up, comp.up) and torch.equal(again.down, comp.down)
    with pytest.raises(Exception, match="trained for backbone sha256 aaaaaaaaaaaa"):
        load_compensator(tmp / "c.safetensors", m, "b" * 64, CompensatorConfig(r_max=4))
    with pytest.raises(ConfigError, match="r_max"):
        load_compensator(tmp / "c.safetensors", m, "a" * 64, CompensatorConfig(r_max=8))


# ---- config, identity, runs ---------------------------------------------------------------------


def run_cfg(tmp: Path, cache: Path, tome=None, **over):
    data = tiny_config(tmp, cache_dir=str(cache), backbone={**VIT, **({"tome": tome} if tome is not None else {})},
                       strategy={"name": "simplecil"}, train={"epochs": 1, "batch_size": 16}, num_threads=1, **over)
    return data


def test_tome_at_its_default_keeps_existing_run_identities(tmp: Path, shared_cache: Path):
    plain = parse_run_config(run_cfg(tmp, shared_cache))
    explicit = parse_run_config(run_cfg(tmp, shared_cache, tome=None) | {"backbone": {**VIT, "tome": None}})
    assert "tome" not in result_config(plain)["backbone"] and result_hash(plain) == result_hash(explicit)
    merged = parse_run_config(run_cfg(tmp, shared_cache, tome={"r_eval": 2}))
    assert result_config(merged)["backbone"]["tome"]["r_eval"] == 2 and result_hash(merged) != result_hash(plain)


@pytest.mark.parametrize("tome,message", [
    ({"r_eval": -1}, "backbone.tome.r_eval"),
    ({"r_train": 1, "r_eval": 9, "compensator": {"r_max": 8}}, "exceeds compensator.r_max"),
    ({"r_eval": 2, "scale": -0.1}, "backbone.tome.scale"),
])
def test_bad_tome_configs_are_one_line_errors(tmp: Path, shared_cache: Path, tome: dict, message: str):
    with pytest.raises(ConfigError, match=message) as err:
        parse_run_config(run_cfg(tmp, shared_cache, tome=tome))
    assert "\n" not in str(err.value)


def _cli(tmp: Path, name: str, data: dict, *args: str) -> int:
    return main([*args[:1], str(write_yaml(tmp / f"{name}.yaml", data)), *args[1:]])


def test_cli_trains_a_compensator_and_runs_with_it(tmp: Path, shared_cache: Path, capsys):
    comp = {"r_max": 4, "epochs": 1, "batch_size": 16}
    data = run_cfg(tmp, shared_cache, tome={"r_train": 0, "r_eval": 3, "compensator": comp})
    assert _cli(tmp, "c", data, "tocom", "--save", str(tmp / "mine.safetensors")) == 0
    line = capsys.readouterr().out.strip()
    assert "mine.safetensors sha256=" in line and "miss" in line and "loss per epoch" in line
    meta = json.loads(next((shared_cache / "tocom").glob("*.json")).read_text())
    assert meta["r_range"] == [0, 4] and meta["tocom"]["epochs"] == 1 and len(meta["history"]) == 1 and len(meta["backbone_sha256"]) == 64
    assert _cli(tmp, "c", data, "tocom") == 0 and "(hit;" in capsys.readouterr().out  # cached

    assert _cli(tmp, "r", data, "run") == 0
    metrics = json.loads(next((tmp / "runs").rglob("metrics.json")).read_text())
    assert 0.0 <= metrics["final_acc"] <= 1.0 and "+tocom:" in metrics["identity"]["weights"]
    env = json.loads(next((tmp / "runs").rglob("env.json")).read_text())
    assert "tome" in json.dumps(env)

    # the same run from the saved file: same compensator, same features, same accuracy
    by_file = run_cfg(tmp, shared_cache, tome={"r_train": 0, "r_eval": 3, "compensator": {**comp, "path": str(tmp / "mine.safetensors")}},
                      experiment="by_file")
    assert _cli(tmp, "f", by_file, "run") == 0
    again = json.loads(next((tmp / "runs" / "by_file").rglob("metrics.json")).read_text())
    assert again["final_acc"] == metrics["final_acc"]

    # a backbone with other weights refuses that file in one line
    other = run_cfg(tmp, shared_cache, tome={"r_train": 0, "r_eval": 3, "compensator": {**comp, "path": str(tmp / "mine.safetensors")}},
                    experiment="other", seed=1)
    capsys.readouterr()
    assert _cli(tmp, "o", other, "run") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "trained for backbone sha256" in err


def test_train_and_eval_features_differ_by_r_and_are_cached_apart(tmp: Path, shared_cache: Path):
    from cl.engine.loop import prepare

    plain = prepare(parse_run_config(run_cfg(tmp, shared_cache)))
    merged = prepare(parse_run_config(run_cfg(tmp, shared_cache, tome={"r_train": 0, "r_eval": 3})))
    p, m = plain.bench.experiences[0], merged.bench.experiences[0]
    assert torch.equal(p.train.x, m.train.x)  # r_train = 0: the unmerged features
    assert not torch.allclose(p.test.x, m.test.x)  # r_eval = 3: merged
    entries = {d.name for d in (shared_cache / "features").iterdir()}
    assert len(entries) >= 2


def test_validation_rows_are_seen_at_the_evaluation_rate(tmp: Path, shared_cache: Path):
    from cl.engine.loop import prepare

    val = {"validation": {"per_class": 3}}
    plain = prepare(parse_run_config(run_cfg(tmp, shared_cache, benchmark=val)))
    merged = prepare(parse_run_config(run_cfg(tmp, shared_cache, tome={"r_train": 0, "r_eval": 3}, benchmark=val)))
    p, m = plain.bench.experiences[1], merged.bench.experiences[1]
    assert torch.equal(p.train.x, m.train.x) and not torch.allclose(p.val.x, m.val.x)
    with merged.backbone.phase("eval"):  # the same numbers as an evaluation forward of those images
        ref = merged.backbone.model(merged.backbone.transform(merged.images.experiences[1].val.x[:4]))
    assert torch.allclose(m.val.x[:4], ref, atol=1e-5)


def test_tome_on_a_non_vit_backbone_is_refused_in_one_line(tmp: Path, shared_cache: Path, capsys):
    data = tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "simplecil"}, num_threads=1,
                       backbone={"name": "test_resnet", "weights": {"source": "pretrain", "pretrain": {"epochs": 2, "batch_size": 32}},
                                 "tome": {"r_eval": 2}})
    assert _cli(tmp, "n", data, "run") == 2
    err = capsys.readouterr().err.strip()
    assert "backbone.tome: token merging needs a timm VisionTransformer" in err and err.count("\n") == 0
    assert not (tmp / "runs").exists()


def test_peft_per_task_runs_at_other_train_and_eval_rates(tmp: Path, shared_cache: Path):
    data = run_cfg(tmp, shared_cache, tome={"r_train": 0, "r_eval": 2, "compensator": {"r_max": 4, "epochs": 1, "batch_size": 16}},
                   experiment="ppt")
    data["strategy"] = {"name": "peft_per_task", "lr": 0.01, "peft": {"name": "lora", "rank": 2}}
    data["train"] = {"epochs": 1, "batch_size": 16, "max_steps": 2}
    assert _cli(tmp, "p", data, "run") == 0
    metrics = json.loads(next((tmp / "runs" / "ppt").rglob("metrics.json")).read_text())
    assert len(metrics["acc_matrix"]) == 3


def test_token_inserting_peft_and_probes_are_refused(tmp: Path, shared_cache: Path):
    data = run_cfg(tmp, shared_cache, tome={"r_eval": 2})
    data["strategy"] = {"name": "peft_per_task", "peft": {"name": "vpt", "tokens": 2}}
    with pytest.raises(ConfigError, match="VPT's prompt tokens"):
        parse_run_config(data)
    with pytest.raises(ConfigError, match="shift.enabled"):
        parse_run_config(run_cfg(tmp, shared_cache, tome={"r_train": 2}, shift={"enabled": True}))
    m = vit()
    m.blocks[1].register_forward_pre_hook(lambda mod, args: (torch.cat([args[0], args[0][:, :1]], 1),))
    with TokenMerging(m, r=2), pytest.raises(ConfigError, match="block 1 receives 16 tokens where 15"):
        m(torch.randn(1, 3, 16, 16))
    m = vit()  # prompts inserted before the blocks (VPT, L2P)
    m.norm_pre.register_forward_hook(lambda mod, args, out: torch.cat([out[:, :1], out], 1))
    with TokenMerging(m, r=2), pytest.raises(ConfigError, match="receive 18 tokens for 17 image tokens"):
        m(torch.randn(1, 3, 16, 16))


def test_a_replaced_attention_forward_is_refused_under_token_merging():
    """Prefix tuning (DualPrompt, CODA-Prompt) replaces ``attn.forward``; merging would skip it."""
    import types

    m = vit()
    attn = m.blocks[0].attn
    attn.forward = types.MethodType(lambda self, x, **kw: x, attn)
    with TokenMerging(m, r=2), pytest.raises(ConfigError, match="prefix tuning"):
        m(torch.randn(1, 3, 16, 16))


def test_save_writes_the_file_even_when_the_cache_cannot_be_written(tmp: Path, shared_cache: Path, capsys, monkeypatch):
    """`cl tocom --save F` with an unwritable cache used to print F and exit 0 without writing F."""
    import errno

    import cl.models.tocom as tocom

    real = tocom.atomic_save

    def read_only_cache(path, write):  # noqa: ANN001, ANN202
        if Path(shared_cache) in Path(path).parents:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(path, write)

    monkeypatch.setattr(tocom, "atomic_save", read_only_cache)
    data = run_cfg(tmp, shared_cache, tome={"r_train": 0, "r_eval": 2, "compensator": {"r_max": 2, "dim": 1, "epochs": 1, "batch_size": 16}})
    dest = tmp / "saved.safetensors"
    with pytest.warns(UserWarning, match="could not cache the compensator"):
        assert _cli(tmp, "ro", data, "tocom", "--save", str(dest)) == 0
    assert "not written" in capsys.readouterr().out
    assert dest.is_file()
    by_file = run_cfg(tmp, shared_cache, tome={"r_train": 0, "r_eval": 2, "compensator": {"r_max": 2, "dim": 1, "path": str(dest)}}, experiment="saved")
    assert _cli(tmp, "sv", by_file, "run") == 0
    assert next((tmp / "runs" / "saved").rglob("metrics.json")).is_file()
    # --save onto the very file the compensator was read from is a no-op, not an error
    assert _cli(tmp, "sv2", by_file, "tocom", "--save", str(dest)) == 0 and dest.is_file()
    capsys.readouterr()
    assert _cli(tmp, "sv3", by_file, "tocom", "--save", str(tmp)) != 0  # a directory: one line naming it
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"Is a directory: {tmp}" in err
