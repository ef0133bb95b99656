"""LoRA (Hu et al., ICLR 2022) on a ViT's attention.

``targets: qkv`` adds ``scale·B A x`` to the fused qkv projection (NOAH's VTAB baseline, r=8:
0.29M on ViT-B/16); ``targets: qv`` adds separate rank-r updates to the query and value thirds only
(the LoRA paper's choice, the same count). Both are output hooks on timm's fused ``attn.qkv``
Linear, so no attention code is patched. ``A`` is kaiming-uniform and ``B`` zero, so the update is
zero at init; ``scale`` is ``alpha / rank`` (``alpha: null`` = 1, as NOAH). Mergeable:
``W_qkv += scale·B A``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from cl.peft.base import Hook, PeftConfig, PeftMethod, block_prefix, vit_blocks, vit_dim
from cl.registry import PEFT


class LoRAConfig(PeftConfig):
    name: Literal["lora"] = "lora"
    rank: int = Field(8, ge=1)
    alpha: float | None = Field(None, gt=0, description="scale = alpha / rank; null = 1 (NOAH)")
    targets: Literal["qkv", "qv"] = "qkv"
    dropout: float = Field(0.0, ge=0, lt=1)


@PEFT.register("lora", config=LoRAConfig, help="LoRA on the fused qkv or on q and v")
class LoRA(PeftMethod):
    mergeable = True
    supports_1bit = True

    def __init__(self, cfg: LoRAConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        d, r = vit_dim(model), cfg.rank
        self.scale = cfg.alpha / r if cfg.alpha is not None else 1.0
        self.parts = ("qkv",) if cfg.targets == "qkv" else ("q", "v")
        outs = {"qkv": 3 * d, "q": d, "v": d}
        n = len(vit_blocks(model))
        # one matrix per block and part (1-bit quantisation is per matrix)
        self.A = nn.ModuleDict({p: nn.ParameterList(torch.empty(r, d) for _ in range(n)) for p in self.parts})
        self.B = nn.ModuleDict({p: nn.ParameterList(torch.zeros(outs[p], r) for _ in range(n)) for p in self.parts})
        self.drop = nn.Dropout(cfg.dropout)
        with torch.no_grad():
            for p in self.parts:
                for i in range(n):
                    nn.init.kaiming_uniform_(self.A[p][i], a=math.sqrt(5))
                    if cfg.bits == 1:
                        nn.init.trunc_normal_(self.B[p][i], std=1e-3, a=-2e-3, b=2e-3)  # cut at ±2σ

    def identity_at_init(self) -> bool:
        return self.cfg.bits == 32

    def delta_weight(self, part: str, i: int) -> Tensor:
        return self.scale * self.w(self.B[part][i]) @ self.w(self.A[part][i])

    def hooks(self, model: nn.Module) -> list[Hook]:
        return [(block.attn.qkv, "forward", self._hook(i)) for i, block in enumerate(vit_blocks(model))]

    def _update(self, part: str, i: int, x: Tensor) -> Tensor:
        h = nn.functional.linear(self.drop(x), self.w(self.A[part][i]))
        return self.scale * nn.functional.linear(h, self.w(self.B[part][i]))

    def _hook(self, i: int):
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
            x = args[0]
            if self.parts == ("qkv",):
                return out + self._update("qkv", i, x)
            dq, dv = self._update("q", i, x), self._update("v", i, x)
            return out + torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)

        return hook

    def merged_weights(self, model: nn.Module) -> dict[str, Tensor]:
        new = {}
        for i, block in enumerate(vit_blocks(model)):
            w = block.attn.qkv.weight.detach().clone()
            d = w.shape[1]
            if self.parts == ("qkv",):
                w += self.delta_weight("qkv", i)
            else:
                w[:d] += self.delta_weight("q", i)
                w[2 * d :] += self.delta_weight("v", i)
            new[f"{block_prefix(model, block)}.attn.qkv.weight"] = w
        return new
