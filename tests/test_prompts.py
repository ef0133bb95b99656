"""Prefix attention, DualPrompt and CODA-Prompt on a tiny ViT: the maths by hand, isolation, selection, CLI."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from cl.cli import main
from cl.config import ConfigError, parse_run_config
from cl.engine.loop import prepare
from cl.models.prefix import prefix_attention, prefixed
from cl.strategies.coda_prompt import CodaPrompt, component_weights, compose, gram_schmidt, ortho_penalty
from cl.strategies.dualprompt import DualPrompt, key_value, match_keys, parameter_counts, pull_term
from tests.conftest import tiny_config, write_yaml

VIT = {
    "name": "vit_tiny_patch16_224",
    "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
    "weights": {"source": "pretrain", "pretrain": {"epochs": 2, "batch_size": 32}},
}
DUAL = {"name": "dualprompt", "lr": 0.01, "g_layers": [0], "e_layers": [1], "g_length": 3, "e_length": 4}
CODA = {"name": "coda_prompt", "lr": 0.01, "components": 6, "length": 4, "layers": [0, 1]}


def config(tmp: Path, cache: Path, strategy: dict, **extra):
    return parse_run_config(tiny_config(tmp, cache_dir=str(cache), backbone=VIT, strategy=strategy, train={"epochs": 1, "batch_size": 16}, **extra))


def train_task(s, exp, epochs: int = 1):
    s.before_experience(exp)
    for epoch in range(epochs):
        for x, y in exp.train.batches(16, torch.Generator().manual_seed(epoch)):
            s.observe(x, y, exp.task_id)
    s.after_experience(exp)


def snapshot(params) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in params.items()}


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0).eval()


# ---- prefix attention --------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
def test_zero_length_prefix_is_timms_attention(vit, fused: bool):
    for block in vit.blocks:
        block.attn.fused_attn = fused
    x = torch.randn(3, 3, 16, 16)
    reference = vit(x)
    empty = torch.zeros(3, 0, 32)
    with prefixed(vit, {0: (empty, empty), 1: (empty, empty)}):
        out = vit(x)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    assert all("forward" not in vars(b.attn) for b in vit.blocks)  # timm's own forward again


def hand_attention(attn, x: np.ndarray, pk: np.ndarray, pv: np.ndarray, project: bool) -> np.ndarray:
    """Multi-head attention with prefixes, written out with numpy."""
    w, bias = attn.qkv.weight.detach().numpy(), attn.qkv.bias.detach().numpy()
    d, h = x.shape[-1], attn.num_heads
    hd = d // h
    qkv = x @ w.T + bias
    q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
    if project:
        pk, pv = pk @ w[d : 2 * d].T + bias[d : 2 * d], pv @ w[2 * d :].T + bias[2 * d :]
    k, v = np.concatenate([pk, k], axis=1), np.concatenate([pv, v], axis=1)
    out = np.zeros_like(q)
    for b in range(x.shape[0]):
        for i in range(h):
            s = slice(i * hd, (i + 1) * hd)
            logits = q[b, :, s] @ k[b, :, s].T / np.sqrt(hd)
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            out[b, :, s] = (p / p.sum(axis=1, keepdims=True)) @ v[b, :, s]
    return out @ attn.proj.weight.detach().numpy().T + attn.proj.bias.detach().numpy()


@pytest.mark.parametrize("project", [False, True])
def test_prefix_attention_matches_hand_written_attention(vit, project: bool):
    attn = vit.blocks[1].attn
    g = torch.Generator().manual_seed(1)
    x, pk, pv = torch.randn(2, 5, 32, generator=g), torch.randn(2, 3, 32, generator=g), torch.randn(2, 3, 32, generator=g)
    with torch.no_grad():
        out = prefix_attention(attn, x, pk, pv, project=project)
    expected = hand_attention(attn, x.numpy().astype(np.float64), pk.numpy().astype(np.float64), pv.numpy().astype(np.float64), project)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_prefixes_are_per_sample_and_module_hooks_still_fire(vit):
    x = torch.randn(2, 3, 16, 16)
    g = torch.Generator().manual_seed(2)
    pk, pv = torch.randn(2, 4, 32, generator=g), torch.randn(2, 4, 32, generator=g)
    with prefixed(vit, {1: (pk, pv)}):
        both = vit(x)
    for b in range(2):
        with prefixed(vit, {1: (pk[b : b + 1], pv[b : b + 1])}):
            torch.testing.assert_close(vit(x[b : b + 1]), both[b : b + 1], rtol=1e-5, atol=1e-5)
    calls = []
    handle = vit.blocks[1].attn.qkv.register_forward_hook(lambda m, a, out: calls.append(1) or out * 2)
    try:
        hooked = vit(x)
        empty = torch.zeros(2, 0, 32)
        with prefixed(vit, {1: (empty, empty)}):
            torch.testing.assert_close(vit(x), hooked, rtol=0, atol=1e-6)
    finally:
        handle.remove()
    assert len(calls) == 2 and not torch.allclose(hooked, vit(x))


# ---- DualPrompt: maths -------------------------------------------------------------------------


def test_dualprompt_parameter_counts_for_vit_b16():
    assert parameter_counts(768, 2, 5, 3, 5) == (15_360, 23_040)  # G-prompt; E-prompt per task (CIFAR)
    assert parameter_counts(768, 2, 5, 3, 20)[1] == 92_160  # ImageNet-R, L = 20
    assert parameter_counts(768, 2, 6, 3, 20, form="paper") == (2 * 6 * 768, 3 * 20 * 768)


def test_dualprompt_key_value_split_and_key_matching():
    code = torch.arange(2 * 3 * 4, dtype=torch.float).view(2, 3, 4)  # (2 = key/value, L = 3, d = 4)
    k, v = key_value(code, "code")
    assert torch.equal(k, code[0]) and torch.equal(v, code[1])
    paper = torch.arange(4 * 2, dtype=torch.float).view(4, 2)
    k, v = key_value(paper, "paper")
    assert torch.equal(k, paper[:2]) and torch.equal(v, paper[2:])
    query = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.1]])
    keys = torch.tensor([[3.0, 0.0], [0.0, 0.5], [-1.0, 0.0]])
    assert match_keys(query, keys).tolist() == [0, 1, 2]
    # cos(q_0, k_0) = 1, cos(q_1, k_0) = 0, cos(q_2, k_2) = 1 / |(-1, 0.1)|
    assert pull_term(query, keys[[0, 0, 2]]).item() == pytest.approx(np.mean([1.0, 0.0, 1 / np.hypot(1.0, 0.1)]))


# ---- DualPrompt: behaviour ---------------------------------------------------------------------


def test_dualprompt_shapes_layers_and_config_errors(tmp: Path, shared_cache: Path):
    prep = prepare(config(tmp, shared_cache, {**DUAL, "e_layers": [1, 5]}))
    s, ctx = prep.strategy, prep.strategy.ctx
    assert s.g_layers == [0] and s.e_layers == [1] and s.pool_size == 3
    g_count, e_count = parameter_counts(32, 1, 3, 1, 4)
    assert s.prompts["g"].numel() == g_count and s.prompts["e2"].numel() == e_count and s.prompts["key2"].shape == (32,)
    paper = DualPrompt(config(tmp, shared_cache, {**DUAL, "prefix_form": "paper", "g_length": 2}).strategy, ctx)
    assert paper.prompts["g"].shape == (1, 2, 32) and paper.prompts["e0"].shape == (1, 4, 32)
    inputs = ctx.backbone.transform(prep.bench.experiences[0].test.x[:3], ctx.device)
    g, e = paper.prompts["g"][0].expand(3, -1, -1), paper.prompts["e0"][0].expand(3, -1, -1)
    with torch.no_grad(), prefixed(paper.model, {0: (g[:, :1], g[:, 1:]), 1: (e[:, :2], e[:, 2:])}, project=True):
        expected = paper.model(inputs) @ paper.prompts["head_weight"].T + paper.prompts["head_bias"]
    with torch.no_grad():
        torch.testing.assert_close(paper.logits(inputs, 0), expected)  # halves, projected by the block
    with pytest.raises(ConfigError, match=r"strategy.e_layers: \[2, 3, 4\] has no block below the model's depth 2"):
        DualPrompt(config(tmp, shared_cache, {**DUAL, "e_layers": [2, 3, 4]}).strategy, ctx)
    with pytest.raises(ConfigError, match="strategy.e_layers: overlaps g_layers"):
        config(tmp, shared_cache, {**DUAL, "e_layers": [0]})
    with pytest.raises(ConfigError, match="strategy.pool_size: 2 slots for 3 tasks"):
        config(tmp, shared_cache, {**DUAL, "pool_size": 2})
    with pytest.raises(ConfigError, match="backbone.trainable: dualprompt prompts a frozen backbone"):
        parse_run_config(tiny_config(tmp, backbone={**VIT, "trainable": "all"}, strategy=DUAL))
    with pytest.raises(ConfigError, match="strategy.prefix_form: 'paper' splits each prompt in halves"):
        config(tmp, shared_cache, {**DUAL, "prefix_form": "paper"})
    resnet = SimpleNamespace(model=timm.create_model("test_resnet", pretrained=False))
    with pytest.raises(ConfigError, match="'dualprompt' needs a timm ViT, not ResNet"):
        DualPrompt(config(tmp, shared_cache, DUAL).strategy, dataclasses.replace(ctx, backbone=resnet))


def test_dualprompt_selection_uses_only_the_frozen_query(tmp: Path, shared_cache: Path):
    prep = prepare(config(tmp, shared_cache, DUAL))
    s, exps = prep.strategy, prep.bench.experiences
    s.task_ranges = {0: exps[0].class_range, 1: exps[1].class_range, 2: exps[2].class_range}
    x = torch.cat([e.test.x[:4] for e in exps])
    inputs = s.ctx.backbone.transform(x, s.device)
    with torch.no_grad():
        frozen = s.model(inputs)
    torch.testing.assert_close(s.query(inputs), frozen, rtol=0, atol=0)
    with torch.no_grad():
        for t in range(3):
            s.prompts[f"key{t}"].copy_(frozen[4 * t])  # sample 4t is closest to key t
    chosen = s.infer_task(x)
    assert chosen[[0, 4, 8]].tolist() == [0, 1, 2]
    with torch.no_grad():
        for name in ("g", "e0", "e1", "e2"):
            s.prompts[name].mul_(-3.0).add_(1.0)  # prompts change, keys do not
    assert torch.equal(s.infer_task(x), chosen)
    assert torch.equal(s.predict_inferring(x)[1], chosen)


def test_dualprompt_mixed_batch_gets_each_samples_own_prompt(tmp: Path, shared_cache: Path):
    prep = prepare(config(tmp, shared_cache, DUAL))
    s, exps = prep.strategy, prep.bench.experiences
    for exp in exps:
        s.before_experience(exp)  # all three slots seen; prompts stay at their distinct random init
    x = torch.cat([e.test.x[:3] for e in exps])
    inputs = s.ctx.backbone.transform(x, s.device)
    with torch.no_grad():
        for t in range(3):
            s.prompts[f"key{t}"].copy_(s.query(inputs)[3 * t])
            s.prompts[f"e{t}"].normal_(generator=torch.Generator().manual_seed(t))
        scores, tasks = s.predict_inferring(x)
        assert len(set(tasks.tolist())) == 3
        for i, t in enumerate(tasks.tolist()):  # each row = that sample alone with its own E-prompt
            alone = s.logits(inputs[i : i + 1], t)[0]
            torch.testing.assert_close(scores[i, : s.seen_classes], alone[: s.seen_classes], rtol=1e-5, atol=1e-5)
            others = [u for u in range(3) if u != t]
            assert not torch.allclose(s.logits(inputs[i : i + 1], others[0])[0], alone, atol=1e-3)


def test_dualprompt_loss_by_hand_and_gradient_isolation(tmp: Path, shared_cache: Path):
    prep = prepare(config(tmp, shared_cache, {**DUAL, "pull": 0.7}))
    s, exps = prep.strategy, prep.bench.experiences
    train_task(s, exps[0])
    s.before_experience(exps[1])
    assert torch.equal(s.prompts["e1"], s.prompts["e0"]) and not torch.equal(s.prompts["key1"], s.prompts["key0"])  # prompt copied, key not
    x, y = exps[1].train.x[:8], exps[1].train.y[:8]
    loss, ce, pull = s.loss(x, y, 1)
    inputs = s.ctx.backbone.transform(x, s.device)
    logits = s.logits(inputs, 1).detach().double().numpy()
    lo, hi = exps[1].class_range
    z = logits[:, lo:hi]
    log_p = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
    ce_hand = -np.mean(log_p[np.arange(8), y.numpy() - lo])
    q, k = s.query(inputs).double().numpy(), s.prompts["key1"].detach().double().numpy()
    cos_hand = np.mean(q @ k / (np.linalg.norm(q, axis=1) * np.linalg.norm(k)))
    assert ce.item() == pytest.approx(ce_hand, rel=1e-5) and pull.item() == pytest.approx(cos_hand, rel=1e-5)
    assert loss.item() == pytest.approx(ce_hand - 0.7 * cos_hand, rel=1e-5)
    s.prompts.zero_grad(set_to_none=True)  # drop task 0's last gradients
    loss.backward()
    with_grad = {k for k, p in s.prompts.items() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {"g", "e1", "key1", "head_weight", "head_bias"}
    assert all(s.prompts[k].grad is None for k in ("e0", "key0", "e2", "key2"))


def test_dualprompt_old_prompts_bit_identical_and_backbone_frozen(tmp: Path, shared_cache: Path):
    prep = prepare(config(tmp, shared_cache, DUAL))
    s, exps = prep.strategy, prep.bench.experiences
    x = exps[0].test.x[:6]
    for t in (None, 0):
        before = s.predict(x, t)
        assert before.shape == (6, 6) and torch.isinf(before).all()
    backbone = snapshot(s.model.state_dict())
    train_task(s, exps[0])
    first = snapshot(s.prompts)
    aware = s.predict(x, 0)
    train_task(s, exps[1])
    assert torch.equal(s.prompts["e0"], first["e0"]) and torch.equal(s.prompts["key0"], first["key0"])
    assert not torch.equal(s.prompts["e1"], first["e1"]) and not torch.equal(s.prompts["g"], first["g"])
    assert all(torch.equal(v, s.model.state_dict()[k]) for k, v in backbone.items())
    lo, hi = exps[0].class_range
    assert torch.isfinite(aware[:, lo:hi]).all() and torch.isinf(aware[:, hi:]).all()
    scores, tasks = s.predict_inferring(x)
    assert set(tasks.tolist()) <= {0, 1} and torch.isfinite(scores[:, :4]).all() and torch.isinf(scores[:, 4:]).all()
    d = 32
    assert s.storage_bytes() == 4 * (2 * 3 * d + 2 * (2 * 4 * d + d) + 6 * d + 6)  # G, two tasks (E + key), head
    other = DualPrompt(config(tmp, shared_cache, DUAL).strategy, s.ctx)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=False))
    assert torch.equal(other.predict(x, None), s.predict(x, None))


# ---- CODA-Prompt: maths ------------------------------------------------------------------------


def test_coda_orthogonality_penalty_by_hand():
    m = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # M Mᵀ - I = [[0, 1], [1, 1]]
    assert ortho_penalty(m).item() == pytest.approx(3 / 4)
    p = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]], [[0.0, 0.0]]])  # flattened: diag(1, 4, 0) - I
    assert ortho_penalty(p).item() == pytest.approx((0 + 9 + 1) / 9)


def test_coda_component_weights_and_composition_by_hand():
    q = torch.tensor([[1.0, 2.0]])
    a = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    k = torch.tensor([[0.0, 3.0], [1.0, 1.0]])
    # q ⊙ A = [1, 2] and [2, 0]; cos with K: 2/√5, 2/(2·√2)
    alpha = component_weights(q, k, a)
    torch.testing.assert_close(alpha, torch.tensor([[2 / 5**0.5, 1 / 2**0.5]]))
    p = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)
    pk, pv = compose(alpha, p)
    full = alpha[0, 0] * p[0] + alpha[0, 1] * p[1]
    torch.testing.assert_close(pk[0], full[:2]) and torch.testing.assert_close(pv[0], full[2:])


def test_gram_schmidt_is_orthogonal_to_the_old_span():
    g = torch.Generator().manual_seed(0)
    old = torch.randn(4, 10, generator=g) + 2.0  # trained components: far from orthogonal
    new = gram_schmidt(old, 3, g)
    torch.testing.assert_close(new @ new.T, torch.eye(3), rtol=0, atol=1e-6)
    assert (new @ old.T).abs().max() < 1e-5
    with pytest.raises(ValueError, match="7 components cannot be orthogonal in 6 dimensions"):
        gram_schmidt(torch.randn(4, 6), 3, g)


# ---- CODA-Prompt: behaviour --------------------------------------------------------------------


def test_coda_slices_detached_old_bit_identical_new_orthogonal(tmp: Path, shared_cache: Path):
    prep = prepare(config(tmp, shared_cache, CODA))
    s, exps = prep.strategy, prep.bench.experiences
    x = exps[0].test.x[:6]
    assert torch.isinf(s.predict(x, None)).all()
    assert s.per_task == 2 and s.cfg.ortho_weight == 0.0
    s.before_experience(exps[0])
    assert torch.count_nonzero(s.pool["k0_t1"]) == 0  # later slices wait for their task
    torch.testing.assert_close(s.pool["k0_t0"] @ s.pool["k0_t0"].T, torch.eye(2), rtol=0, atol=1e-6)
    for xb, yb in exps[0].train.batches(16, torch.Generator().manual_seed(0)):
        s.observe(xb, yb, 0)
    s.after_experience(exps[0])
    first = snapshot(s.pool)
    s.before_experience(exps[1])
    for m, shape in (("k", (2, -1)), ("a", (2, -1)), ("p", (2, -1))):
        old, new = s.pool[f"{m}1_t0"].detach().reshape(shape), s.pool[f"{m}1_t1"].detach().reshape(shape)
        assert (new @ old.T).abs().max() < 1e-5 and not torch.allclose(old @ old.T, torch.eye(2), atol=1e-3)
    loss, ce, ortho = s.loss(exps[1].train.x[:8], exps[1].train.y[:8], 1)
    s.pool.zero_grad(set_to_none=True)  # drop task 0's last gradients
    loss.backward()
    for name, p in s.pool.items():
        trained_now = name.endswith("_t1") or name.startswith("head")
        assert (p.grad is not None) == trained_now, name  # old: detached, later: excluded
    s.pool.zero_grad()
    for xb, yb in exps[1].train.batches(16, torch.Generator().manual_seed(0)):
        s.observe(xb, yb, 1)
    s.after_experience(exps[1])
    assert all(torch.equal(s.pool[k], v) for k, v in first.items() if k.endswith("_t0"))
    assert any(not torch.equal(s.pool[k], v) for k, v in first.items() if k.endswith("_t1"))
    before = s.predict(x, None)
    with torch.no_grad():
        s.pool["p0_t2"].fill_(5.0)  # the untrained task's components take no part
    assert torch.equal(s.predict(x, None), before)
    assert torch.isfinite(before[:, :4]).all() and torch.isinf(before[:, 4:]).all()
    d, layers = 32, 2
    assert s.storage_bytes() == 4 * (layers * 4 * (4 * d + 2 * d) + 6 * d + 6)  # 2 tasks × 2 components (P, K, A), head
    other = CodaPrompt(config(tmp, shared_cache, CODA).strategy, s.ctx)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=False))
    assert torch.equal(other.predict(x, None), s.predict(x, None))


def test_coda_orthogonal_init_and_loss_by_hand(tmp: Path, shared_cache: Path):
    prep = prepare(config(tmp, shared_cache, {**CODA, "init": "orthogonal"}))
    s, exps = prep.strategy, prep.bench.experiences
    assert s.cfg.ortho_weight == 0.1
    p = torch.cat([s.pool[f"p0_t{t}"] for t in range(3)]).flatten(1)
    torch.testing.assert_close(p @ p.T, torch.eye(6), rtol=0, atol=1e-5)
    train_task(s, exps[0])
    s.before_experience(exps[1])
    x, y = exps[1].train.x[:8], exps[1].train.y[:8]
    loss, ce, ortho = s.loss(x, y, 1)
    expected = 0.0
    for layer in (0, 1):
        for m in ("k", "a", "p"):
            mat = torch.cat([s.pool[f"{m}{layer}_t0"], s.pool[f"{m}{layer}_t1"]]).detach().flatten(1).double().numpy()
            expected += np.mean((mat @ mat.T - np.eye(4)) ** 2)
    assert ortho.item() == pytest.approx(expected, rel=1e-5)
    logits, _ = s.forward(s.ctx.backbone.transform(x, s.device), 1, train_task=1)
    lo, hi = exps[1].class_range
    assert ce.item() == pytest.approx(F.cross_entropy(logits[:, lo:hi], y - lo).item(), rel=1e-6)
    assert loss.item() == pytest.approx(ce.item() + 0.1 * expected, rel=1e-5)


def test_coda_config_errors(tmp: Path, shared_cache: Path):
    ctx = prepare(config(tmp, shared_cache, CODA)).strategy.ctx
    with pytest.raises(ConfigError, match="strategy.components: 5 do not split evenly over 3 tasks"):
        config(tmp, shared_cache, {**CODA, "components": 5})
    with pytest.raises(ConfigError, match="strategy.components: 36 keys cannot be orthonormal in d=32"):
        CodaPrompt(config(tmp, shared_cache, {**CODA, "components": 36}).strategy, ctx)
    with pytest.raises(ConfigError, match="backbone.trainable: coda_prompt prompts a frozen backbone"):
        parse_run_config(tiny_config(tmp, backbone={**VIT, "trainable": "all"}, strategy=CODA))
    with pytest.raises(ConfigError, match=r"strategy.layers: \[4\] has no block below"):
        CodaPrompt(config(tmp, shared_cache, {**CODA, "layers": [4]}).strategy, ctx)


# ---- end to end through the CLI -----------------------------------------------------------------


@pytest.mark.parametrize("strategy", [DUAL, CODA], ids=["dualprompt", "coda_prompt"])
def test_cli_run_writes_metrics(tmp: Path, shared_cache: Path, strategy: dict):
    backbone = {**VIT, "weights": {"source": "none"}}  # a random ViT: the run, not the accuracy, is under test
    data = tiny_config(tmp, cache_dir=str(shared_cache), backbone=backbone, strategy=strategy, train={"epochs": 1, "batch_size": 16, "eval_future_tasks": False},
                       benchmark={"dataset": {"name": "synthetic", "n_classes": 6, "train_per_class": 8, "test_per_class": 4, "image_size": 16}})
    assert main(["run", str(write_yaml(tmp / "run.yaml", data))]) == 0
    metrics = json.loads(next((tmp / "runs").rglob("metrics.json")).read_text())
    assert metrics["final_avg_acc"] is not None
    if strategy["name"] == "dualprompt":
        assert metrics["task_inference_acc"] is not None
