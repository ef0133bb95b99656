"""Conv-Adapter for ResNets (Chen et al., arXiv 2208.07463; Hhhhhhao/Conv-Adapter), Conv-Parallel.

A branch ``α ⊙ PW(ReLU(GConv(h)))`` parallel to one k×k convolution per residual block: a k×k
grouped conv C_in → C_in/γ with C_in/γ groups (same stride), ReLU, a 1×1 conv to C_out and a
per-channel scale α (init 1); both convs with biases, as in the official code (``bias: false``
drops them). Where it is added follows the released code:

* Bottleneck (ResNet-50): fed with the 3×3 ``conv2``'s input, added after its BN and ReLU,
  ``act2(bn2(conv2(h))) + branch(h)``.
* BasicBlock (ResNet-18/34): parallel to ``conv1``, added to its output before ``bn1``,
  ``act1(bn1(conv1(x) + branch(x)))``. (The released BasicBlock forward reads ``out`` before
  assigning it, so it cannot run; this is its evident intent.) ``basic_block: after_act`` adds
  it after ``act1`` instead, as for the bottleneck.

γ=8 gives 199,192 parameters on ResNet-50 (0.20M in the paper's code; 194,944 without biases),
γ=1 1.30M. Not mergeable (ReLU), not an identity at init.
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
    bias: bool = Field(True, description="biases on both convs (the official code's)")
    basic_block: Literal["before_bn", "after_act"] = Field("before_bn", description="where a BasicBlock adds the branch (see the module doc)")


def adapted_convs(model: nn.Module, basic_block: str = "before_bn") -> list[tuple[nn.Conv2d, nn.Module]]:
    """(the k×k conv whose input feeds the branch, the module whose output it is added to) per block."""
    from timm.models.resnet import BasicBlock, Bottleneck

    out: list[tuple[nn.Conv2d, nn.Module]] = []
    for block in model.modules():
        if isinstance(block, Bottleneck):
            out.append((block.conv2, block.act2))
        elif isinstance(block, BasicBlock):
            out.append((block.conv1, block.conv1 if basic_block == "before_bn" else block.act1))
    return out


class ConvParallel(nn.Module):
    def __init__(self, conv: nn.Conv2d, reduction: int, bias: bool) -> None:
        super().__init__()
        c_in, c_out = conv.in_channels, conv.out_channels
        if c_in % reduction:
            raise ConfigError(f"peft conv_adapter: reduction {reduction} does not divide {c_in} channels")
        mid = c_in // reduction
        k = conv.kernel_size
        self.down = nn.Conv2d(c_in, mid, k, stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=mid, bias=bias)
        self.up = nn.Conv2d(mid, c_out, 1, bias=bias)
        self.alpha = nn.Parameter(torch.ones(c_out))

    def forward(self, h: Tensor) -> Tensor:
        return self.alpha[:, None, None] * self.up(torch.relu(self.down(h)))


@PEFT.register("conv_adapter", config=ConvAdapterConfig, help="Conv-Adapter (Conv-Parallel) for timm ResNets")
class ConvAdapter(PeftMethod):
    backbones = ("resnet",)
    supports_1bit = True

    def __init__(self, cfg: ConvAdapterConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        self.adapters = nn.ModuleList(ConvParallel(conv, cfg.reduction, cfg.bias) for conv, _ in adapted_convs(model))

    def _branch(self, k: int, h: Tensor) -> Tensor:
        a = self.adapters[k]
        z = torch.relu(nn.functional.conv2d(h, self.w(a.down.weight), a.down.bias, a.down.stride, a.down.padding, a.down.dilation, a.down.groups))
        return a.alpha[:, None, None] * nn.functional.conv2d(z, self.w(a.up.weight), a.up.bias)

    def hooks(self, model: nn.Module) -> list[Hook]:
        out: list[Hook] = []
        for k, (conv, target) in enumerate(adapted_convs(model, self.cfg.basic_block)):
            out.append((conv, "pre", self.stash_input(k)))
            out.append((target, "forward", self.add_branch(k, functools.partial(self._branch, k))))
        return out
