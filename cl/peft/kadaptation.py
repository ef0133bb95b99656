"""KAdaptation (He et al., AAAI 2023; eric-ai-lab/PEViT): Kronecker-factored updates of W_q, W_v.

``q ← q + c·x H_q + b``, ``v ← v + c·x H_v + b`` with ``H = Σ_{i≤n} A_i ⊗ (u_i v_iᵀ)``: the "slow"
``A_i`` (n×n, rank-1 factored ``a_i b_iᵀ``) are shared by all layers (one set for q, one for v),
the "fast" ``u_i, v_i`` (length d/n) belong to each layer, and ``b`` is one bias per layer. n = 32
on ViT-B/16 (d = 768 = 32·24). A ~ U(±0.01), ``v_i`` ~ U(±0.01) and ``u_i`` = 0 (the official code
zero-fills both, which would block all gradients; zeroing one factor keeps the update zero at init
and trainable), c = 160, dropout 0.5 on H. 50,176 parameters on ViT-B/16. Mergeable:
``W_q += c·H_qᵀ``, q bias += b (and the same for v).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from cl.errors import ConfigError
from cl.peft.base import Hook, PeftConfig, PeftMethod, block_prefix, vit_blocks, vit_dim
from cl.registry import PEFT


class KAdaptationConfig(PeftConfig):
    name: Literal["kadaptation"] = "kadaptation"
    n: int = Field(32, ge=1, description="size of the shared factors A_i (n x n) and number of terms; must divide d")
    scale: float = Field(160.0, description="c (alpha / r * 5 in the official code)")
    dropout: float = Field(0.5, ge=0, lt=1, description="on H")
    init_range: float = Field(0.01, gt=0)


@PEFT.register("kadaptation", config=KAdaptationConfig, help="KAdaptation: shared-slow x per-layer-fast Kronecker updates of q and v")
class KAdaptation(PeftMethod):
    mergeable = True

    def __init__(self, cfg: KAdaptationConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        d, n = vit_dim(model), cfg.n
        if d % n:
            raise ConfigError(f"peft kadaptation: n={n} does not divide the token width {d}")
        m, layers, r = d // n, len(vit_blocks(model)), cfg.init_range
        self.slow = nn.Parameter(torch.empty(2, n, 2, n).uniform_(-r, r))  # [q|v, term, left|right factor, n]
        self.fast_u = nn.Parameter(torch.zeros(layers, 2, n, m))
        self.fast_v = nn.Parameter(torch.empty(layers, 2, n, m).uniform_(-r, r))
        self.bias = nn.Parameter(torch.zeros(layers, d))
        self.drop = nn.Dropout(cfg.dropout)

    def identity_at_init(self) -> bool:
        return True

    def H(self, layer: int, part: int) -> Tensor:
        """(d, d): Σ_i A_i ⊗ B_i for layer ``layer``, part 0 = q, 1 = v."""
        a = torch.einsum("ix,iy->ixy", self.slow[part, :, 0], self.slow[part, :, 1])  # (n, n, n)
        b = torch.einsum("ix,iy->ixy", self.fast_u[layer, part], self.fast_v[layer, part])  # (n, m, m)
        n, m = a.shape[1], b.shape[1]
        return torch.einsum("ixy,ipq->xpyq", a, b).reshape(n * m, n * m)

    def hooks(self, model: nn.Module) -> list[Hook]:
        return [(block.attn.qkv, "forward", self._hook(i)) for i, block in enumerate(vit_blocks(model))]

    def _hook(self, i: int):
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
            x = args[0]
            dq = self.cfg.scale * x @ self.drop(self.H(i, 0)) + self.bias[i]
            dv = self.cfg.scale * x @ self.drop(self.H(i, 1)) + self.bias[i]
            return out + torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)

        return hook

    def merged_weights(self, model: nn.Module) -> dict[str, Tensor]:
        new = {}
        for i, block in enumerate(vit_blocks(model)):
            qkv = block.attn.qkv
            if qkv.bias is None:
                raise ValueError("kadaptation: cannot merge its bias into a qkv without bias")
            d = qkv.in_features
            w, b = qkv.weight.detach().clone(), qkv.bias.detach().clone()
            for part, rows in ((0, slice(0, d)), (1, slice(2 * d, 3 * d))):
                w[rows] += self.cfg.scale * self.H(i, part).detach().t()
                b[rows] += self.bias[i].detach()
            prefix = block_prefix(model, block)
            new[f"{prefix}.attn.qkv.weight"] = w
            new[f"{prefix}.attn.qkv.bias"] = b
        return new
