"""SSF: scaling and shifting features (Lian et al., NeurIPS 2022).

A per-channel ``γ⊙h + β`` after the patch-embedding projection, after LN1, qkv, proj, LN2, fc1
and fc2 of every block, and after the final norm. Init γ ~ N(1, 0.02), β ~ N(0, 0.02) (so not an
exact identity). 205,824 parameters on ViT-B/16. Mergeable into the preceding layer: after a
Linear or conv ``W ← diag(γ) W, b ← γ⊙b + β``; after a LayerNorm ``g ← γ⊙g, b ← γ⊙b + β``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from cl.errors import ConfigError
from cl.peft.base import Hook, PeftConfig, PeftMethod, vit_blocks
from cl.registry import PEFT


class SSFConfig(PeftConfig):
    name: Literal["ssf"] = "ssf"
    init_std: float = 0.02


def ssf_targets(model: nn.Module) -> dict[str, nn.Module]:
    """Backbone module name -> module whose output SSF scales and shifts."""
    names = ["patch_embed.proj"]
    for i, _ in enumerate(vit_blocks(model)):
        names += [f"blocks.{i}.{n}" for n in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")]
    names.append("norm")
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ConfigError(f"peft.name: 'ssf' expects timm ViT module '{missing[0]}', which {type(model).__name__} lacks")
    return {n: modules[n] for n in names}


def _channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    raise ConfigError(f"peft.name: 'ssf' cannot follow a {type(module).__name__}")


@PEFT.register("ssf", config=SSFConfig, help="SSF per-channel scale and shift")
class SSF(PeftMethod):
    mergeable = True

    def __init__(self, cfg: SSFConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        targets = ssf_targets(model)
        self.keys = {name: name.replace(".", "_") for name in targets}
        self.gamma = nn.ParameterDict({k: nn.Parameter(torch.empty(_channels(targets[n])).normal_(1.0, cfg.init_std)) for n, k in self.keys.items()})
        self.beta = nn.ParameterDict({k: nn.Parameter(torch.empty(_channels(targets[n])).normal_(0.0, cfg.init_std)) for n, k in self.keys.items()})

    def hooks(self, model: nn.Module) -> list[Hook]:
        return [(module, "forward", self._hook(self.keys[name])) for name, module in ssf_targets(model).items()]

    def _hook(self, key: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
            g, b = self.gamma[key], self.beta[key]
            if isinstance(module, nn.Conv2d):  # channels first
                return out * g[:, None, None] + b[:, None, None]
            return out * g + b

        return hook

    def merged_weights(self, model: nn.Module) -> dict[str, Tensor]:
        new: dict[str, Tensor] = {}
        for name, module in ssf_targets(model).items():
            g, b = self.gamma[self.keys[name]].detach(), self.beta[self.keys[name]].detach()
            if module.bias is None:
                raise ValueError(f"ssf: cannot merge into {name}, which has no bias")
            weight = module.weight.detach()
            shape = (-1,) + (1,) * (weight.dim() - 1)
            new[f"{name}.weight"] = weight * g.view(shape)
            new[f"{name}.bias"] = module.bias.detach() * g + b
        return new
