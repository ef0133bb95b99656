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
from cl.peft.conv_adapter import adapted_convs
from cl.peft.quant import LEVEL, dequantize_1bit, fake_quant_1bit, pack_bits, packed_bytes, quantize_1bit, unpack_bits
from cl.peft.reported import BI_ADAPTFORMER_BYTES, REPORTED, VTAB_MEAN_HEAD
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
    "adapter_1bit_bias": {"name": "adapter", "bits": 1, "bottleneck": 4, "bias": True, "ste": "detached"},
    "consolidator_branches": {"name": "consolidator", "groups": [32, 16], "channel_shuffle": True},
    "convpass_1bit": {"name": "convpass", "dim": 4, "bits": 1},
    "lora_1bit": {"name": "lora", "rank": 4, "bits": 1},
}
RESNET_CASES = {
    "conv_adapter": {"reduction": 2},
    "conv_adapter_after_act": {"name": "conv_adapter", "reduction": 2, "bias": False, "basic_block": "after_act"},
    "bitfit_resnet": {"name": "bitfit"},
}

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
    "adapter_1bit": DEPTH * 2 * D * 4,  # Bi-AdaptFormer: no biases
    "adapter_1bit_bias": DEPTH * (2 * D * 4 + 4 + D),
    # per linear and branch: out·in/g weights + out biases
    "consolidator_branches": DEPTH * sum((3 * D * D + D * D + 2 * HIDDEN * D) // g + 3 * D + D + HIDDEN + D for g in (32, 16)),
}


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=D, depth=DEPTH, num_heads=2,
                              mlp_ratio=HIDDEN / D, num_classes=0)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def vit_b16() -> nn.Module:
    return timm.create_model("vit_base_patch16_224", num_classes=0)


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
    identity = {c for c in VIT_CASES if make(c, vit).identity_at_init()}  # 1-bit: the up-projection cannot start at 0
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
        for bias in (True, False):
            cfg = PEFT.entry("conv_adapter").config.model_validate({"name": "conv_adapter", "reduction": g, "bias": bias})
            expected = sum(9 * w + w * w // g + w + (w // g + w) * bias for w in widths)  # GConv, PW, α (+ biases)
            assert build_peft(cfg, model).num_parameters() == expected
    assert sum(9 * w + w * w // 8 + w + w // 8 + w for w in widths) == 199_192  # the official code's count at γ=8


@pytest.mark.parametrize("row", REPORTED, ids=[r.label for r in REPORTED])
def test_counts_on_vit_b16_against_the_papers_reported_figures(row, vit_b16: nn.Module):
    cfg = PEFT.entry(row.method).config.model_validate({"name": row.method, **row.options})
    n = build_peft(cfg, vit_b16).num_parameters() + row.extra
    gap = abs(n - row.reported) / row.reported
    assert (gap <= 0.05) == row.reproduces, (row.label, n, row.reported, row.note)


def test_the_paper_configurations_are_the_ones_the_notes_name():
    by_label = {r.label: r for r in REPORTED}
    assert VTAB_MEAN_HEAD == pytest.approx(38_045, abs=1)
    assert by_label["KAdaptation"].reported - by_label["KAdaptation"].extra == 50_176  # PEViT README minus its head
    assert 1536 * 12 + 144 * 12**2 == 39_168 and 1680 * 28 + 28**3 == 68_992  # FacT TT r=12, TK r=28 on ViT-B/16
    assert BI_ADAPTFORMER_BYTES == 72 * 1024  # "72 KiB" of 1-bit weights at d=32


def test_one_bit_adapter_storage_on_vit_b16(vit_b16: nn.Module):
    """Bi-AdaptFormer d=32: 24 packed 768×32 matrices + (μ, σ) each; float biases would add 52%."""
    sizes = {}
    for bias in (False, True):
        cfg = PEFT.entry("adapter").config.model_validate({"name": "adapter", "bits": 1, "bottleneck": 32, "bias": bias})
        sizes[bias] = bank.packed_nbytes(bank.pack(build_peft(cfg, vit_b16)))
    assert sizes[False] == BI_ADAPTFORMER_BYTES + 24 * 8
    assert sizes[True] - sizes[False] == 12 * (32 + 768) * 4
    assert round(100 * (sizes[True] / sizes[False] - 1)) == 52


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
    w = torch.tensor([[1.0, 3.0], [5.0, 7.0]])  # mean 4, unbiased std sqrt(20/3) (the official torch.std())
    sigma = math.sqrt(20 / 3)
    signs, mu, s = quantize_1bit(w)
    assert signs.tolist() == [[False, False], [True, True]] and mu == 4.0 and math.isclose(s, sigma, rel_tol=1e-6)
    expected = torch.tensor([[4 - LEVEL * sigma] * 2, [4 + LEVEL * sigma] * 2])
    torch.testing.assert_close(dequantize_1bit(signs, mu, s), expected)
    c = torch.tensor([[1.0, 2.0], [3.0, 5.0]])  # a weighted loss, so that the paths differ
    grads = {}
    for ste in ("official", "detached"):
        v = w.clone().requires_grad_(True)
        q = fake_quant_1bit(v, ste)
        torch.testing.assert_close(q.detach(), expected)  # same forward value either way
        (q * c).sum().backward()
        grads[ste] = v.grad
    assert torch.equal(grads["detached"], c)  # plain straight-through
    # official: q = (q(z) - z)·σ + z·σ + μ with z = (w - μ)/(σ + ε): besides c it carries
    # Σ_i c_i (q(z_i) - z_i) · ∂σ/∂w_j, ∂σ/∂w_j = (w_j - μ)/((n - 1)σ) (the ε terms are ~1e-5 relative)
    z = (w - 4) / sigma
    zq = LEVEL * torch.where(z >= 0, 1.0, -1.0)
    expected_grad = c + (c * (zq - z)).sum() * (w - 4) / (3 * sigma)
    torch.testing.assert_close(grads["official"], expected_grad, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(grads["official"], c, atol=1e-3)
    assert math.isclose(LEVEL, 0.6745, abs_tol=1e-4)


def test_one_bit_levels_minimise_absolute_not_squared_error():
    """The quantiser's levels (μ ± 0.6745σ) minimise E|w - q| for Gaussian w; E(w - q)² is lower at μ ± √(2/π)σ."""
    w = 0.3 + 2.0 * torch.randn(1000, 1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    signs, mu, sigma = quantize_1bit(w)
    q = dequantize_1bit(signs, mu, sigma).double()
    torch.testing.assert_close(fake_quant_1bit(w), q)
    l1, l2 = float((w - q).abs().mean()), float((w - q).square().mean())
    for level in (LEVEL - 0.05, LEVEL + 0.05):  # other levels, same signs
        other = mu + level * sigma * (signs.double() * 2 - 1)
        assert float((w - other).abs().mean()) > l1
    lloyd_max = mu + math.sqrt(2 / math.pi) * sigma * (signs.double() * 2 - 1)
    assert float((w - lloyd_max).square().mean()) < l2


@pytest.mark.parametrize("case", ["adapter_1bit", "convpass_1bit", "lora_1bit"])
def test_one_bit_matrices_get_distinct_gradients_at_the_first_step(case: str):
    """A zero matrix has σ = 0: under the official estimator its gradient would be one value repeated
    (only μ carries it). Every 1-bit method starts its 'zero' matrices from N(0, 1e-3²) instead."""
    model, x = tiny_vit(), inputs(case)
    method = make(case, model).attach(model)
    method.train()
    model(x).square().mean().backward()
    method.detach()
    for name, p in method.named_parameters():
        if p.dim() >= 2:
            assert p.std() > 0 and p.grad.unique().numel() > 1, name


def test_one_bit_adapter_defaults_follow_bi_adaptformer():
    model = tiny_vit()
    one_bit, float32 = make("adapter_1bit", model), make("adapter", model)
    assert all(lin.bias is None for lin in [*one_bit.down, *one_bit.up])
    assert all(lin.bias is not None for lin in [*float32.down, *float32.up])
    assert not any(k.endswith("bias") for k in bank.pack(one_bit))  # no float bias is stored
    ups = torch.cat([u.weight.flatten() for u in one_bit.up])
    assert ups.abs().max() <= 2e-3 and ups.std() > 5e-4  # N(0, 1e-3²) cut at ±2σ
    assert one_bit.drop.p == 0.1 and float32.drop.p == 0.1 and make("adapter_seq", model).drop.p == 0.0


def test_bit_packing_round_trip_and_size():
    signs = torch.rand(3, 37, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bits(signs)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(111 / 8)
    assert torch.equal(unpack_bits(packed, (3, 37)), signs)
    assert packed_bytes(111) == 14 + 8


def test_channel_shuffle_is_the_official_channel_shuffle_1d():
    x = torch.arange(2 * 8 * 3).reshape(2, 8, 3)  # (batch, channels, length) as the official module sees it
    official = x.view(2, 4, 2, 3).transpose(1, 2).contiguous().view(2, -1, 3)  # ChannelShuffle1d(4)
    assert torch.equal(x[:, shuffle_perm(8, 4)], official)
    assert shuffle_perm(8, 4).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_consolidator_without_shuffle_groups_contiguous_inputs():
    model = tiny_vit()
    method = make("consolidator", model)  # defaults: one branch, g = d/2, no shuffle
    assert method.groups == [D // 2] and not method.cfg.channel_shuffle
    delta, _ = method.consolidated("blocks_0_attn_proj")
    assert torch.equal(delta, torch.block_diag(*method.weight["blocks_0_attn_proj_g32"].detach()))
    assert method.stored_entries("blocks_0_attn_proj") == D * D // (D // 2)


def official_consolidated(weights: dict[int, torch.Tensor], out: int, inp: int, shuffle: bool) -> tuple[torch.Tensor, int]:
    """The dense matrix and stored-entry count as the official get_actual_params / actual_params build
    them: block-diagonal blocks, then channel_shuffle_for_matrix(·, in/g) on the columns."""
    dense, mask = torch.zeros(out, inp), torch.zeros(out, inp)
    for g, w in weights.items():
        tmp, tmp_mask = torch.zeros(out, inp), torch.zeros(out, inp)
        o, i = out // g, inp // g
        for gi in range(g):
            tmp[gi * o : (gi + 1) * o, gi * i : (gi + 1) * i] += w[gi]
            tmp_mask[gi * o : (gi + 1) * o, gi * i : (gi + 1) * i] += 1
        if shuffle:  # channel_shuffle_for_matrix(matrix, groups=in/g)
            tmp = tmp.view(out, inp // g, g).transpose(1, 2).reshape(out, inp)
            tmp_mask = tmp_mask.view(out, inp // g, g).transpose(1, 2).reshape(out, inp)
        dense += tmp
        mask += tmp_mask
    return dense, int((mask > 0).sum())


@pytest.mark.parametrize("case", ["consolidator", "consolidator_branches"])
def test_consolidator_consolidation_equals_the_official_one(case: str):
    method = make(case, tiny_vit())
    perturb(method)
    for key, out, inp in (("blocks_0_attn_qkv", 3 * D, D), ("blocks_1_mlp_fc2", D, HIDDEN)):
        weights = {g: method.weight[f"{key}_g{g}"].detach() for g in method.groups}
        dense, stored = official_consolidated(weights, out, inp, method.cfg.channel_shuffle)
        delta, bias = method.consolidated(key)
        torch.testing.assert_close(delta, dense, rtol=0, atol=1e-7)
        assert method.stored_entries(key) == stored
        torch.testing.assert_close(bias, sum(method.bias[f"{key}_g{g}"].detach() for g in method.groups))
        if case == "consolidator_branches":  # the two shuffled branches overlap: fewer stored entries than trained
            assert stored < sum(out * inp // g for g in method.groups)


def conv_adapter_branch_by_hand(a: nn.Module, h: torch.Tensor) -> torch.Tensor:
    z = torch.relu(nn.functional.conv2d(h, a.down.weight, a.down.bias, a.down.stride, a.down.padding, groups=a.down.groups))
    return a.alpha[:, None, None] * nn.functional.conv2d(z, a.up.weight, a.up.bias)


@pytest.mark.parametrize("case", ["conv_adapter", "conv_adapter_after_act"])
def test_conv_adapter_basic_block_placement(case: str):
    """before_bn: bn1 sees conv1(x) + branch(x); after_act: the block's act1 output gains branch(x)."""
    model, x = tiny_resnet(), inputs(case)
    method = make(case, model)
    perturb(method)
    block = model.layer1[0]
    seen: dict[str, torch.Tensor] = {}
    handles = [block.conv1.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0])),
               block.bn1.register_forward_pre_hook(lambda m, a: seen.__setitem__("bn_in", a[0])),
               block.conv2.register_forward_pre_hook(lambda m, a: seen.__setitem__("conv2_in", a[0]))]
    method.eval().attach(model)
    model(x)
    method.detach()
    for h in handles:
        h.remove()
    adapter = method.adapters[[i for i, (conv, _) in enumerate(adapted_convs(model)) if conv is block.conv1][0]]
    branch = conv_adapter_branch_by_hand(adapter, seen["x"])
    conv1 = nn.functional.conv2d(seen["x"], block.conv1.weight, None, block.conv1.stride, block.conv1.padding)
    if case == "conv_adapter":
        torch.testing.assert_close(seen["bn_in"], conv1 + branch, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(seen["bn_in"], conv1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(seen["conv2_in"], block.act1(block.bn1(conv1)) + branch, rtol=1e-5, atol=1e-5)


def test_conv_adapter_bottleneck_branch_joins_after_act2():
    torch.manual_seed(0)
    model = timm.create_model("resnet26", channels=(8, 16, 16, 16), stem_width=8, num_classes=0, zero_init_last=False).eval().requires_grad_(False)
    cfg = PEFT.entry("conv_adapter").config.model_validate({"name": "conv_adapter", "reduction": 2})
    method = build_peft(cfg, model)
    perturb(method)
    block = model.layer1[0]
    seen: dict[str, torch.Tensor] = {}
    handles = [block.conv2.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0])),
               block.conv3.register_forward_pre_hook(lambda m, a: seen.__setitem__("conv3_in", a[0]))]
    method.eval().attach(model)
    model(inputs("conv_adapter"))
    method.detach()
    for h in handles:
        h.remove()
    adapter = method.adapters[[i for i, (conv, _) in enumerate(adapted_convs(model)) if conv is block.conv2][0]]
    plain = block.act2(block.bn2(block.conv2(seen["h"])))
    torch.testing.assert_close(seen["conv3_in"], plain + conv_adapter_branch_by_hand(adapter, seen["h"]), rtol=1e-5, atol=1e-5)


def test_fact_tt_fc2_cores_start_with_the_official_bound():
    r = 4
    method = make("fact_tt", tiny_vit())  # rank 4, MLP 4x: fc2's official Linear(4r, r) has bound 1/√(4r)
    for i in range(DEPTH):
        base = i * method.per_block
        assert method.cores[base : base + 4 + method.k].abs().max() > (4 * r) ** -0.5  # q, k, v, o, fc1: 1/√r
        assert method.cores[base + 4 + method.k : base + 4 + 2 * method.k].abs().max() <= (4 * r) ** -0.5


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
