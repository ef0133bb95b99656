"""MemVP on a ViT's FFNs: memory rows added to each MLP (after "Memory-Space Visual Prompting for
Efficient Vision-Language Fine-Tuning", Jie, Tang, Ding, Deng, Yu; ICML 2024; arXiv 2405.05615).

https://arxiv.org/abs/2405.05615. The paper adapts a *language* model to images: the visual tokens
of a frozen CLIP encoder, projected (``0.01·P(Z)``), are not prepended to the text but written into
the FFN of every LLaMA block as extra key/value memory, ``out = h + FFN(u) + s·φ(u Kᵀ) V`` with
``K = P(Z) + E_k`` and ``V = P(Z) + E_v``, which equals an FFN with m more hidden units.

Here there is no language model: the module adds m *learned* key/value rows to every ViT FFN,
per block, fed with the FFN's own input z = LN2 x' and added to its output,

    y = x' + MLP(z) + s·Vᵀ φ(K z + c),   K, V ∈ R^{m×d},

with φ the MLP's own activation module (GELU in timm's ViT), K ~ N(0, 0.02²), V = 0 (the branch is
zero at init, as the official E_k, E_v) and s = 0.1 and dropout 0.1 after φ (the official code's).
Because φ is the MLP's own activation, the block equals a plain timm MLP of width D + m:
``W1' = [W1; K]``, ``b1' = [b1; c]``, ``W2' = [W2, s·Vᵀ]`` (:func:`widen_mlp`). The framework's
in-place merge (:meth:`~cl.peft.base.PeftMethod.merge`) only overwrites parameters of the same
shape, so this method is *not* ``mergeable`` there; :meth:`MemVP.widened_mlps` builds the wider
Linears instead (a structural merge, tested to equal the hooked branch).

Our reconstruction, and where it departs from the official (LLaMA-only) code:

* ``init: learned`` (MemVP-L): the rows are free parameters, 2·d·m per block (147,456 for m = 8
  on ViT-B/16, 1,179,648 for m = 64), plus m per block with ``bias: true`` (the official has none).
* ``init: features`` (MemVP-F): the keys start from the data, ``K = λ·F + E_k``, with F m tokens as
  this block's FFN sees them (LN2 outputs of the frozen pass on the first training batch of the
  task): a random subset (``feature_select: random``) or k-means centres (``kmeans``). P is the
  identity (the tokens already live in the FFN's input space) and λ = 0.01 is the official factor on
  P(Z). F is fixed once per task, not recomputed per image as the official visual tokens are, so
  the module stays input-independent and widenable; V keeps its zero init (the official adds P(Z)
  to V as well, which would make the branch non-zero at init). The strategy calls
  :meth:`MemVP.init_from_data` before the first step (``needs_data``).
* φ is the ViT's GELU, not the official ungated SiLU beside LLaMA's SwiGLU: only the MLP's own
  activation makes the widened FFN exact.
* The same K, V in all layers (official) would not fit a ViT whose blocks have different input
  statistics; here every block has its own rows. Concatenating the rows of all tasks for
  task-agnostic inference is not implemented.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from cl.peft.base import Hook, PeftConfig, PeftMethod, vit_blocks, vit_dim
from cl.registry import PEFT


class MemVPConfig(PeftConfig):
    name: Literal["memvp"] = "memvp"
    memory: int = Field(8, ge=1, description="m: key/value rows added to each FFN")
    scale: float = Field(0.1, description="s on the memory branch (official 0.1)")
    dropout: float = Field(0.1, ge=0, lt=1, description="after φ (official 0.1)")
    bias: bool = Field(False, description="a learned bias c on the keys (the official has none)")
    init: Literal["learned", "features"] = Field("learned", description="learned = K ~ N(0, 0.02²) (MemVP-L); features = K = λ·F + that noise, F from the task's first batch (MemVP-F)")
    feature_select: Literal["random", "kmeans"] = Field("random", description="F: a random subset of tokens or k-means centres (init: features)")
    feature_scale: float = Field(0.01, gt=0, description="λ on the feature rows (the official 0.01 on P(Z))")
    kmeans_iters: int = Field(10, ge=1, description="Lloyd iterations (feature_select: kmeans)")

    @property
    def needs_data(self) -> bool:
        return self.init == "features"


# ---- the maths ---------------------------------------------------------------------------------


def memory_branch(z: Tensor, keys: Tensor, values: Tensor, bias: Tensor | None, act: nn.Module, scale: float,
                  drop: nn.Module | None = None) -> Tensor:
    """s·Vᵀ φ(K z + c) for tokens z (..., d); keys, values (m, d)."""
    h = act(nn.functional.linear(z, keys, bias))
    if drop is not None:
        h = drop(h)
    return scale * h @ values


def widen_mlp(fc1: nn.Linear, fc2: nn.Linear, keys: Tensor, values: Tensor, bias: Tensor | None, scale: float) -> tuple[nn.Linear, nn.Linear]:
    """fc1' = [W1; K] (bias [b1; c]), fc2' = [W2, s·Vᵀ]: the MLP of width D + m that contains the branch."""
    m, d = keys.shape
    wide1 = nn.Linear(d, fc1.out_features + m, bias=fc1.bias is not None or bias is not None)
    wide2 = nn.Linear(fc2.in_features + m, fc2.out_features, bias=fc2.bias is not None)
    with torch.no_grad():
        wide1.weight.copy_(torch.cat([fc1.weight, keys]))
        if wide1.bias is not None:
            b1 = fc1.bias if fc1.bias is not None else fc1.weight.new_zeros(fc1.out_features)
            wide1.bias.copy_(torch.cat([b1, bias if bias is not None else keys.new_zeros(m)]))
        wide2.weight.copy_(torch.cat([fc2.weight, scale * values.t()], dim=1))
        if wide2.bias is not None:
            wide2.bias.copy_(fc2.bias)
    return wide1.to(fc1.weight.dtype), wide2.to(fc2.weight.dtype)


def kmeans(x: Tensor, k: int, iters: int, generator: torch.Generator) -> Tensor:
    """k centres of the rows of x by Lloyd's algorithm from k random rows; an emptied cluster keeps its centre."""
    centres = x[torch.randperm(len(x), generator=generator)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centres, compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=1)
        for j in range(len(centres)):
            members = x[assign == j]
            if len(members):
                centres[j] = members.mean(dim=0)
    return centres


def select_tokens(tokens: Tensor, m: int, how: str, iters: int, generator: torch.Generator) -> Tensor:
    """m rows from tokens (n, d): a random subset (repeated if n < m) or k-means centres."""
    n = len(tokens)
    if how == "kmeans" and n >= m:
        return kmeans(tokens, m, iters, generator)
    order = torch.randperm(n, generator=generator)
    return tokens[order.repeat(-(-m // n))[:m]]


# ---- the module --------------------------------------------------------------------------------


@PEFT.register("memvp", config=MemVPConfig, help="MemVP: m learned (or feature-derived) key/value rows in every ViT FFN")
class MemVP(PeftMethod):
    def __init__(self, cfg: MemVPConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        n, d, m = len(vit_blocks(model)), vit_dim(model), cfg.memory
        self.keys = nn.Parameter(torch.randn(n, m, d) * 0.02)
        self.values = nn.Parameter(torch.zeros(n, m, d))
        self.bias = nn.Parameter(torch.zeros(n, m)) if cfg.bias else None  # c
        self.drop = nn.Dropout(cfg.dropout)
        self.data_initialised = False

    def identity_at_init(self) -> bool:
        return True

    @property
    def needs_data(self) -> bool:
        return self.cfg.init == "features" and not self.data_initialised

    @torch.no_grad()
    def init_from_data(self, model: nn.Module, x: Tensor, generator: torch.Generator) -> None:
        """K ← λ·F + K: F = m tokens of each block's FFN input on the batch ``x`` (already transformed).

        Run on the backbone without this module's branch (V = 0 makes it irrelevant anyway).
        """
        blocks = vit_blocks(model)
        seen: dict[int, Tensor] = {}
        handles = [b.mlp.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0].detach()))
                   for i, b in enumerate(blocks)]
        try:
            model(x)
        finally:
            for h in handles:
                h.remove()
        for i in range(len(blocks)):
            tokens = seen[i].reshape(-1, seen[i].shape[-1]).float().cpu()
            rows = select_tokens(tokens, self.cfg.memory, self.cfg.feature_select, self.cfg.kmeans_iters, generator)
            self.keys[i] += self.cfg.feature_scale * rows.to(self.keys)
        self.data_initialised = True

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # noqa: ANN001, ANN201
        self.data_initialised = True  # loaded rows (e.g. from the bank) are not re-derived from data
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def branch(self, i: int, block: nn.Module, z: Tensor) -> Tensor:
        if self.training and self.needs_data:
            raise RuntimeError("memvp: init 'features' needs init_from_data(model, batch, generator) before training (peft_per_task calls it)")
        bias = self.bias[i] if self.bias is not None else None
        return memory_branch(z, self.keys[i], self.values[i], bias, block.mlp.act, self.cfg.scale, self.drop)

    def hooks(self, model: nn.Module) -> list[Hook]:
        return [(block.mlp, "forward", self._hook(i, block)) for i, block in enumerate(vit_blocks(model))]

    def _hook(self, i: int, block: nn.Module):
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
            return out + self.branch(i, block, args[0])  # before ls2: the widened MLP is exactly this

        return hook

    @torch.no_grad()
    def widened_mlps(self, model: nn.Module) -> list[tuple[nn.Linear, nn.Linear]]:
        """Per block, (fc1', fc2') of width D + m that hold the branch (eval mode: no dropout)."""
        out = []
        for i, block in enumerate(vit_blocks(model)):
            if not isinstance(getattr(block.mlp, "norm", nn.Identity()), nn.Identity):
                raise ValueError("memvp: cannot widen an MLP with a norm between fc1 and fc2")
            bias = self.bias[i] if self.bias is not None else None
            out.append(widen_mlp(block.mlp.fc1, block.mlp.fc2, self.keys[i], self.values[i], bias, self.cfg.scale))
        return out

    def widened_model(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` whose MLPs are widened to hold this module: plain timm modules, no hooks
        (the copy drops every hook, this module's included, so that the branch is not added twice)."""
        wide = copy.deepcopy(model)
        for module in wide.modules():
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
        for block, (fc1, fc2) in zip(vit_blocks(wide), self.widened_mlps(model)):
            block.mlp.fc1, block.mlp.fc2 = fc1, fc2
        return wide
