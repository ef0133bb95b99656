"""FacT: factor-tuning (Jie & Deng, AAAI 2023), tensor-train (TT) and Tucker (TK) formats.

Each block contributes 12 d×d "slices" when the MLP is 4× wide (q, k, v, o, fc1 as 4 row slices,
fc2 as 4 column slices; in general 4 + 2·hidden/d). The increment of every slice of every layer is
``s·V Σ_i U`` with ``U`` (d→r) and ``V`` (r→d) shared by all slices and layers:

* TT: one r×r core Σ_i per slice (1536r + 144r² parameters on ViT-B/16);
* TK: Σ_i = Σ_k P[k, i]·C[:, :, k] from a shared r×r×r core C and P (r × slices) (1536r + r³ + 144r).

V starts at zero (update zero at init); TT cores U(±1/√r), fc2's U(±1/√(4r)) (one
``Linear(4r, r)`` in the official code); dropout 0.1 between core and V. The update is applied as
an output hook on each Linear, and merges exactly into the weights at eval. Default rank 12 for TT
gives 39,168 parameters, the "0.04M" of the paper's table (its per-task configs use 4, 8 or 16 and
average 39.7K); TK defaults to 28 (68,992, the "0.07M": its per-task configs use 16 or 32 and
average 69.0K).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from cl.errors import ConfigError
from cl.peft.base import Hook, PeftConfig, PeftMethod, block_prefix, vit_blocks, vit_dim
from cl.registry import PEFT


class FacTConfig(PeftConfig):
    name: Literal["fact"] = "fact"
    format: Literal["tt", "tk"] = "tt"
    rank: int | None = Field(None, ge=1, description="r; default 12 (tt) / 28 (tk): the single ranks with the papers' 0.04M / 0.07M")
    scale: float = Field(1.0, description="s (tuned per task in 0.01..100 officially)")
    dropout: float = Field(0.1, ge=0, lt=1)


@PEFT.register("fact", config=FacTConfig, help="FacT-TT / FacT-TK factorised increments of all block weights")
class FacT(PeftMethod):
    mergeable = True

    def __init__(self, cfg: FacTConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        d = vit_dim(model)
        r = cfg.rank or (12 if cfg.format == "tt" else 28)
        blocks = vit_blocks(model)
        hidden = blocks[0].mlp.fc1.out_features
        if hidden % d:
            raise ConfigError(f"peft fact: MLP width {hidden} is not a multiple of the token width {d}")
        self.k = hidden // d  # slices of fc1 / fc2
        self.per_block = 4 + 2 * self.k  # q, k, v, o, fc1 slices, fc2 slices
        n_slices = self.per_block * len(blocks)
        self.U = nn.Parameter(torch.empty(r, d))
        self.V = nn.Parameter(torch.zeros(d, r))
        nn.init.kaiming_uniform_(self.U, a=5**0.5)
        if cfg.format == "tt":  # nn.Linear's default init of the official cores: U(±1/√fan_in)
            self.cores = nn.Parameter(torch.empty(n_slices, r, r).uniform_(-(r**-0.5), r**-0.5))
            for i in range(len(blocks)):  # fc2's core is one Linear(k·r → r) officially: fan_in k·r
                start = i * self.per_block + 4 + self.k
                self.cores.data[start : start + self.k].uniform_(-((self.k * r) ** -0.5), (self.k * r) ** -0.5)
        else:
            self.C = nn.Parameter(torch.empty(r, r, r))
            self.P = nn.Parameter(torch.empty(r, n_slices))
            nn.init.xavier_uniform_(self.C)
            nn.init.xavier_uniform_(self.P)
        self.drop = nn.Dropout(cfg.dropout)

    def identity_at_init(self) -> bool:
        return True

    def core(self, start: int, count: int) -> Tensor:
        """Σ for slices [start, start+count): (count, r, r), as matrices acting on U x."""
        if self.cfg.format == "tt":
            return self.cores[start : start + count]
        return torch.einsum("abk,ki->iab", self.C, self.P[:, start : start + count])

    def _slice_updates(self, x: Tensor, start: int, count: int) -> Tensor:
        """(..., count, d): s·V Σ_i U x for each slice."""
        u = nn.functional.linear(x, self.U)  # (..., r)
        h = torch.einsum("...b,iab->...ia", u, self.core(start, count))
        return self.cfg.scale * nn.functional.linear(self.drop(h), self.V)

    def hooks(self, model: nn.Module) -> list[Hook]:
        out: list[Hook] = []
        for i, block in enumerate(vit_blocks(model)):
            base = i * self.per_block
            out.append((block.attn.qkv, "forward", self._rows(base, 3)))
            out.append((block.attn.proj, "forward", self._rows(base + 3, 1)))
            out.append((block.mlp.fc1, "forward", self._rows(base + 4, self.k)))
            out.append((block.mlp.fc2, "forward", self._cols(base + 4 + self.k, self.k)))
        return out

    def _rows(self, start: int, count: int):
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
            upd = self._slice_updates(args[0], start, count)
            return out + upd.flatten(-2)

        return hook

    def _cols(self, start: int, count: int):
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
            x = args[0].unflatten(-1, (count, -1))  # (..., count, d): input slice j feeds core j
            u = nn.functional.linear(x, self.U)  # (..., count, r)
            h = torch.einsum("...ib,iab->...a", u, self.core(start, count))
            return out + self.cfg.scale * nn.functional.linear(self.drop(h), self.V)

        return hook

    def slice_delta(self, start: int, count: int) -> Tensor:
        """(count, d, d): the weight increment of each slice."""
        return self.cfg.scale * torch.einsum("da,iab,be->ide", self.V, self.core(start, count), self.U)

    def merged_weights(self, model: nn.Module) -> dict[str, Tensor]:
        new: dict[str, Tensor] = {}
        for i, block in enumerate(vit_blocks(model)):
            base, prefix = i * self.per_block, block_prefix(model, block)
            for name, lin, start, count, rows in (
                ("attn.qkv", block.attn.qkv, base, 3, True),
                ("attn.proj", block.attn.proj, base + 3, 1, True),
                ("mlp.fc1", block.mlp.fc1, base + 4, self.k, True),
                ("mlp.fc2", block.mlp.fc2, base + 4 + self.k, self.k, False),
            ):
                delta = self.slice_delta(start, count)
                delta = delta.reshape(-1, delta.shape[-1]) if rows else torch.cat(list(delta), dim=1)
                new[f"{prefix}.{name}.weight"] = lin.weight.detach() + delta
        return new
