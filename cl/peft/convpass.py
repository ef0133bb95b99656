"""Convpass: convolutional bypasses for ViTs (Jie & Deng, arXiv 2207.07039).

Two bypasses per block, parallel to attention and to the MLP, fed with the normalised input of
each (LN1 x, LN2 x'):  ``x ← x + Attn(LN1 x) + s·CP(LN1 x)``, and likewise for the MLP. CP projects
to m channels (QuickGELU), runs a 3×3 conv over the patch tokens laid out on their grid (the
prefix tokens go through the same conv as 1×1 images, i.e. its centre tap), QuickGELU, dropout,
and projects back. The up-projection starts at zero, so the backbone is unchanged at init.
Parameters per block 2·(d·m + m + 9m² + m + m·d + d): 0.328M at m=8 on ViT-B/16. Not mergeable.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from cl.errors import ConfigError
from cl.peft.adapter import QuickGELU
from cl.peft.base import Hook, PeftConfig, PeftMethod, vit_blocks, vit_dim
from cl.registry import PEFT


class ConvpassConfig(PeftConfig):
    name: Literal["convpass"] = "convpass"
    dim: int = Field(8, ge=1, description="m, the bypass width")
    scale: float = Field(1.0, description="s (the official configs tune it per task in 0.01..100)")
    conv_init: Literal["xavier", "identity"] = "xavier"
    dropout: float = Field(0.1, ge=0, lt=1)


class Bypass(nn.Module):
    def __init__(self, d: int, m: int, conv_init: str, bits: int) -> None:
        super().__init__()
        self.down = nn.Linear(d, m)
        self.conv = nn.Conv2d(m, m, 3, padding=1)
        self.up = nn.Linear(m, d)
        with torch.no_grad():
            nn.init.xavier_uniform_(self.down.weight)
            nn.init.zeros_(self.down.bias)
            if conv_init == "identity":
                self.conv.weight.zero_()
                self.conv.weight[:, :, 1, 1] = torch.eye(m)
            else:
                nn.init.xavier_uniform_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)
            if bits == 1:  # a zero matrix has no spread to standardise: N(0, 1e-3²) cut at ±2σ, as Bi-AdaptFormer
                nn.init.trunc_normal_(self.up.weight, std=1e-3, a=-2e-3, b=2e-3)
            else:
                nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)


@PEFT.register("convpass", config=ConvpassConfig, help="Convpass: 3x3-conv bypasses parallel to attention and MLP")
class Convpass(PeftMethod):
    supports_1bit = True

    def __init__(self, cfg: ConvpassConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        d = vit_dim(model)
        self.bypass = nn.ModuleList(Bypass(d, cfg.dim, cfg.conv_init, cfg.bits) for _ in range(2 * len(vit_blocks(model))))
        self.act = QuickGELU()
        self.drop = nn.Dropout(cfg.dropout)
        self.n_prefix = int(getattr(model, "num_prefix_tokens", 1))
        self.grid = tuple(model.patch_embed.grid_size)

    def identity_at_init(self) -> bool:
        return self.cfg.bits == 32

    def cp(self, k: int, z: Tensor) -> Tensor:
        bp = self.bypass[k]
        h = self.act(nn.functional.linear(z, self.w(bp.down.weight), bp.down.bias))
        b, n, m = h.shape
        gh, gw = self.grid
        if n - self.n_prefix != gh * gw:
            raise ConfigError(f"peft convpass: {n - self.n_prefix} patch tokens do not form the {gh}x{gw} grid")
        weight = self.w(bp.conv.weight)
        patches = h[:, self.n_prefix :].transpose(1, 2).reshape(b, m, gh, gw)
        patches = nn.functional.conv2d(patches, weight, bp.conv.bias, padding=1).reshape(b, m, gh * gw).transpose(1, 2)
        prefix = nn.functional.linear(h[:, : self.n_prefix], weight[:, :, 1, 1], bp.conv.bias)
        h = self.drop(self.act(torch.cat([prefix, patches], dim=1)))
        return self.cfg.scale * nn.functional.linear(h, self.w(bp.up.weight), bp.up.bias)

    def hooks(self, model: nn.Module) -> list[Hook]:
        out: list[Hook] = []
        for i, block in enumerate(vit_blocks(model)):
            for j, (norm, scale) in enumerate(((block.norm1, block.ls1), (block.norm2, block.ls2))):
                k = 2 * i + j
                out.append((norm, "forward", self.stash_output(k)))  # LN1 x / LN2 x'
                out.append((scale, "forward", self.add_branch(k, functools.partial(self.cp, k))))
        return out
