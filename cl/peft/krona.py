"""KronA: Kronecker-product adapters (Edalati, Tahaei, Kobyzev, Nia, Clark, Rezagholizadeh; arXiv 2212.10650, 2022).

https://arxiv.org/abs/2212.10650 (T5 on GLUE; no official code). A frozen Linear ``W`` (d_out × d_in)
gains a parallel update ``ΔW = s·(A ⊗ B)`` with ``A`` (a1 × a2) and ``B`` (b1 × b2),
``a1·b1 = d_out`` and ``a2·b2 = d_in``. The product is never formed in the forward pass:
with ``X = x`` reshaped to (a2, b2), ``(A ⊗ B) x = vec(A X Bᵀ)`` (row-major vec), which costs
``a1·a2·b2 + a1·b2·b1`` multiply-adds instead of ``d_out·d_in``. rank(A ⊗ B) = rank A · rank B, so
a few thousand parameters can reach full rank. Mergeable: ``W += s·kron(A, B)`` (exact up to
float rounding).

Placement follows the paper (parallel to W_q and W_v): on timm's fused ``attn.qkv`` the q and v
thirds get separate products (one product over the fused 3d × d matrix would couple q, k and v);
``targets`` may also name k, the attention output ``proj`` and the MLP's ``fc1``/``fc2``.

Our reconstruction, where the paper is silent or unverified:

* init: ``A`` kaiming-uniform and ``B = 0``, so the module is an identity at init (the framework's
  default, as in third-party ports and peft's LoKr; the paper's init is unverified). With ``bits: 1``
  ``B`` is drawn from N(0, 1e-3²) cut at ±2σ instead (a zero matrix cannot be standardised), as
  our 1-bit LoRA does.
* ``scale`` s is applied exactly once, in the branch and in the merge (one port applies it twice).
  The paper's value is unverified; default 1.
* factor shapes: ``factors: [a1, a2]`` for every target (must divide each target's sizes), or by
  default per target the pair with the fewest parameters ``a1·a2 + d_out·d_in/(a1·a2)``, ties going
  to the squarest pair and then to the larger a1: (32, 24) on ViT-B/16's q and v, i.e.
  768 + 768 = 1,536 parameters per matrix and 36,864 for q and v over 12 blocks.
* the KronA^B variants (a Kronecker branch parallel to the whole FFN, with a learned residual scale)
  are not implemented.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from cl.errors import ConfigError
from cl.peft.base import Hook, PeftConfig, PeftMethod, block_prefix, vit_blocks
from cl.registry import PEFT

Target = Literal["q", "k", "v", "proj", "fc1", "fc2"]
QKV = ("q", "k", "v")


class KronAConfig(PeftConfig):
    name: Literal["krona"] = "krona"
    targets: list[Target] = Field(default_factory=lambda: ["q", "v"], min_length=1,
                                  description="matrices adapted in every block: q, k, v (thirds of attn.qkv), proj, fc1, fc2")
    factors: list[int] | None = Field(None, min_length=2, max_length=2,
                                      description="[a1, a2], the shape of A for every target; null = fewest parameters per target")
    scale: float = Field(1.0, description="s in ΔW = s·(A ⊗ B) (paper value unverified)")
    dropout: float = Field(0.0, ge=0, lt=1, description="on the branch input")


# ---- the maths ---------------------------------------------------------------------------------


def kron_apply(a: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """``x @ kron(a, b).T`` for x of shape (..., a2·b2), without forming the Kronecker product."""
    (a1, a2), (b1, b2) = a.shape, b.shape
    big_x = x.reshape(*x.shape[:-1], a2, b2)
    return (a @ big_x @ b.t()).reshape(*x.shape[:-1], a1 * b1)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def default_factors(d_out: int, d_in: int) -> tuple[int, int]:
    """(a1, a2) minimising ``a1·a2 + d_out·d_in / (a1·a2)``; ties: squarest A, then larger a1."""
    pairs = [(a1, a2) for a1 in _divisors(d_out) for a2 in _divisors(d_in)]
    return min(pairs, key=lambda f: (f[0] * f[1] + d_out * d_in // (f[0] * f[1]), abs(math.log(f[0] / f[1])), -f[0]))


def factor_shapes(d_out: int, d_in: int, factors: list[int] | None, target: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of A and B for a (d_out × d_in) matrix; a one-line ConfigError if ``factors`` do not divide it."""
    a1, a2 = factors if factors is not None else default_factors(d_out, d_in)
    if a1 < 1 or a2 < 1 or d_out % a1 or d_in % a2:
        raise ConfigError(f"peft krona.factors: ({a1}, {a2}) must divide {target}'s (d_out, d_in) = ({d_out}, {d_in})")
    return (a1, a2), (d_out // a1, d_in // a2)


# ---- the module --------------------------------------------------------------------------------


@PEFT.register("krona", config=KronAConfig, help="KronA: Kronecker-product updates s·(A ⊗ B) of q and v (or other Linears)")
class KronA(PeftMethod):
    mergeable = True
    supports_1bit = True

    def __init__(self, cfg: KronAConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        self.targets = list(dict.fromkeys(cfg.targets))  # keep order, drop repeats
        blocks = vit_blocks(model)
        self.A, self.B = nn.ModuleDict(), nn.ModuleDict()
        for t in self.targets:
            d_out, d_in = self._dims(blocks[0], t)
            shape_a, shape_b = factor_shapes(d_out, d_in, cfg.factors, t)
            self.A[t] = nn.ParameterList(torch.empty(shape_a) for _ in blocks)
            self.B[t] = nn.ParameterList(torch.zeros(shape_b) for _ in blocks)
        self.drop = nn.Dropout(cfg.dropout)
        with torch.no_grad():
            for t in self.targets:
                for a, b in zip(self.A[t], self.B[t]):
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                    if cfg.bits == 1:
                        nn.init.trunc_normal_(b, std=1e-3, a=-2e-3, b=2e-3)

    @staticmethod
    def _dims(block: nn.Module, target: str) -> tuple[int, int]:
        if target in QKV:
            return block.attn.qkv.in_features, block.attn.qkv.in_features
        lin = block.attn.proj if target == "proj" else getattr(block.mlp, target)
        return lin.out_features, lin.in_features

    def identity_at_init(self) -> bool:
        return self.cfg.bits == 32

    def delta_weight(self, target: str, i: int) -> Tensor:
        """s·(A ⊗ B) of block ``i``: only for merging and tests, never in the forward pass."""
        return self.cfg.scale * torch.kron(self.w(self.A[target][i]), self.w(self.B[target][i]))

    def _update(self, target: str, i: int, x: Tensor) -> Tensor:
        return self.cfg.scale * kron_apply(self.w(self.A[target][i]), self.w(self.B[target][i]), self.drop(x))

    def hooks(self, model: nn.Module) -> list[Hook]:
        out: list[Hook] = []
        for i, block in enumerate(vit_blocks(model)):
            if any(t in QKV for t in self.targets):
                out.append((block.attn.qkv, "forward", self._qkv_hook(i)))
            for t in self.targets:
                if t not in QKV:
                    lin = block.attn.proj if t == "proj" else getattr(block.mlp, t)
                    out.append((lin, "forward", self._linear_hook(t, i)))
        return out

    def _qkv_hook(self, i: int):
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
            x, d = args[0], out.shape[-1] // 3
            parts = [self._update(t, i, x) if t in self.targets else out.new_zeros(*out.shape[:-1], d) for t in QKV]
            return out + torch.cat(parts, dim=-1)

        return hook

    def _linear_hook(self, target: str, i: int):
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
            return out + self._update(target, i, args[0])

        return hook

    def merged_weights(self, model: nn.Module) -> dict[str, Tensor]:
        new: dict[str, Tensor] = {}
        for i, block in enumerate(vit_blocks(model)):
            prefix = block_prefix(model, block)
            for t in self.targets:
                if t in QKV:
                    key = f"{prefix}.attn.qkv.weight"
                    w = new.get(key, block.attn.qkv.weight.detach().clone())
                    d = w.shape[1]
                    k = QKV.index(t)
                    w[k * d : (k + 1) * d] += self.delta_weight(t, i).detach()
                else:
                    key = f"{prefix}.attn.proj.weight" if t == "proj" else f"{prefix}.mlp.{t}.weight"
                    lin = block.attn.proj if t == "proj" else getattr(block.mlp, t)
                    w = lin.weight.detach().clone() + self.delta_weight(t, i).detach()
                new[key] = w
        return new
