"""Conv-Adapter for ResNets (Chen et al., arXiv 2208.07463; Hhhhhhao/Conv-Adapter), Conv-Parallel.

Around the k×k convolution of each residual block that is followed by BN and an activation (the
bottleneck's 3×3 ``conv2``; a basic block's ``conv1``), ``out = act(BN(conv(h))) + α ⊙ PW(ReLU(GConv(h)))``:
a k×k grouped conv C_in → C_in/γ with C_in/γ groups (same stride), ReLU, a 1×1 conv to C_out and a
per-channel scale α (init 1), no biases. γ=8 gives 0.195M parameters on ResNet-50 (0.20M in the
paper's code), γ=1 1.30M. Not mergeable (ReLU), not an identity at init.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from cl.errors import ConfigError
from cl.peft.base import Hook, PeftConfig, PeftMethod
from cl.registry import PEFT


class ConvAdapterConfig(PeftConfig):
    name: Literal["conv_adapter"] = "conv_adapter"
    reduction: int = Field(8, ge=1, description="γ: the bottleneck has C_in/γ channels")


def adapted_convs(model: nn.Module) -> list[tuple[nn.Module, nn.Conv2d, nn.Module]]:
    """(block, the k×k conv, the activation after its BN) for each residual block."""
    from timm.models.resnet import BasicBlock, Bottleneck

    out = []
    for block in model.modules():
        if isinstance(block, Bottleneck):
            out.append((block, block.conv2, block.act2))
        elif isinstance(block, BasicBlock):
            out.append((block, block.conv1, block.act1))
    return out


class ConvParallel(nn.Module):
    def __init__(self, conv: nn.Conv2d, reduction: int) -> None:
        super().__init__()
        c_in, c_out = conv.in_channels, conv.out_channels
        if c_in % reduction:
            raise ConfigError(f"peft conv_adapter: reduction {reduction} does not divide {c_in} channels")
        mid = c_in // reduction
        k = conv.kernel_size
        self.down = nn.Conv2d(c_in, mid, k, stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=mid, bias=False)
        self.up = nn.Conv2d(mid, c_out, 1, bias=False)
        self.alpha = nn.Parameter(torch.ones(c_out))

    def forward(self, h: Tensor) -> Tensor:
        return self.alpha[:, None, None] * self.up(torch.relu(self.down(h)))


@PEFT.register("conv_adapter", config=ConvAdapterConfig, help="Conv-Adapter (Conv-Parallel) for timm ResNets")
class ConvAdapter(PeftMethod):
    backbones = ("resnet",)
    supports_1bit = True

    def __init__(self, cfg: ConvAdapterConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        self.adapters = nn.ModuleList(ConvParallel(conv, cfg.reduction) for _, conv, _ in adapted_convs(model))

    def _branch(self, k: int, h: Tensor) -> Tensor:
        a = self.adapters[k]
        z = torch.relu(nn.functional.conv2d(h, self.w(a.down.weight), None, a.down.stride, a.down.padding, a.down.dilation, a.down.groups))
        return a.alpha[:, None, None] * nn.functional.conv2d(z, self.w(a.up.weight))

    def hooks(self, model: nn.Module) -> list[Hook]:
        out: list[Hook] = []
        for k, (_, conv, act) in enumerate(adapted_convs(model)):
            out.append((conv, "pre", self.stash_input(k)))
            out.append((act, "forward", self.add_branch(k, functools.partial(self._branch, k))))
        return out
