"""Prefix-tuning for timm ViT blocks: per-sample key/value prefixes prepended to self-attention.

Prefix-tuning (Li & Liang, ACL 2021), as the prompt-based continual learners use it (DualPrompt,
CODA-Prompt): in a chosen block the keys and values of self-attention get ``L`` extra rows,

    Attn(x) = softmax(q [P_k; k]ᵀ / √d_h) [P_v; v],    q, k, v = the block's own projections of x,

so the number of output tokens is unchanged. Prefixes are per sample, shape ``(B, L, d)``, and are
split into heads like the keys. Two placements:

* ``project=False`` (the official DualPrompt/CODA code): ``P_k``/``P_v`` are used as they are, i.e.
  added *after* the key/value projections;
* ``project=True`` (the DualPrompt paper's equation): the prefixes are tokens in the block's input
  space, projected by the block's key/value weights (and ``k_norm``) like every other token.

:func:`prefixed` installs this on the given blocks for the duration of a ``with`` statement by
temporarily replacing ``block.attn.forward`` (an instance attribute, removed afterwards). The
replacement calls the block's own ``attn.qkv``, ``q_norm``/``k_norm``, ``attn_drop``, ``norm`` and
``proj`` modules, so timm's code is neither edited nor copied and module-level hooks (PEFT) on
those submodules keep working.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Prefix = tuple[Tensor, Tensor]  # (key prefix, value prefix), each (B, L, d)


def _heads(t: Tensor, n_heads: int) -> Tensor:
    """(B, L, d) -> (B, heads, L, d / heads), the layout timm's attention uses."""
    b, n, d = t.shape
    return t.reshape(b, n, n_heads, d // n_heads).transpose(1, 2)


def prefix_attention(attn: nn.Module, x: Tensor, key_prefix: Tensor, value_prefix: Tensor, project: bool = False) -> Tensor:
    """A timm ``Attention`` module's output for tokens ``x`` (B, N, d) with per-sample prefixes.

    Args:
        attn: the block's ``attn`` (a timm ``Attention``: ``qkv``, ``num_heads``, ``q_norm``...).
        x: the block's normalised input tokens.
        key_prefix, value_prefix: (B, L_k, d) and (B, L_v, d); zero-length prefixes give timm's
            own output.
        project: the prefixes are input-space tokens to project with the block's key/value weights.

    Returns:
        (B, N, d_out), what ``attn(x)`` returns with the prefixes prepended to its keys/values.
    """
    b, n, _ = x.shape
    h, hd = attn.num_heads, attn.head_dim
    width = h * hd
    gate_layer = getattr(attn, "gate", None)
    gate = gate_layer(x).sigmoid() if gate_layer is not None else None
    q, k, v = attn.qkv(x).reshape(b, n, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if key_prefix.shape[0] != b or value_prefix.shape[0] != b:
        raise ValueError(f"prefixes are per sample: batch {b}, got {key_prefix.shape[0]} / {value_prefix.shape[0]}")
    if project:
        weight, bias = attn.qkv.weight, attn.qkv.bias
        pk = F.linear(key_prefix.to(x.dtype), weight[width : 2 * width], None if bias is None else bias[width : 2 * width])
        pv = F.linear(value_prefix.to(x.dtype), weight[2 * width :], None if bias is None else bias[2 * width :])
        pk, pv = attn.k_norm(_heads(pk, h)), _heads(pv, h)
    else:
        pk, pv = _heads(key_prefix.to(k.dtype), h), _heads(value_prefix.to(v.dtype), h)
    k = torch.cat([pk, k], dim=2)
    v = torch.cat([pv, v], dim=2)
    if getattr(attn, "fused_attn", False):
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        out = attn.attn_drop(scores.softmax(dim=-1)) @ v
    out = out.transpose(1, 2).reshape(b, n, width)
    out = getattr(attn, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


@contextlib.contextmanager
def prefixed(model: nn.Module, prefixes: Mapping[int, Prefix], project: bool = False) -> Iterator[None]:
    """Within the block, ``model.blocks[i]`` attends with ``prefixes[i]`` prepended to its keys/values.

    Args:
        model: a timm ViT (``model.blocks[i].attn`` a timm ``Attention``).
        prefixes: block index -> (key prefix, value prefix), each (B, L, d).
        project: see :func:`prefix_attention`.
    """
    blocks = list(model.blocks)  # type: ignore[arg-type]
    patched: list[nn.Module] = []
    try:
        for i, (pk, pv) in prefixes.items():
            attn = blocks[i].attn
            if "forward" in vars(attn):
                raise RuntimeError(f"blocks[{i}].attn.forward is already replaced (nested prefixed()?)")

            def forward(self: nn.Module, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False, _pk: Tensor = pk, _pv: Tensor = pv) -> Tensor:
                if attn_mask is not None or is_causal:
                    raise NotImplementedError("prefix attention with an attention mask")
                return prefix_attention(self, x, _pk, _pv, project)

            attn.forward = types.MethodType(forward, attn)
            patched.append(attn)
        yield
    finally:
        for attn in patched:
            del attn.forward
