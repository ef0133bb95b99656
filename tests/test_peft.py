"""The PEFT library: a matrix over every registered method on a tiny ViT (and a tiny ResNet).

Per method: forward/backward with gradients only in the module, identity at init where the method
says so, detach restores the backbone, merge equivalence and exact unmerge, pack/unpack round trip,
the parameter-count formula on the tiny model, and the counts on ViT-B/16 against the papers.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from cl.errors import ConfigError
from cl.peft import bank, build_peft
from cl.peft.consolidator import shuffle_perm
from cl.peft.quant import LEVEL, dequantize_1bit, fake_quant_1bit, pack_bits, packed_bytes, quantize_1bit, unpack_bits
from cl.registry import PEFT

D, DEPTH, HIDDEN = 64, 2, 256  # tiny ViT: 32x32 images, 8x8 patches -> 4x4 grid + CLS

VIT_CASES = {
    "adapter": {"bottleneck": 4},
    "adapter_seq": {"name": "adapter", "placement": "sequential", "bottleneck": 4},
    "lora": {"rank": 4},
    "lora_qv": {"name": "lora", "rank": 4, "targets": "qv"},
    "vpt_deep": {"name": "vpt", "tokens": 3},
    "vpt_shallow": {"name": "vpt", "tokens": 3, "deep": False},
    "ssf": {},
    "bitfit": {},
    "convpass": {"dim": 4},
    "fact_tt": {"name": "fact", "rank": 4},
    "fact_tk": {"name": "fact", "format": "tk", "rank": 4},
    "consolidator": {},
    "kadaptation": {"n": 8},
    "adapter_1bit": {"name": "adapter", "bits": 1, "bottleneck": 4},
}
RESNET_CASES = {"conv_adapter": {"reduction": 2}, "bitfit_resnet": {"name": "bitfit"}}

# trainable-parameter formulas on the tiny models (d = 64, depth 2, MLP 256, m = bottleneck)
EXPECTED_COUNTS = {
    "adapter": DEPTH * (2 * D * 4 + 4 + D),
    "adapter_seq": DEPTH * (2 * D * 4 + 4 + D),
    "lora": DEPTH * (D * 4 + 4 * 3 * D),
    "lora_qv": DEPTH * 2 * (D * 4 + 4 * D),
    "vpt_deep": DEPTH * 3 * D,
    "vpt_shallow": 3 * D,
    "ssf": 2 * (D + DEPTH * (D + 3 * D + D + D + HIDDEN + D) + D),
    "bitfit": D + DEPTH * (D + 3 * D + D + D + HIDDEN + D) + D,
    "convpass": DEPTH * 2 * (D * 4 + 4 + 9 * 16 + 4 + 4 * D + D),
    "fact_tt": 2 * D * 4 + DEPTH * (4 + 2 * 4) * 16,
    "fact_tk": 2 * D * 4 + 4**3 + DEPTH * (4 + 2 * 4) * 4,
    "consolidator": DEPTH * ((3 * D * D + D * D + 2 * HIDDEN * D) // (D // 2) + 3 * D + D + HIDDEN + D),
    "kadaptation": DEPTH * (2 * 8 * 2 * (D // 8) + D) + 2 * 8 * 2 * 8,
    "adapter_1bit": DEPTH * (2 * D * 4 + 4 + D),
}


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=D, depth=DEPTH, num_heads=2,
                              mlp_ratio=HIDDEN / D, num_classes=0)
    return model.eval().requires_grad_(False)


def tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    # zero_init_last would zero every residual branch and with it all gradients of adapters inside
    return timm.create_model("resnet18", channels=(8, 16, 16, 16), stem_width=8, num_classes=0, zero_init_last=False).eval().requires_grad_(False)


def make(case: str, model: nn.Module):
    options = {**VIT_CASES, **RESNET_CASES}[case]
    name = options.get("name", case)
    cfg = PEFT.entry(name).config.model_validate({**options, "name": name})
    torch.manual_seed(1)
    return build_peft(cfg, model)


def model_for(case: str) -> nn.Module:
    return tiny_resnet() if case in RESNET_CASES else tiny_vit()


def inputs(case: str) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(4, 3, 32, 32)


def perturb(method: nn.Module) -> None:
    """Move every module parameter away from its init, as training would."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def forward_with(method, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    method.attach(model)
    try:
        return model(x)
    finally:
        method.detach()


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


ALL = sorted({**VIT_CASES, **RESNET_CASES})


def test_every_registered_method_is_in_the_matrix():
    names = {o.get("name", c) for c, o in {**VIT_CASES, **RESNET_CASES}.items()}
    assert names == set(PEFT.names())


@pytest.mark.parametrize("case", ALL)
def test_gradients_reach_only_the_module(case: str):
    model, x = model_for(case), inputs(case)
    method = make(case, model).attach(model)
    method.train()
    out = model(x)
    out.square().mean().backward()
    assert all(p.grad is None for p in model.parameters())
    grads = [p.grad for p in method.parameters()]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("case", ALL)
def test_identity_at_init_and_detach_restores(case: str):
    model, x = model_for(case), inputs(case)
    plain = model(x)
    method = make(case, model).eval().attach(model)
    attached = model(x)
    if method.identity_at_init():
        torch.testing.assert_close(attached, plain, rtol=0, atol=1e-6)
    else:
        assert not torch.allclose(attached, plain, atol=1e-6)
    method.detach()
    assert hook_count(model) == 0
    assert torch.equal(model(x), plain)


def test_identity_claims_match_the_papers():
    vit = tiny_vit()
    identity = {c for c in VIT_CASES if make(c, vit).identity_at_init()}
    assert identity == {"adapter", "lora", "lora_qv", "bitfit", "convpass", "fact_tt", "fact_tk", "kadaptation"}


@pytest.mark.parametrize("case", [c for c in ALL if PEFT.get({**VIT_CASES, **RESNET_CASES}[c].get("name", c)).mergeable])
def test_merge_equals_unmerged_and_unmerge_is_exact(case: str):
    model, x = model_for(case), inputs(case)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    method = make(case, model)
    perturb(method)
    method.eval().attach(model)
    unmerged = model(x)
    method.merge(model)
    assert hook_count(model) == 0  # the plain timm model: no hooks, same modules and keys
    assert set(model.state_dict()) == set(original)
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-5)
    method.unmerge(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=0)
    method.detach()


@pytest.mark.parametrize("case", [c for c in ALL if not PEFT.get({**VIT_CASES, **RESNET_CASES}[c].get("name", c)).mergeable])
def test_unmergeable_methods_refuse_to_merge(case: str):
    model = model_for(case)
    with pytest.raises(ValueError, match="not mergeable"):
        make(case, model).merge(model)


@pytest.mark.parametrize("case", ALL)
def test_pack_unpack_round_trip(case: str, tmp_path: Path):
    model, x = model_for(case), inputs(case)
    method = make(case, model)
    perturb(method)
    method.eval()
    packed = bank.pack(method)
    bank.save(packed, tmp_path / "task0.safetensors", method.cfg.model_dump())
    loaded, config = bank.load(tmp_path / "task0.safetensors")
    assert config == method.cfg.model_dump()
    fresh = make(case, model)
    bank.unpack(fresh, loaded)
    fresh.eval()
    if method.cfg.bits == 32:
        assert all(torch.equal(a, b) for a, b in zip(method.state_dict().values(), fresh.state_dict().values()))
        assert bank.packed_nbytes(packed) == 4 * method.num_parameters()
    else:
        assert bank.packed_nbytes(packed) < method.num_parameters()  # ~1 bit per weight + float vectors
    # after loading, the forward is what the (1-bit fake-quantised) forward computed during training
    torch.testing.assert_close(forward_with(fresh, model, x), forward_with(method, model, x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", sorted(EXPECTED_COUNTS))
def test_parameter_count_formula_on_the_tiny_vit(case: str):
    assert make(case, tiny_vit()).num_parameters() == EXPECTED_COUNTS[case]


def test_conv_adapter_count_formula_on_resnet50():
    model = timm.create_model("resnet50", num_classes=0)
    widths = [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3  # each bottleneck's 3x3 conv width
    for g in (1, 8):
        cfg = PEFT.entry("conv_adapter").config.model_validate({"name": "conv_adapter", "reduction": g})
        assert build_peft(cfg, model).num_parameters() == sum(9 * w + w * w // g + w for w in widths)
    assert 0.19e6 < sum(9 * w + w * w // 8 + w for w in widths) < 0.21e6  # the paper code's 0.20M


# the spec's table (papers' numbers) on ViT-B/16, within 5%
VIT_B16 = [
    ("adapter", {"bottleneck": 8}, 0.16e6),
    ("lora", {"rank": 8}, 0.29e6),
    ("lora", {"rank": 8, "targets": "qv"}, 0.29e6),
    ("vpt", {"tokens": 50}, 0.46e6),
    ("ssf", {}, 0.21e6),
    ("bitfit", {}, 0.10e6),
    ("convpass", {"dim": 8}, 0.33e6),
    ("fact", {}, 0.04e6),
    ("consolidator", {}, 0.30e6),
    ("kadaptation", {}, 0.05e6),
]


def test_counts_on_vit_b16_match_the_papers():
    model = timm.create_model("vit_base_patch16_224", num_classes=0)
    for name, options, paper in VIT_B16:
        cfg = PEFT.entry(name).config.model_validate({"name": name, **options})
        n = build_peft(cfg, model).num_parameters()
        assert abs(n - paper) / paper <= 0.05, (name, options, n, paper)


def test_incompatible_backbones_are_one_line_errors():
    with pytest.raises(ConfigError, match="'conv_adapter' applies to resnet backbones, not VisionTransformer"):
        make("conv_adapter", tiny_vit())
    with pytest.raises(ConfigError, match="'lora' applies to vit backbones, not ResNet"):
        make("lora", tiny_resnet())
    cfg = PEFT.entry("vpt").config.model_validate({"name": "vpt", "bits": 1})
    with pytest.raises(ConfigError, match="1-bit storage is not defined for 'vpt'"):
        build_peft(cfg, tiny_vit())


# ---- pieces with hand-computed values ----------------------------------------------------------


def test_one_bit_quantiser_by_hand():
    w = torch.tensor([[1.0, 3.0], [5.0, 7.0]])  # mean 4, population std sqrt(5)
    signs, mu, sigma = quantize_1bit(w)
    assert signs.tolist() == [[False, False], [True, True]] and mu == 4.0 and math.isclose(sigma, math.sqrt(5), rel_tol=1e-6)
    expected = torch.tensor([[4 - LEVEL * 5**0.5] * 2, [4 + LEVEL * 5**0.5] * 2])
    torch.testing.assert_close(dequantize_1bit(signs, mu, sigma), expected)
    w.requires_grad_(True)
    q = fake_quant_1bit(w)
    torch.testing.assert_close(q.detach(), expected)
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight-through
    assert math.isclose(LEVEL, 0.6745, abs_tol=1e-4)


def test_bit_packing_round_trip_and_size():
    signs = torch.rand(3, 37, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bits(signs)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(111 / 8)
    assert torch.equal(unpack_bits(packed, (3, 37)), signs)
    assert packed_bytes(111) == 14 + 8


def test_channel_shuffle_order():
    assert shuffle_perm(8, 4).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]  # group c gets channels c and c+4


def test_lora_qv_touches_only_query_and_value_rows():
    model, x = tiny_vit(), inputs("lora")
    method = make("lora_qv", model)
    perturb(method)
    merged = method.merged_weights(model)
    w0 = model.blocks[0].attn.qkv.weight
    w1 = merged["blocks.0.attn.qkv.weight"]
    assert not torch.equal(w1[:D], w0[:D]) and torch.equal(w1[D : 2 * D], w0[D : 2 * D]) and not torch.equal(w1[2 * D :], w0[2 * D :])


def test_vpt_keeps_the_token_layout_for_pooling():
    model = tiny_vit()
    method = make("vpt_deep", model).eval().attach(model)
    feats = model.forward_features(inputs("vpt_deep"))
    assert feats.shape[1] == 1 + 16  # prompts removed after the final norm
    method.detach()
