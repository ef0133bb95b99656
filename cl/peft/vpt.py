"""Visual Prompt Tuning (Jia et al., ECCV 2022), shallow and deep.

Shallow: ``tokens`` learnable prompts inserted after the prefix (CLS) tokens at the input of the
first block (after position embedding, so prompts carry none). Deep: before every later block the
prompt slots are overwritten by that layer's own prompts. The prompt tokens are dropped again after
the final norm, so any pooling (CLS or average) sees the original token layout. Init
U(±√(6/(c·p_h·p_w + d))) (0.0625 on ViT-B/16). Parameters: shallow p·d, deep depth·p·d
(p=50: 0.46M on ViT-B/16). Not mergeable, not an identity at init.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from cl.peft.base import Hook, PeftConfig, PeftMethod, vit_blocks, vit_dim
from cl.registry import PEFT


class VPTConfig(PeftConfig):
    name: Literal["vpt"] = "vpt"
    tokens: int = Field(50, ge=1, description="p prompts per layer")
    deep: bool = True
    dropout: float = Field(0.0, ge=0, lt=1, description="prompt dropout (NOAH: 0.1)")


@PEFT.register("vpt", config=VPTConfig, help="VPT shallow / deep prompt tokens")
class VPT(PeftMethod):
    def __init__(self, cfg: VPTConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        if not all(hasattr(model, n) for n in ("norm_pre", "norm", "num_prefix_tokens")):
            from cl.errors import ConfigError

            raise ConfigError(f"peft.name: 'vpt' needs timm's VisionTransformer token pipeline (norm_pre, norm); {type(model).__name__} lacks it")
        d = vit_dim(model)
        layers = len(vit_blocks(model)) if cfg.deep else 1
        proj = model.patch_embed.proj
        fan = proj.in_channels * math.prod(proj.kernel_size) + d
        bound = math.sqrt(6.0 / fan)
        self.prompts = nn.Parameter(torch.empty(layers, cfg.tokens, d).uniform_(-bound, bound))
        self.drop = nn.Dropout(cfg.dropout)
        self.n_prefix = int(model.num_prefix_tokens)

    def _prompt(self, layer: int, batch: int) -> Tensor:
        return self.drop(self.prompts[layer]).unsqueeze(0).expand(batch, -1, -1)

    def hooks(self, model: nn.Module) -> list[Hook]:
        k, p = self.n_prefix, self.cfg.tokens

        def insert(module: nn.Module, args: tuple[Tensor, ...], x: Tensor) -> Tensor:
            return torch.cat([x[:, :k], self._prompt(0, x.shape[0]).to(x.dtype), x[:, k:]], dim=1)

        def replace(layer: int):
            def hook(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
                x = args[0]
                x = torch.cat([x[:, :k], self._prompt(layer, x.shape[0]).to(x.dtype), x[:, k + p :]], dim=1)
                return (x, *args[1:])

            return hook

        def remove(module: nn.Module, args: tuple[Tensor, ...], x: Tensor) -> Tensor:
            return torch.cat([x[:, :k], x[:, k + p :]], dim=1)

        out: list[Hook] = [(model.norm_pre, "forward", insert)]
        if self.cfg.deep:
            out += [(block, "pre", replace(i)) for i, block in enumerate(vit_blocks(model)) if i > 0]
        out.append((model.norm, "forward", remove))
        return out
