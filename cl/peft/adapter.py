"""Bottleneck adapters on a ViT's MLP branch.

* ``placement: parallel`` is AdaptFormer (Chen et al., NeurIPS 2022): a branch fed with the block's
  un-normalised stream x' (before LN2), added next to the MLP: ``y = x' + MLP(LN2 x') + s·up(ReLU(down x'))``;
  ``up`` starts at zero, so the backbone is unchanged at init. Defaults d=8 (the VTAB-table setting;
  the official code uses 64), s=0.1, dropout 0.1 after the ReLU (the official code's).
* ``bits: 1`` is Bi-AdaptFormer (Jie et al., ICCV 2023): no biases by default (``bias: true`` adds
  them back, as float32), ``up`` drawn from N(0, 1e-3²) truncated at ±2σ (a zero matrix cannot be
  standardised). The paper's width is d=32; d stays 8 here so that the 1-bit and float adapters
  differ only in precision.
* ``placement: sequential`` is the "Adapter" row of the VTAB tables (NOAH's implementation): after
  the MLP output, before the residual add, ``h ← h + s·up(QuickGELU(down h))``, xavier weights and
  N(0, 1e-6) biases (not an identity at init).

Parameters per block ``2·d·m + m + d`` (m the bottleneck): 0.157M at m=8 on ViT-B/16.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from cl.peft.base import Hook, PeftConfig, PeftMethod, vit_blocks, vit_dim
from cl.registry import PEFT


class AdapterConfig(PeftConfig):
    name: Literal["adapter"] = "adapter"
    placement: Literal["parallel", "sequential"] = "parallel"
    bottleneck: int = Field(8, ge=1)
    scale: float | None = Field(None, description="s; default 0.1 parallel (AdaptFormer), 1 sequential")
    activation: Literal["relu", "gelu", "quick_gelu"] | None = Field(None, description="default relu parallel, quick_gelu sequential")
    init: Literal["zero", "xavier"] | None = Field(None, description="zero = up-projection 0 (default parallel); xavier = NOAH (default sequential)")
    dropout: float | None = Field(None, ge=0, lt=1, description="after the activation; default 0.1 parallel (AdaptFormer), 0 sequential")
    bias: bool | None = Field(None, description="biases on both projections; default true, false at bits: 1 (Bi-AdaptFormer has none)")


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "quick_gelu": QuickGELU}


@PEFT.register("adapter", config=AdapterConfig, help="AdaptFormer parallel / sequential bottleneck adapter on the MLP")
class Adapter(PeftMethod):
    supports_1bit = True

    def __init__(self, cfg: AdapterConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        parallel = cfg.placement == "parallel"
        self.scale = cfg.scale if cfg.scale is not None else (0.1 if parallel else 1.0)
        self.init = cfg.init or ("zero" if parallel else "xavier")
        self.act = ACTIVATIONS[cfg.activation or ("relu" if parallel else "quick_gelu")]()
        self.drop = nn.Dropout(cfg.dropout if cfg.dropout is not None else (0.1 if parallel else 0.0))
        bias = cfg.bias if cfg.bias is not None else cfg.bits == 32
        d = vit_dim(model)
        self.down = nn.ModuleList(nn.Linear(d, cfg.bottleneck, bias=bias) for _ in vit_blocks(model))
        self.up = nn.ModuleList(nn.Linear(cfg.bottleneck, d, bias=bias) for _ in vit_blocks(model))
        for down, up in zip(self.down, self.up):
            self._init(down, up)

    @torch.no_grad()
    def _init(self, down: nn.Linear, up: nn.Linear) -> None:
        if self.init == "zero":
            nn.init.kaiming_uniform_(down.weight, a=5**0.5)
            if self.cfg.bits == 1:  # a zero matrix has no spread to standardise: N(0, 1e-3²) cut at ±2σ (the paper's code)
                nn.init.trunc_normal_(up.weight, std=1e-3, a=-2e-3, b=2e-3)
            else:
                nn.init.zeros_(up.weight)
            for b in (down.bias, up.bias):
                if b is not None:
                    nn.init.zeros_(b)
        else:
            for lin in (down, up):
                nn.init.xavier_uniform_(lin.weight)
                if lin.bias is not None:
                    nn.init.normal_(lin.bias, std=1e-6)

    def identity_at_init(self) -> bool:
        return self.init == "zero" and self.cfg.bits == 32

    def branch(self, i: int, x: Tensor) -> Tensor:
        down, up = self.down[i], self.up[i]
        h = self.drop(self.act(nn.functional.linear(x, self.w(down.weight), down.bias)))
        return self.scale * nn.functional.linear(h, self.w(up.weight), up.bias)

    def hooks(self, model: nn.Module) -> list[Hook]:
        out: list[Hook] = []
        for i, block in enumerate(vit_blocks(model)):
            branch = functools.partial(self.branch, i)
            if self.cfg.placement == "parallel":  # fed with x' (the input of LN2), added next to the MLP
                out.append((block.norm2, "pre", self.stash_input(i)))
                out.append((block.ls2, "forward", self.add_branch(i, branch)))
            else:
                out.append((block.ls2, "forward", self._add_sequential(i)))
        return out

    def _add_sequential(self, i: int):
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
            return out + self.branch(i, out)

        return hook
