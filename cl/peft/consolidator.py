"""Consolidator: mergeable adapter with grouped connections (Hao et al., ICLR 2023; THU-MIG/Consolidator).

Every ``qkv``, ``proj``, ``fc1`` and ``fc2`` of a ViT gets parallel branches, each a grouped fully
connected layer (block-diagonal with ``g`` blocks) on the layer's input, with its own bias:
``out = W x + b + Σ_branches DropPath(G_g·shuffle_g(x) + b_g)``. ``groups: [384]`` (the default
on ViT-B/16: d/2, so each qkv output sees 2 inputs) is one branch; ``groups: [384, 192]`` the
paper's multi-branch form, summed. Init U(±1e-3) (a near identity, not exact). 304,128 parameters
on ViT-B/16 with one branch. The official code also unfreezes LayerNorms and biases, not counted in
the paper's 0.35% and not done here.

``channel_shuffle``: ``false`` (default; the official VTAB runs) feeds group c the contiguous inputs
c·in/g … (c+1)·in/g − 1; ``true`` applies the official ``ChannelShuffle1d(g)`` first (view the
inputs as g × in/g, transpose, flatten: position a·g + b takes input b·in/g + a).

Mergeable in the paper's two consolidations: the branches sum into one sparse matrix (the union of
their permuted block-diagonal masks; :meth:`Consolidator.consolidated` gives it,
:meth:`Consolidator.stored_entries` its size), and that matrix and the summed biases add to W and b.
The per-task bank stores the branches as trained (``groups`` dense blocks each), not the sparse
consolidated matrix: with several shuffled branches that is more than the paper stores.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from cl.errors import ConfigError
from cl.peft.base import Hook, PeftConfig, PeftMethod, block_prefix, vit_blocks, vit_dim
from cl.registry import PEFT

TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


class ConsolidatorConfig(PeftConfig):
    name: Literal["consolidator"] = "consolidator"
    groups: list[int] | None = Field(None, min_length=1, description="g of each branch; default [d/2] (one branch, 384 on ViT-B/16)")
    channel_shuffle: bool = Field(False, description="the official ChannelShuffle1d before each branch (the official VTAB runs: off)")
    init_range: float = Field(1e-3, ge=0)
    drop_path: float = Field(0.0, ge=0, lt=1, description="on each branch (tuned per task in 0..0.8)")

    @field_validator("groups")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (min(v) < 1 or len(set(v)) != len(v)):
            raise ValueError("groups must be distinct positive integers")
        return v


@functools.lru_cache(maxsize=None)
def shuffle_perm(n: int, groups: int) -> Tensor:
    """The official ChannelShuffle1d(groups) as an index: shuffled position a·g + b takes input b·n/g + a."""
    return torch.arange(n).view(groups, n // groups).t().reshape(-1)


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    out = []
    for block in vit_blocks(model):
        prefix = block_prefix(model, block)
        modules = dict(block.named_modules())
        out += [(f"{prefix}.{t}", modules[t]) for t in TARGETS]
    return out


@PEFT.register("consolidator", config=ConsolidatorConfig, help="Consolidator: grouped (optionally shuffled) parallel FC branches, mergeable")
class Consolidator(PeftMethod):
    mergeable = True

    def __init__(self, cfg: ConsolidatorConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        self.groups = list(cfg.groups or [vit_dim(model) // 2])
        self.keys: dict[str, str] = {}
        weights, biases = {}, {}
        for name, lin in _linears(model):
            key = name.replace(".", "_")
            self.keys[name] = key
            for g in self.groups:
                if lin.in_features % g or lin.out_features % g:
                    raise ConfigError(f"peft consolidator: groups={g} does not divide {name} ({lin.in_features}->{lin.out_features})")
                w = torch.empty(g, lin.out_features // g, lin.in_features // g).uniform_(-cfg.init_range, cfg.init_range)
                weights[f"{key}_g{g}"] = nn.Parameter(w)
                biases[f"{key}_g{g}"] = nn.Parameter(torch.empty(lin.out_features).uniform_(-cfg.init_range, cfg.init_range))
        self.weight = nn.ParameterDict(weights)
        self.bias = nn.ParameterDict(biases)

    def _branch(self, key: str, g: int, x: Tensor) -> Tensor:
        if self.cfg.channel_shuffle:
            x = x[..., shuffle_perm(x.shape[-1], g).to(x.device)]
        xs = x.unflatten(-1, (g, -1))  # (..., g, in/g)
        y = torch.einsum("...gi,goi->...go", xs, self.weight[f"{key}_g{g}"]).flatten(-2) + self.bias[f"{key}_g{g}"]
        if self.training and self.cfg.drop_path > 0:  # per-sample drop of the whole branch
            keep = torch.rand(y.shape[0], *([1] * (y.dim() - 1)), device=y.device) >= self.cfg.drop_path
            y = y * keep / (1 - self.cfg.drop_path)
        return y

    def branches(self, key: str, x: Tensor) -> Tensor:
        return sum(self._branch(key, g, x) for g in self.groups)  # type: ignore[return-value]

    def hooks(self, model: nn.Module) -> list[Hook]:
        return [(lin, "forward", self._hook(self.keys[name])) for name, lin in _linears(model)]

    def _hook(self, key: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
            return out + self.branches(key, args[0])

        return hook

    def delta_weight(self, key: str, g: int) -> Tensor:
        """The dense equivalent of one branch: block-diagonal G with its columns un-shuffled."""
        return self._dense(self.weight[f"{key}_g{g}"].detach(), g)

    def _dense(self, blocks: Tensor, g: int) -> Tensor:
        block = torch.block_diag(*blocks)  # (out, in) over the branch's inputs
        if not self.cfg.channel_shuffle:
            return block
        dense = torch.zeros_like(block)
        dense[:, shuffle_perm(block.shape[1], g).to(block.device)] = block
        return dense

    def consolidated(self, key: str) -> tuple[Tensor, Tensor]:
        """Consolidation 1: the branches summed into one matrix, and their summed bias."""
        delta = sum(self.delta_weight(key, g) for g in self.groups)
        bias = sum(self.bias[f"{key}_g{g}"].detach() for g in self.groups)
        return delta, bias  # type: ignore[return-value]

    def stored_entries(self, key: str) -> int:
        """Entries the consolidated matrix can have non-zero: the union of the branches' (permuted)
        block-diagonal masks, what the paper stores after consolidation 1."""
        masks = [self._dense(torch.ones_like(self.weight[f"{key}_g{g}"]), g) for g in self.groups]
        return int((sum(masks) > 0).sum())  # type: ignore[union-attr]

    def merged_weights(self, model: nn.Module) -> dict[str, Tensor]:
        new = {}
        for name, lin in _linears(model):
            if lin.bias is None:
                raise ValueError(f"consolidator: cannot merge the branch bias into {name}, which has no bias")
            delta, bias = self.consolidated(self.keys[name])
            new[f"{name}.weight"] = lin.weight.detach() + delta
            new[f"{name}.bias"] = lin.bias.detach() + bias
        return new
