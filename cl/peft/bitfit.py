"""BitFit (Ben Zaken et al., ACL 2022): train only the biases.

Per task the module holds a zero-initialised offset for every bias of the backbone (Linear, conv,
LayerNorm and BatchNorm), added to that layer's output by a hook, so the backbone itself is never
changed and tasks do not share biases. 102,912 parameters on ViT-B/16 (every bias, LayerNorm biases
included). Mergeable: ``b ← b + δ``. Applies to ViTs and ResNets.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from cl.peft.base import Hook, PeftConfig, PeftMethod
from cl.registry import PEFT


class BitFitConfig(PeftConfig):
    name: Literal["bitfit"] = "bitfit"


def biased_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: m for name, m in model.named_modules()
        if isinstance(getattr(m, "bias", None), nn.Parameter) and isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm))
    }


@PEFT.register("bitfit", config=BitFitConfig, help="BitFit: per-task bias offsets")
class BitFit(PeftMethod):
    mergeable = True
    backbones = ("vit", "resnet")

    def __init__(self, cfg: BitFitConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        modules = biased_modules(model)
        self.keys = {name: name.replace(".", "_") for name in modules}
        self.delta = nn.ParameterDict({self.keys[n]: nn.Parameter(torch.zeros_like(m.bias)) for n, m in modules.items()})

    def identity_at_init(self) -> bool:
        return True

    def hooks(self, model: nn.Module) -> list[Hook]:
        return [(m, "forward", self._hook(self.keys[n])) for n, m in biased_modules(model).items()]

    def _hook(self, key: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
            delta = self.delta[key]
            channels_first = isinstance(module, (nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm))
            return out + (delta.view(-1, *([1] * (out.dim() - 2))) if channels_first else delta)

        return hook

    def merged_weights(self, model: nn.Module) -> dict[str, Tensor]:
        return {f"{n}.bias": m.bias.detach() + self.delta[self.keys[n]].detach() for n, m in biased_modules(model).items()}
