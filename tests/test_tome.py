"""Token merging (cl.models.tome): matching, size-weighted merging, proportional attention, pooling,
bit-identity at r = 0 and that PEFT hooks keep working under the block wrapper."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from cl.errors import ConfigError
from cl.models.tome import (
    TokenMerging, bipartite_matching, max_merge, merge_weighted, proportional_bias, token_schedule, tome_support_error,
)

KW = {"img_size": 28, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4, "num_classes": 0}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is as fast, and far faster on a shared, oversubscribed CPU."""
    from cl.utils import torch_threads

    with torch_threads(1):
        yield


def vit(**kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **{**KW, **kw}).eval()


@pytest.fixture(scope="module")
def model():
    return vit()


X = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fused", [True, False])
def test_r0_is_bit_identical_to_timm(fused: bool):
    m = vit()
    for blk in m.blocks:
        blk.attn.fused_attn = fused  # both of timm's attention paths (SDPA and the explicit softmax)
    ref = m(X)
    with TokenMerging(m, r=0) as t:
        out = m(X)
        assert t.tokens_per_block == [50] * 4 and t.sizes is None
    assert torch.equal(out, ref)
    assert "forward" not in vars(m.blocks[0]) and "pool" not in vars(m)  # detached: timm's own methods again
    assert torch.equal(m(X), ref)


@pytest.mark.parametrize("r", [1, 8, 13, 30])
def test_tokens_per_block_and_exact_sizes(model, r: int):
    with TokenMerging(model, r=r) as t:
        out = model.forward_features(X)
        expected = token_schedule(50, 4, r)
        assert t.tokens_per_block == expected[:-1]
        assert out.shape[1] == expected[-1]
        sizes = t.sizes
        assert sizes.shape == (3, expected[-1], 1)
        assert torch.equal(sizes.sum(dim=1), torch.full((3, 1), 50.0))  # exact: integers in float
        assert torch.equal(sizes, sizes.round()) and (sizes >= 1).all()
        assert torch.equal(sizes[:, 0], torch.ones(3, 1))  # the class token is never merged


def test_cap_is_half_of_the_non_class_tokens():
    assert max_merge(197, True) == 98 and max_merge(50, True) == 24 and max_merge(49, False) == 24
    # ViT-B/16 with r = 16: the official schedule, whose last block is capped at 10
    sched = token_schedule(197, 12, 16)
    assert sched[-2] == 21 and sched[-2] - sched[-1] == 10
    assert token_schedule(50, 4, 30) == [50, 26, 14, 8, 5]


def test_matching_and_weighted_merge_by_hand():
    # 5 tokens: A = {0 (cls), 2, 4}, B = {1, 3}. Token 2 is most similar to 3, token 4 to 1 (less so).
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.1], [0.2, 1.0]]])
    plan = bipartite_matching(metric, 1, class_token=True)
    assert plan.r == 1 and plan.src.flatten().tolist() == [1] and plan.dst.flatten().tolist() == [1]  # A[1]=token 2 -> B[1]=token 3
    assert plan.unmerged.flatten().tolist() == [0, 2]  # cls and token 4 kept, in order
    x = torch.arange(10.0).reshape(1, 5, 2)
    size = torch.tensor([[[1.0], [2.0], [3.0], [1.0], [1.0]]])
    merged, new_size = merge_weighted(x, size, plan)
    assert new_size.flatten().tolist() == [1.0, 1.0, 2.0, 4.0]  # cls, token 4, B: token 1, token 3 (+ token 2)
    expected_3 = (3.0 * x[0, 2] + 1.0 * x[0, 3]) / 4.0
    assert torch.allclose(merged[0, 3], expected_3) and torch.equal(merged[0, :3], x[0, [0, 4, 1]])
    # r = 2 merges token 4 into token 1 as well
    plan2 = bipartite_matching(metric, 2, class_token=True)
    merged2, size2 = merge_weighted(x, size, plan2)
    assert size2.flatten().tolist() == [1.0, 3.0, 4.0]
    assert torch.allclose(merged2[0, 1], (2.0 * x[0, 1] + 1.0 * x[0, 4]) / 3.0)


def test_class_token_row_is_protected():
    metric = torch.ones(2, 7, 4)  # every pair equally similar: only the -inf row keeps cls apart
    plan = bipartite_matching(metric, 3, class_token=True)
    assert plan.r == 3 and 0 not in plan.src.flatten().tolist() and plan.unmerged[:, 0, 0].tolist() == [0, 0]
    assert bipartite_matching(metric, 0, True) is None


def test_proportional_attention_by_hand(model):
    # one block, explicit softmax: the attention of a block given sizes equals softmax(qk/sqrt(h) + log s) v
    from cl.models.tome import _attention

    attn = model.blocks[0].attn
    x = torch.randn(2, 5, 64)
    size = torch.tensor([1.0, 2.0, 3.0, 1.0, 4.0]).reshape(1, 5, 1).expand(2, 5, 1)
    out, metric = _attention(attn, x, size)
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = (t.reshape(2, 5, 4, 16).transpose(1, 2) for t in qkv.split(64, dim=-1))
    logits = q @ k.transpose(-1, -2) / math.sqrt(16) + torch.log(size)[:, None, None, :, 0]
    ref = (logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 64) @ attn.proj.weight.T + attn.proj.bias
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(metric, k.mean(dim=1), atol=1e-6)
    assert proportional_bias(None) is None and proportional_bias(size).shape == (2, 1, 1, 5)


def test_avg_pooling_weights_tokens_by_size():
    m = vit(global_pool="avg", class_token=False, fc_norm=False)
    with TokenMerging(m, r=8) as t:
        tokens = m.forward_features(X)
        pooled = m.forward_head(tokens, pre_logits=True)
        size = t.sizes
    assert size.shape[1] == tokens.shape[1] and torch.equal(size.sum(1), torch.full((3, 1), 49.0))
    assert torch.allclose(pooled, (tokens * size).sum(1) / 49.0, atol=1e-6)
    assert not torch.allclose(pooled, tokens.mean(1), atol=1e-4)  # timm's unweighted mean differs
    with TokenMerging(m, r=0):  # nothing merged: timm's own pooling
        assert torch.equal(m(X), vit(global_pool="avg", class_token=False, fc_norm=False)(X))


def test_token_pooling_reads_the_class_token(model):
    with TokenMerging(model, r=8):
        tokens = model.forward_features(X)
        assert torch.equal(model.forward_head(tokens, pre_logits=True), tokens[:, 0])


def test_no_gradient_through_matching_but_through_tokens(model):
    m = vit()
    m.requires_grad_(True)
    x = X.clone().requires_grad_(True)
    with TokenMerging(m, r=8):
        m(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and m.blocks[0].attn.qkv.weight.grad is not None
    metric = torch.randn(1, 9, 4, requires_grad=True)
    plan = bipartite_matching(metric, 2, True)
    assert not plan.src.requires_grad


def test_peft_hooks_on_qkv_and_mlp_keep_working(model):
    """A forward hook on qkv / fc2 changes the merged model's output as it changes timm's."""
    calls = []
    handles = [model.blocks[1].attn.qkv.register_forward_hook(lambda mod, a, o: calls.append("qkv") or o * 1.5),
               model.blocks[2].mlp.fc2.register_forward_hook(lambda mod, a, o: calls.append("fc2") or o + 0.1)]
    try:
        with TokenMerging(model, r=0):
            hooked = model(X)
        plain = model(X)
    finally:
        for h in handles:
            h.remove()
    assert calls == ["qkv", "fc2"] * 2 and torch.equal(hooked, plain)
    assert not torch.allclose(model(X), plain)


def test_changing_r_while_attached_and_a_context(model):
    t = TokenMerging(model, r=2).attach()
    try:
        model(X)
        assert t.tokens_per_block == [50, 48, 46, 44]
        with t.at(10):
            model(X)
            assert t.tokens_per_block == [50, 40, 30, 20]
        model(X)
        assert t.tokens_per_block == [50, 48, 46, 44]
        with pytest.raises(RuntimeError):
            t.attach()
    finally:
        t.detach()


def test_training_mode_dropout_free_model_matches_eval(model):
    with TokenMerging(model, r=6):
        a = model(X)
        model.train()
        b = model(X)
        model.eval()
    assert torch.allclose(a, b, atol=1e-6)


def test_refuses_models_it_cannot_merge():
    resnet = timm.create_model("resnet18", num_classes=0)
    assert "VisionTransformer" in tome_support_error(resnet)
    with pytest.raises(ConfigError, match="backbone.tome"):
        TokenMerging(resnet, r=2)
    assert "register" in tome_support_error(vit(reg_tokens=2))
    with pytest.raises(ConfigError, match="r must be >= 0"):
        TokenMerging(vit(), r=-1)


def test_sdpa_with_bias_matches_explicit_softmax():
    m = vit()
    with TokenMerging(m, r=8):
        fused = m(X)
        for blk in m.blocks:
            blk.attn.fused_attn = False
        explicit = m(X)
    assert torch.allclose(fused, explicit, atol=1e-5)
    assert F.cosine_similarity(fused, m(X)).min() > 0.5  # merging 8 of 49 patches per block stays close to the full model
