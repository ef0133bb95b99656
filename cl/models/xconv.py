"""Cross-convolution BatchNorm (Xconv BN): recover an old task's post-conv BN mean through the current conv.

Jie, Deng, Li. "Alleviating Representational Shift for Continual Fine-tuning", CVPR-W 2022.
https://arxiv.org/abs/2204.10535 (official code: github.com/JieShibo/ConFiT)

A BatchNorm after a conv normalises with a running mean of the conv's *output*. When the conv is
fine-tuned on later tasks, an old task's stored output mean no longer matches what the current conv
produces on that task's data. The conv is linear, so if a tracker stored the mean of the conv's
*input* on the old task, the output mean under the current weights is the current conv applied to a
map filled with that input mean (exact by linearity when the input mean is spatially stationary;
per spatial-parity class for strided convs, whose kernel taps see even and odd positions
differently). Convolving a constant map of the true input size keeps zero-padding effects exact.

Trackers are registered submodules of their conv (``<conv>.input_tracker``), called by a forward
pre-hook: they are saved in the state dict and moved by ``.to()``, they update only in train mode,
and the backbone's own parameter names are unchanged.

Beyond the paper, trackers also keep the per-position input mean map ([C, H, W]). The constant map
of channel means is only exact when the input mean is spatially stationary; on small images with
centred objects (Fashion-MNIST) it is not, and the recovery is off by 7-24% even before any weight
changes. Convolving the per-position mean map instead is exact by linearity whatever the layout,
at C x H x W floats per conv instead of C (x4 with parity): ``recover_output_mean_spatial``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def parity_means(x: Tensor) -> Tensor:
    """Per-channel means over the four spatial parity classes of [B, C, H, W]: rows (even, odd) x cols (even, odd).

    A class with no positions (a map one pixel tall or wide) gets the overall channel mean; it is
    never used by a recovery at that size, but must not be NaN.
    """
    overall = x.mean(dim=(0, 2, 3))
    parts = [x[:, :, i::2, j::2] for i in (0, 1) for j in (0, 1)]
    return torch.stack([p.mean(dim=(0, 2, 3)) if p.numel() else overall for p in parts])


def constant_map(means: Tensor, size: tuple[int, int]) -> Tensor:
    """[1, C, H, W] filled with ``means`` [C] (or [4, C]: one value per parity class)."""
    h, w = size
    if means.ndim == 1 or means.shape[0] == 1:
        return means.reshape(1, -1, 1, 1).expand(1, means.shape[-1], h, w).contiguous()
    out = torch.empty(1, means.shape[1], h, w, dtype=means.dtype, device=means.device)
    for k, (i, j) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        out[0, :, i::2, j::2] = means[k][:, None, None]
    return out


def recover_output_mean(conv: nn.Conv2d, input_means: Tensor, size: tuple[int, int]) -> Tensor:
    """Mean of ``conv``'s output, per output channel, for inputs with the given (per-parity) means.

    Args:
        conv: the *current* conv (its weights, bias, stride, padding, dilation, groups are used).
        input_means: [C] or [4, C] stored input means of the task.
        size: the input feature-map size the means were recorded at.
    """
    m = constant_map(input_means.to(conv.weight), size)
    out = F.conv2d(m, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return out.mean(dim=(0, 2, 3))


def recover_output_mean_spatial(conv: nn.Conv2d, input_map: Tensor) -> Tensor:
    """Mean of ``conv``'s output for inputs whose per-position mean is ``input_map`` [C, H, W] (exact)."""
    m = input_map.to(conv.weight)[None]
    out = F.conv2d(m, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return out.mean(dim=(0, 2, 3))


class InputMeanTracker(nn.Module):
    """Running mean of a conv's input (BatchNorm's EMA, momentum 0.1).

    Keeps the channel means (per parity class when ``parity``), as in the paper, and the
    per-position mean map of an input of ``size``.
    """

    def __init__(self, channels: int, parity: bool, size: tuple[int, int], momentum: float = 0.1) -> None:
        super().__init__()
        self.parity = parity
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(4 if parity else 1, channels))
        self.register_buffer("running_map", torch.zeros(channels, *size))
        self.register_buffer("input_size", torch.tensor(size, dtype=torch.long))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        if not self.training:
            return
        batch = parity_means(x) if self.parity else x.mean(dim=(0, 2, 3))[None]
        self.running_mean.mul_(1 - self.momentum).add_(batch.float(), alpha=self.momentum)
        if tuple(x.shape[-2:]) == tuple(self.running_map.shape[-2:]):
            self.running_map.mul_(1 - self.momentum).add_(x.float().mean(dim=0), alpha=self.momentum)
        self.input_size[0], self.input_size[1] = x.shape[-2], x.shape[-1]  # filled from Python ints: no blocking copy

    def extra_repr(self) -> str:
        return f"channels={self.running_mean.shape[1]}, parity={self.parity}"


def _track_hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
    module.input_tracker.update(inputs[0])


@dataclass
class ConvBNPair:
    conv_name: str
    bn_name: str
    conv: nn.Conv2d
    bn: nn.modules.batchnorm._BatchNorm
    tracker: InputMeanTracker


@torch.no_grad()
def conv_bn_pairs(model: nn.Module, example: Tensor, sizes: dict[str, tuple[int, int]] | None = None) -> list[tuple[str, str]]:
    """(conv, BatchNorm) module names where the conv's output tensor is the BN's input, found by one forward.

    Args:
        sizes: if given, filled with each conv's input feature-map size.
    """
    outputs: dict[int, str] = {}
    pairs: list[tuple[str, str]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):

            def hook(m: nn.Module, i: tuple[Tensor, ...], o: Tensor, name: str = name) -> None:
                outputs[id(o)] = name
                if sizes is not None:
                    sizes[name] = (int(i[0].shape[-2]), int(i[0].shape[-1]))

            handles.append(module.register_forward_hook(hook))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            handles.append(module.register_forward_pre_hook(
                lambda m, i, name=name: pairs.append((outputs[id(i[0])], name)) if id(i[0]) in outputs else None))
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return pairs


def attach_trackers(model: nn.Module, example: Tensor) -> list[ConvBNPair]:
    """Put an input-mean tracker before every conv that feeds a BatchNorm (parity-wise if strided)."""
    modules = dict(model.named_modules())
    sizes: dict[str, tuple[int, int]] = {}
    pairs = []
    for conv_name, bn_name in conv_bn_pairs(model, example, sizes):
        conv = modules[conv_name]
        if not hasattr(conv, "input_tracker"):
            parity = any(s > 1 for s in conv.stride)
            conv.add_module("input_tracker", InputMeanTracker(conv.in_channels, parity, sizes[conv_name]).to(conv.weight.device))
            conv.register_forward_pre_hook(_track_hook)
        pairs.append(ConvBNPair(conv_name, bn_name, conv, modules[bn_name], conv.input_tracker))
    return pairs
