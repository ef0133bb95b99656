"""The PEFT library: a matrix over every registered method on a tiny ViT (and a tiny ResNet).

Per method: forward/backward with gradients only in the module, identity at init where the method
says so, detach restores the backbone, merge equivalence and exact unmerge, pack/unpack round trip,
the parameter-count formula on the tiny model, and the counts on ViT-B/16 against the papers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from cl.cli import main
from cl.config import parse_run_config
from cl.engine.loop import prepare
from cl.errors import ConfigError
from cl.peft import bank, build_peft
from cl.peft.consolidator import shuffle_perm
from cl.peft.conv_adapter import adapted_convs
from cl.peft.krona import KronAConfig, default_factors, factor_shapes, kron_apply
from cl.peft.memvp import MemVPConfig, kmeans
from cl.peft.quant import LEVEL, dequantize_1bit, fake_quant_1bit, pack_bits, packed_bytes, quantize_1bit, unpack_bits
from cl.peft.reported import BI_ADAPTFORMER_BYTES, REPORTED, VTAB_MEAN_HEAD
from cl.registry import PEFT
from tests.conftest import tiny_config, write_yaml

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
    "krona": {},
    "krona_all": {"name": "krona", "factors": [4, 8], "targets": ["q", "k", "v", "proj", "fc1", "fc2"], "scale": 0.5},
    "krona_1bit": {"name": "krona", "bits": 1},
    "memvp": {"memory": 4},
    "memvp_bias": {"name": "memvp", "memory": 4, "bias": True},
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
    "krona": DEPTH * 2 * (8 * 8 + 8 * 8),  # default factors on 64 x 64: A 8x8, B 8x8
    # A 4x8 everywhere; B 16x8 on q, k, v, proj, 64x8 on fc1 (256 x 64), 16x32 on fc2 (64 x 256)
    "krona_all": DEPTH * (4 * (32 + 16 * 8) + (32 + 64 * 8) + (32 + 16 * 32)),
    "memvp": DEPTH * 2 * 4 * D,
    "memvp_bias": DEPTH * (2 * 4 * D + 4),
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
    assert identity == {"adapter", "lora", "lora_qv", "bitfit", "convpass", "fact_tt", "fact_tk", "kadaptation",
                        "krona", "krona_all", "memvp", "memvp_bias"}


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


@pytest.mark.parametrize("case", ["adapter_1bit", "convpass_1bit", "lora_1bit", "krona_1bit"])
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


# ---- KronA ---------------------------------------------------------------------------------------


def test_krona_cheap_forward_is_the_kronecker_matvec():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64)
    x = torch.randn(2, 7, 8, generator=g, dtype=torch.float64)  # (..., a2·b2)
    y = kron_apply(a, b, x)
    assert y.shape == (2, 7, 15)
    torch.testing.assert_close(y, x @ torch.kron(a, b).T, rtol=0, atol=1e-12)
    # one entry by hand: y[i·b1 + k] = Σ_j,l A[i, j] B[k, l] x[j·b2 + l]
    i, k = 2, 4
    by_hand = sum(a[i, j] * b[k, l] * x[1, 3, j * 2 + l] for j in range(4) for l in range(2))
    torch.testing.assert_close(y[1, 3, i * 5 + k], by_hand)


def test_krona_rank_is_the_product_of_the_factor_ranks():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 4, generator=g, dtype=torch.float64)  # rank 2
    b = torch.randn(5, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 6, generator=g, dtype=torch.float64)  # rank 3
    assert torch.linalg.matrix_rank(torch.kron(a, b)) == 6
    method = make("krona", tiny_vit())  # A, B 8x8: a rank-8 pair gives a full-rank 64x64 update
    with torch.no_grad():
        method.A["q"][0].copy_(torch.randn(8, 8, generator=g))
        method.B["q"][0].copy_(torch.randn(8, 8, generator=g))
    assert torch.linalg.matrix_rank(method.delta_weight("q", 0).double()) == D


def test_krona_default_factors_and_validation():
    assert default_factors(768, 768) == (32, 24)  # the spec's ViT-B/16 shape: 768 + 768 parameters
    assert default_factors(3072, 768) == (48, 32) and default_factors(D, D) == (8, 8) and default_factors(97, 97) == (97, 1)
    for d_out, d_in in ((768, 768), (3072, 768), (60, 36)):  # the default is the cheapest valid pair
        a1, a2 = default_factors(d_out, d_in)
        cheapest = min(x * y + d_out * d_in // (x * y) for x in range(1, d_out + 1) if d_out % x == 0 for y in range(1, d_in + 1) if d_in % y == 0)
        assert a1 * a2 + d_out * d_in // (a1 * a2) == cheapest
    assert factor_shapes(3072, 768, [32, 24], "fc1") == ((32, 24), (96, 32))
    cfg = KronAConfig(factors=[5, 8])
    with pytest.raises(ConfigError, match=r"^peft krona.factors: \(5, 8\) must divide q's \(d_out, d_in\) = \(64, 64\)$"):
        build_peft(cfg, tiny_vit())


def test_krona_on_vit_b16_defaults_to_the_spec_shapes(vit_b16: nn.Module):
    method = build_peft(KronAConfig(), vit_b16)
    assert method.A["q"][0].shape == (32, 24) and method.B["v"][11].shape == (24, 32)
    assert method.num_parameters() == 36_864 == 12 * 2 * (768 + 768)
    assert build_peft(KronAConfig(factors=[32, 32]), vit_b16).num_parameters() == 12 * 2 * 1_600


def test_krona_branch_applies_the_scale_once_by_hand():
    """q and v rows gain s·kron(A, B) x, k is untouched; fc1 the same; the merge adds s·kron(A, B) once."""
    model = tiny_vit()
    torch.manual_seed(1)
    method = build_peft(KronAConfig(scale=0.5, targets=["q", "v", "fc1"]), model)
    perturb(method)
    x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(4))
    qkv, fc1 = model.blocks[1].attn.qkv, model.blocks[1].mlp.fc1
    plain_qkv, plain_fc1 = qkv(x), fc1(x)
    method.eval().attach(model)
    hooked_qkv, hooked_fc1 = qkv(x), fc1(x)
    method.detach()
    kr = {t: torch.kron(method.A[t][1], method.B[t][1]).detach() for t in ("q", "v", "fc1")}
    expected = plain_qkv + torch.cat([0.5 * x @ kr["q"].T, torch.zeros(3, 5, D), 0.5 * x @ kr["v"].T], dim=-1)
    torch.testing.assert_close(hooked_qkv, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hooked_fc1, plain_fc1 + 0.5 * x @ kr["fc1"].T, rtol=1e-5, atol=1e-5)
    merged = method.merged_weights(model)
    delta = merged["blocks.1.attn.qkv.weight"] - qkv.weight
    torch.testing.assert_close(delta, torch.cat([0.5 * kr["q"], torch.zeros(D, D), 0.5 * kr["v"]]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged["blocks.1.mlp.fc1.weight"] - fc1.weight, 0.5 * kr["fc1"], rtol=1e-5, atol=1e-6)
    assert set(merged) == {f"blocks.{i}.{n}.weight" for i in range(DEPTH) for n in ("attn.qkv", "mlp.fc1")}


def test_krona_1bit_starts_b_small_not_zero():
    method = make("krona_1bit", tiny_vit())
    bs = torch.cat([b.flatten() for t in method.targets for b in method.B[t]])
    assert bs.abs().max() <= 2e-3 and bs.std() > 5e-4  # N(0, 1e-3²) cut at ±2σ, as the 1-bit LoRA
    assert not method.identity_at_init()


# ---- MemVP ---------------------------------------------------------------------------------------


def test_memvp_branch_by_hand():
    """The MLP's output gains s·Vᵀ GELU(K z + c), z its own input (LN2 x'), s = 0.1."""
    model, x = tiny_vit(), inputs("memvp")
    method = make("memvp_bias", model)
    perturb(method)
    method.eval().attach(model)
    seen: dict[str, torch.Tensor] = {}
    handle = model.blocks[1].mlp.register_forward_hook(lambda m, a, out: seen.update(z=a[0], out=out))  # runs after the module's hook
    model(x)
    handle.remove()
    method.detach()
    z, k, v, c = seen["z"], method.keys[1].detach(), method.values[1].detach(), method.bias[1].detach()
    expected = model.blocks[1].mlp(z) + 0.1 * nn.functional.gelu(z @ k.T + c) @ v
    torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-6)
    fresh = make("memvp", model)
    assert fresh.cfg.scale == 0.1 and fresh.drop.p == 0.1 and fresh.bias is None
    assert fresh.keys.std().item() == pytest.approx(0.02, rel=0.1) and not fresh.values.any()  # K ~ N(0, 0.02²), V = 0


@pytest.mark.parametrize("case", ["memvp", "memvp_bias"])
def test_memvp_widened_plain_mlps_equal_the_hooked_branch(case: str):
    """W1' = [W1; K], b1' = [b1; c], W2' = [W2, s·Vᵀ]: a plain timm model of MLP width D + m, no hooks."""
    model, x = tiny_vit(), inputs(case)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    method = make(case, model)
    perturb(method)
    method.eval().attach(model)
    hooked = model(x)
    wide = method.widened_model(model)  # built while attached: the copy must not keep the hooks
    method.detach()
    assert hook_count(wide) == 0
    fc1, fc2 = wide.blocks[0].mlp.fc1, wide.blocks[0].mlp.fc2
    assert (fc1.out_features, fc2.in_features) == (HIDDEN + 4, HIDDEN + 4)
    assert torch.equal(fc1.weight[HIDDEN:], method.keys[0].detach()) and torch.equal(fc2.weight[:, HIDDEN:], 0.1 * method.values[0].detach().T)
    torch.testing.assert_close(wide(x), hooked, rtol=0, atol=1e-5)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())  # the backbone itself is untouched


def test_kmeans_by_hand():
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [10.0, 10.0], [10.0, 11.0], [10.0, 12.0]])
    for seed in range(4):  # whichever rows start it, the clusters are found
        centres = kmeans(x, 2, 10, torch.Generator().manual_seed(seed))
        assert sorted(map(tuple, centres.tolist())) == [(0.0, 0.5), (10.0, 11.0)]


@pytest.mark.parametrize("select", ["random", "kmeans"])
def test_memvp_feature_init_is_seeded_and_changes_only_the_keys(select: str):
    model, x = tiny_vit(), inputs("memvp")
    cfg = MemVPConfig(memory=4, bias=True, init="features", feature_select=select)
    methods = []
    for seed in (5, 5, 6):
        torch.manual_seed(1)
        methods.append(build_peft(cfg, model))
    before = {k: v.clone() for k, v in methods[0].state_dict().items()}
    with pytest.raises(RuntimeError, match="init 'features' needs init_from_data"):
        forward_with(methods[0].train(), model, x)
    methods[0].eval()
    for m, seed in zip(methods, (5, 5, 6)):
        assert m.needs_data
        m.init_from_data(model, x, torch.Generator().manual_seed(seed))
        assert not m.needs_data
    a, b, c = methods
    assert torch.equal(a.keys, b.keys) and not torch.equal(a.keys, c.keys)
    assert torch.equal(a.values, before["values"]) and torch.equal(a.bias, before["bias"])
    tokens = {}
    handles = [blk.mlp.register_forward_pre_hook(lambda m, args, i=i: tokens.__setitem__(i, args[0].reshape(-1, D))) for i, blk in enumerate(model.blocks)]
    model(x)
    for h in handles:
        h.remove()
    for i in range(DEPTH):
        rows = (a.keys[i] - before["keys"][i]).detach() / cfg.feature_scale  # F
        if select == "random":  # each row is one of the block's FFN-input tokens
            assert torch.cdist(rows, tokens[i], compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values.max() < 1e-3
        else:  # k-means centres: each token's nearest centre is the mean of its cluster
            assign = torch.cdist(tokens[i], rows, compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=1)
            for j in assign.unique():
                torch.testing.assert_close(rows[j], tokens[i][assign == j].mean(0), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(forward_with(a.eval(), model, x), model(x), rtol=0, atol=1e-6)  # V = 0: still an identity


VIT_BACKBONE = {
    "name": "vit_tiny_patch16_224",
    "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
    "weights": {"source": "pretrain", "pretrain": {"epochs": 2, "batch_size": 32}},
}


def peft_run_config(tmp: Path, cache: Path, peft: dict) -> dict:
    return tiny_config(tmp, cache_dir=str(cache), backbone=VIT_BACKBONE, strategy={"name": "peft_per_task", "lr": 0.01, "peft": peft},
                       train={"epochs": 1, "batch_size": 16})


def test_peft_per_task_derives_memvp_keys_once_per_task_from_its_first_batch(tmp: Path, shared_cache: Path):
    peft = {"name": "memvp", "memory": 4, "init": "features"}
    derived = []
    for _ in range(2):
        prep = prepare(parse_run_config(peft_run_config(tmp, shared_cache, peft)))
        s, exp = prep.strategy, prep.bench.experiences[0]
        s.before_experience(exp)
        method, calls = s.modules[0], []
        init = method.init_from_data
        method.init_from_data = lambda *args: (init(*args), calls.append(method.keys.detach().clone()))
        k0 = method.keys.detach().clone()
        batches = list(exp.train.batches(16, torch.Generator().manual_seed(0)))[:2]
        for xb, yb in batches:
            s.observe(xb, yb, 0)
        assert len(calls) == 1 and not torch.equal(calls[0], k0)
        derived.append(calls[0])
    torch.testing.assert_close(derived[0], derived[1], rtol=0, atol=0)  # seeded by the run seed and the task


@pytest.mark.parametrize("peft", [{"name": "krona"}, {"name": "memvp", "init": "features", "feature_select": "kmeans"}], ids=["krona", "memvp_f"])
def test_cli_run_on_a_tiny_vit(tmp: Path, shared_cache: Path, peft: dict):
    path = write_yaml(tmp / "run.yaml", peft_run_config(tmp, shared_cache, peft))
    assert main(["run", str(path)]) == 0
    metrics = json.loads((tmp / "runs" / "tiny" / "peft_per_task" / "seed0" / "metrics.json").read_text())
    assert 0 <= metrics["final_acc"] <= 1 and metrics["trainable_params"] > 0


def test_cli_bad_krona_factors_are_a_one_line_error(tmp: Path, shared_cache: Path, capsys):
    path = write_yaml(tmp / "bad.yaml", peft_run_config(tmp, shared_cache, {"name": "krona", "factors": [5, 8]}))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any("krona.factors: (5, 8) must divide" in line for line in err) and "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("strategy", [
    {"name": "aper", "peft": {"name": "memvp", "init": "features"}},
    {"name": "ranpac", "first_session": {"name": "memvp", "init": "features"}},
])
def test_data_derived_init_is_refused_where_no_strategy_provides_the_batch(tmp_path: Path, strategy: dict):
    from cl.config import parse_run_config
    from tests.conftest import tiny_config

    with pytest.raises(ConfigError, match="init: 'features' derives the module from a training batch"):
        parse_run_config(tiny_config(tmp_path, strategy=strategy))
