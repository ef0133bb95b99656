"""Consolidator: mergeable adapter with grouped connections (Hao et al., ICLR 2023).

Every ``qkv``, ``proj``, ``fc1`` and ``fc2`` of a ViT gets a parallel branch: a grouped fully
connected layer (block-diagonal, ``groups`` blocks) applied to a channel-shuffled input, plus a
bias: ``out = W x + b + G·shuffle(x) + b_g``. The shuffle sends input channel ``j·g + c`` to group
``c`` (ShuffleNet order), so each group mixes channels from across the width. Default one branch
with g = d/2 groups (g=384 on ViT-B/16: each qkv output sees 2 inputs); init U(±1e-3) (a near
identity, not exact). 304,128 parameters on ViT-B/16. The official code also unfreezes LayerNorms
and biases (``tune_norms_biases``), not counted in the paper's 0.35%. Mergeable: the branch is the
sparse matrix ``G P`` (P the shuffle permutation) added to W, its bias to b.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from cl.errors import ConfigError
from cl.peft.base import Hook, PeftConfig, PeftMethod, block_prefix, vit_blocks, vit_dim
from cl.registry import PEFT

TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


class ConsolidatorConfig(PeftConfig):
    name: Literal["consolidator"] = "consolidator"
    groups: int | None = Field(None, ge=1, description="g; default d/2 (384 on ViT-B/16)")
    init_range: float = Field(1e-3, ge=0)
    drop_path: float = Field(0.0, ge=0, lt=1, description="on the branch (tuned per task in 0..0.8)")


def shuffle_perm(n: int, groups: int) -> Tensor:
    """Input order after the channel shuffle: group c gets channels c, c+g, c+2g, ..."""
    return torch.arange(n).view(n // groups, groups).t().reshape(-1)


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    out = []
    for block in vit_blocks(model):
        prefix = block_prefix(model, block)
        modules = dict(block.named_modules())
        out += [(f"{prefix}.{t}", modules[t]) for t in TARGETS]
    return out


@PEFT.register("consolidator", config=ConsolidatorConfig, help="Consolidator: grouped, shuffled parallel FC branches, mergeable")
class Consolidator(PeftMethod):
    mergeable = True

    def __init__(self, cfg: ConsolidatorConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        g = cfg.groups or vit_dim(model) // 2
        self.groups = g
        self.keys: dict[str, str] = {}
        weights, biases = {}, {}
        for name, lin in _linears(model):
            if lin.in_features % g or lin.out_features % g:
                raise ConfigError(f"peft consolidator: groups={g} does not divide {name} ({lin.in_features}->{lin.out_features})")
            key = name.replace(".", "_")
            self.keys[name] = key
            weights[key] = nn.Parameter(torch.empty(g, lin.out_features // g, lin.in_features // g).uniform_(-cfg.init_range, cfg.init_range))
            biases[key] = nn.Parameter(torch.empty(lin.out_features).uniform_(-cfg.init_range, cfg.init_range))
            self.register_buffer(f"perm_{key}", shuffle_perm(lin.in_features, g), persistent=False)
        self.weight = nn.ParameterDict(weights)
        self.bias = nn.ParameterDict(biases)

    def branch(self, key: str, x: Tensor) -> Tensor:
        xs = x[..., getattr(self, f"perm_{key}")].unflatten(-1, (self.groups, -1))  # (..., g, in/g)
        y = torch.einsum("...gi,goi->...go", xs, self.weight[key]).flatten(-2) + self.bias[key]
        if self.training and self.cfg.drop_path > 0:  # per-sample drop of the whole branch
            keep = torch.rand(y.shape[0], *([1] * (y.dim() - 1)), device=y.device) >= self.cfg.drop_path
            y = y * keep / (1 - self.cfg.drop_path)
        return y

    def hooks(self, model: nn.Module) -> list[Hook]:
        return [(lin, "forward", self._hook(self.keys[name])) for name, lin in _linears(model)]

    def _hook(self, key: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
            return out + self.branch(key, args[0])

        return hook

    def delta_weight(self, key: str) -> Tensor:
        """The dense equivalent of the branch: block-diagonal G with columns un-shuffled."""
        w = self.weight[key].detach()
        g, o, i = w.shape
        block = torch.block_diag(*w)  # (out, in) over shuffled inputs
        delta = torch.zeros_like(block)
        delta[:, getattr(self, f"perm_{key}")] = block
        return delta

    def merged_weights(self, model: nn.Module) -> dict[str, Tensor]:
        new = {}
        for name, lin in _linears(model):
            key = self.keys[name]
            if lin.bias is None:
                raise ValueError(f"consolidator: cannot merge the branch bias into {name}, which has no bias")
            new[f"{name}.weight"] = lin.weight.detach() + self.delta_weight(key)
            new[f"{name}.bias"] = lin.bias.detach() + self.bias[key].detach()
        return new
