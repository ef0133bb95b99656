"""Xconv BN: exact recovery of post-conv means, trackers as registered modules, conv/BN pairing."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from cl.models.xconv import (
    InputMeanTracker, attach_trackers, constant_map, conv_bn_pairs, parity_means, recover_output_mean, recover_output_mean_spatial,
)


def stationary_input(means: torch.Tensor, size: tuple[int, int], batch: int = 64, seed: int = 0) -> torch.Tensor:
    """A batch whose mean at every position is exactly the (per-parity) means: antithetic noise pairs."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch // 2, means.shape[-1], *size, generator=g, dtype=torch.float64)
    return constant_map(means.double(), size) + torch.cat([noise, -noise])


@pytest.mark.parametrize("stride, padding, kernel", [(1, 0, 3), (1, 1, 3), (2, 0, 3), (2, 1, 3), (2, 0, 1), (2, 3, 7)])
@pytest.mark.parametrize("parity", [False, True])
def test_recovered_mean_equals_empirical_post_conv_mean(stride: int, padding: int, kernel: int, parity: bool):
    torch.manual_seed(stride * 10 + padding + kernel)
    conv = nn.Conv2d(3, 5, kernel, stride=stride, padding=padding, bias=True).double()
    means = torch.randn(4, 3).double() if parity else torch.randn(3).double()
    size = (9, 11)  # odd sizes: the borders and the parity classes are uneven
    x = stationary_input(means, size)
    empirical = conv(x).mean(dim=(0, 2, 3))
    recovered = recover_output_mean(conv, means, size)
    assert torch.allclose(recovered, empirical, atol=1e-5)
    if padding and not parity:  # ignoring padding ("W applied to the mean") is measurably wrong here
        naive = conv.weight.sum(dim=(2, 3)) @ means + conv.bias
        assert not torch.allclose(naive, empirical, atol=1e-3)


def test_parity_means_of_a_one_pixel_map_are_finite():
    x = torch.randn(4, 3, 1, 1)
    m = parity_means(x)
    assert torch.isfinite(m).all() and torch.allclose(m[0], x.mean(dim=(0, 2, 3)))


def test_parity_means_and_constant_map_round_trip():
    m = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    cmap = constant_map(m, (4, 5))
    assert torch.equal(parity_means(cmap), m)
    assert cmap[0, 1, 1, 0] == 6.0 and cmap[0, 0, 2, 3] == 3.0  # (odd row, even col), (even row, odd col)


def test_spatial_recovery_is_exact_for_non_stationary_inputs():
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 4, 3, stride=2, padding=1).double()
    mean_map = torch.zeros(2, 10, 10, dtype=torch.float64)
    mean_map[:, 3:7, 3:7] = torch.tensor([2.0, -1.0], dtype=torch.float64)[:, None, None]  # a centred object
    noise = torch.randn(16, 2, 10, 10, dtype=torch.float64)
    x = mean_map[None] + torch.cat([noise, -noise])
    empirical = conv(x).mean(dim=(0, 2, 3))
    assert torch.allclose(recover_output_mean_spatial(conv, mean_map), empirical, atol=1e-5)
    channel = recover_output_mean(conv, mean_map.mean(dim=(1, 2)), (10, 10))  # the stationary assumption fails here
    assert not torch.allclose(channel, empirical, atol=1e-2)


def test_tracker_updates_only_in_train_mode_and_is_a_registered_buffer():
    tracker = InputMeanTracker(2, parity=False, size=(3, 3))
    x = torch.ones(4, 2, 3, 3) * torch.tensor([2.0, -1.0]).view(1, 2, 1, 1)
    tracker.train()
    tracker.update(x)
    assert torch.allclose(tracker.running_mean, torch.tensor([[0.2, -0.1]]))  # BN's EMA from 0, momentum 0.1
    assert tracker.input_size.tolist() == [3, 3]
    assert torch.allclose(tracker.running_map[:, 1, 2], torch.tensor([0.2, -0.1]))
    tracker.eval()
    tracker.update(x * 100)
    assert torch.allclose(tracker.running_mean, torch.tensor([[0.2, -0.1]]))
    assert set(tracker.state_dict()) == {"running_mean", "running_map", "input_size"}


def test_attach_trackers_on_a_timm_resnet():
    model = timm.create_model("test_resnet", num_classes=0, in_chans=1)
    names = {n for n, m in model.named_modules()}
    pairs = attach_trackers(model, torch.zeros(2, 1, 16, 16))
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(p.bn_name for p in pairs) == sorted(bns)  # every BN follows a conv in a ResNet
    stem = next(p for p in pairs if p.conv_name == "conv1.0")
    assert stem.tracker.parity and not next(p for p in pairs if p.conv_name == "layer1.0.conv1").tracker.parity
    state = model.state_dict()
    assert "conv1.0.input_tracker.running_mean" in state and all(k in state for k in timm.create_model("test_resnet", num_classes=0, in_chans=1).state_dict())
    model.train()
    model(torch.randn(4, 1, 16, 16) + 3)
    assert stem.tracker.running_mean.abs().sum() > 0 and stem.tracker.input_size.tolist() == [16, 16]
    assert {n for n, _ in model.named_modules()} - names == {f"{p.conv_name}.input_tracker" for p in pairs}


def test_recovery_through_a_real_block_matches_bn_statistics_when_weights_do_not_change():
    """Sanity: with unchanged weights, the recovered mean reproduces what BN measures on the same data."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=0, in_chans=1).double()
    pairs = attach_trackers(model, torch.zeros(2, 1, 16, 16, dtype=torch.float64))
    model.train()
    for bn in (p.bn for p in pairs):
        bn.momentum = None  # cumulative average: exact batch statistics
        bn.reset_running_stats()
    for p in pairs:
        p.tracker.momentum = 1.0  # last batch
    x = torch.randn(32, 1, 16, 16, dtype=torch.float64) + 0.5
    model(x)
    # the stem conv sees the raw input, which is stationary per parity class only in expectation:
    # recover with the per-parity means actually measured, and compare with the BN's mean
    p = next(p for p in pairs if p.conv_name == "conv1.0")
    recovered = recover_output_mean(p.conv, p.tracker.running_mean, tuple(p.tracker.input_size.tolist()))
    assert torch.allclose(recovered, p.bn.running_mean, atol=0.05)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_every_batchnorm_of_resnet18_and_resnet50_gets_a_tracker(arch: str):
    model = timm.create_model(arch, num_classes=0)
    pairs = attach_trackers(model, torch.zeros(2, 3, 32, 32))
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(p.bn_name for p in pairs) == sorted(bns)
    strided = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)}
    assert {p.conv_name for p in pairs if p.tracker.parity} == strided  # the stem and every stride-2 conv
