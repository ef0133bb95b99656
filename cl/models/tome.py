"""Token merging (ToMe) for timm Vision Transformers.

"Token Merging: Your ViT But Faster", Bolya, Fu, Dai, Zhang, Feichtenhofer, Hoffman, ICLR 2023,
https://arxiv.org/abs/2210.09461 (official code: facebookresearch/ToMe, ``tome/merge.py`` and
``tome/patch/timm.py``).

In every block, between the attention and the MLP, the ``r`` most similar token pairs are merged:

* the similarity metric is the attention keys averaged over heads (cosine similarity);
* bipartite soft matching: tokens are split alternately into A (even indices, the class token is
  A[0] and is never merged: its row of scores is -inf) and B (odd indices); each A token picks its
  most similar B token, and the ``r`` best-scoring A tokens are merged into their B partners;
* ``r`` is capped at ``(N - p) // 2`` in a block of N tokens (p = 1 with a class token, else 0);
* merging is a size-weighted average, x_b <- (s_b x_b + sum s_a x_a) / (s_b + sum s_a), and the
  sizes add up, so every output token knows how many input patches it stands for (the sizes of a
  row always sum to the number of input tokens, exactly: they are small integers in float);
* proportional attention: log s_j is added to the attention logits of key j;
* the matching runs without gradient; the same ``r`` is used in every block.

Our reconstruction. The block forward is replaced per instance (``block.forward``) by a function
that calls the block's own sub-modules (``norm1``, ``attn.qkv``, ``attn.q_norm``/``k_norm``,
``attn.norm``, ``attn.proj``, ``ls1``/``ls2``, ``drop_path1``/``2``, ``norm2``, ``mlp``), so
forward hooks that PEFT methods put on ``qkv``, ``fc1``, ``fc2`` or the block itself keep working;
timm's ``VisionTransformer`` is neither subclassed nor copied. Hooks on the ``attn`` module itself do
not fire (the attention is computed here, to add the proportional bias and return the keys). Until the
first merge the sizes are all one and no bias is added, so ``r = 0`` runs exactly timm's attention
(the same ``scaled_dot_product_attention`` call when timm uses it): outputs are bit-identical.

Where we deviate from the official code: (1) the unmerged A tokens are always kept in their
original order (ToMe sorts them only with a class token); (2) ``global_pool: avg`` averages the
tokens weighted by their sizes, i.e. the mean over the original patches (ToMe leaves timm's
unweighted mean over the remaining tokens, which over-weights unmerged background tokens);
``max`` is unchanged; attention pooling (``map``) and register tokens are refused, and so are
modules that insert tokens before the blocks (VPT, L2P) or replace ``attn.forward`` (prefix tuning),
which merging would silently break (a one-line error at the first forward); (3) layer scale
(``ls1``/``ls2``) and timm's optional attention gate and scale-norm are applied where timm applies
them (DeiT, the official target, has none of them).
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl.errors import ConfigError


@dataclass
class MergePlan:
    """Which tokens merge where, for one block (indices into the A / B halves)."""

    unmerged: Tensor  # [B, nA - r, 1] A tokens kept, in original order
    src: Tensor  # [B, r, 1] A tokens merged away
    dst: Tensor  # [B, r, 1] their B partners
    r: int


def max_merge(n_tokens: int, class_token: bool) -> int:
    """The most tokens one block can merge: ``(N - p) // 2`` with p protected (class) tokens."""
    return max((n_tokens - int(class_token)) // 2, 0)


@torch.no_grad()
def bipartite_matching(metric: Tensor, r: int, class_token: bool) -> MergePlan | None:
    """Bipartite soft matching on ``metric`` [B, N, C]; None when nothing is merged.

    Args:
        metric: per-token similarity features (the keys averaged over heads).
        r: tokens to merge (capped at :func:`max_merge`).
        class_token: token 0 is a class token, never merged.
    """
    r = min(r, max_merge(metric.shape[1], class_token))
    if r <= 0:
        return None
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[:, 0, :] = -torch.inf
    best, best_b = scores.max(dim=-1)  # each A token's most similar B token
    order = best.argsort(dim=-1, descending=True)[..., None]
    src = order[:, :r]
    unmerged = order[:, r:].sort(dim=1).values
    dst = best_b[..., None].gather(dim=1, index=src)
    return MergePlan(unmerged, src, dst, r)


def merge_sum(x: Tensor, plan: MergePlan) -> Tensor:
    """Sum every merged A token into its B partner. ``x`` [B, N, C] -> [B, N - r, C]: kept A tokens, then B."""
    a, b = x[:, ::2], x[:, 1::2]
    n, na, c = a.shape
    kept = a.gather(dim=1, index=plan.unmerged.expand(n, na - plan.r, c))
    moved = a.gather(dim=1, index=plan.src.expand(n, plan.r, c))
    b = b.scatter_reduce(1, plan.dst.expand(n, plan.r, c), moved, reduce="sum")
    return torch.cat([kept, b], dim=1)


def merge_weighted(x: Tensor, size: Tensor, plan: MergePlan) -> tuple[Tensor, Tensor]:
    """Size-weighted average merge: (merged tokens [B, N - r, C], their sizes [B, N - r, 1])."""
    total = merge_sum(x * size, plan)
    size = merge_sum(size, plan)
    return total / size, size


def proportional_bias(size: Tensor | None) -> Tensor | None:
    """Additive attention bias log s_j, shaped [B, 1, 1, N] for every head and query; None if no sizes."""
    return None if size is None else size.log()[:, None, None, :, 0]


@dataclass
class _State:
    r: int = 0
    prop_attn: bool = True
    class_token: bool = True
    size: Tensor | None = None  # [B, N, 1] sizes of the current tokens; None while all are one
    tokens: list[int] | None = None  # token count entering each block (last forward), for tests and benches
    image_tokens: int | None = None  # patches + class token of one image (None with a dynamic image size)


def tome_support_error(model: nn.Module) -> str | None:
    """Why token merging cannot run on ``model`` (one line), or None if it can."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        return f"token merging needs a timm VisionTransformer, not {type(model).__name__}"
    bad = [i for i, blk in enumerate(model.blocks) if type(blk) is not Block or type(blk.attn) is not Attention]
    if bad:
        return f"token merging needs timm's plain Block/Attention in every block (block {bad[0]} is {type(model.blocks[bad[0]]).__name__})"
    if model.num_prefix_tokens > int(model.has_class_token):
        return "token merging does not protect register tokens (the model has reg_tokens > 0)"
    if getattr(model, "attn_pool", None) is not None:
        return f"token merging does not support attention pooling (global_pool '{model.global_pool}')"
    return None


def _attention(attn: nn.Module, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor]:
    """timm's ``Attention.forward`` plus the proportional bias; also returns the head-averaged keys."""
    bsz, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    qkv = attn.qkv(x).reshape(bsz, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = proportional_bias(size)
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if bias is None else bias.to(q.dtype), dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v
    out = attn.norm(out.transpose(1, 2).reshape(bsz, n, attn.attn_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), k.mean(dim=1)


def _block_forward(block: nn.Module, state: _State, first: bool, x: Tensor, attn_mask: Tensor | None = None,
                   is_causal: bool = False) -> Tensor:
    if attn_mask is not None or is_causal:
        raise ValueError("token merging does not support attention masks")
    if first:  # a new forward pass starts: every token stands for one patch
        state.size, state.tokens = None, []
        if state.image_tokens is not None and x.shape[1] != state.image_tokens:
            raise ConfigError(f"backbone.tome: the blocks receive {x.shape[1]} tokens for {state.image_tokens} image tokens; inserted "
                              f"tokens (VPT, L2P prompts) would be merged with image tokens, which is not supported")
    if "forward" in vars(block.attn):
        raise ConfigError("backbone.tome: token merging computes the attention itself, so a replaced attn.forward (prefix tuning: "
                          "DualPrompt, CODA-Prompt) would be skipped; not supported")
    assert state.tokens is not None
    if state.size is not None and state.size.shape[1] != x.shape[1]:  # something between blocks added or removed tokens
        raise ConfigError(f"backbone.tome: block {len(state.tokens)} receives {x.shape[1]} tokens where {state.size.shape[1]} were "
                          f"left by merging (a module that inserts tokens is not supported with token merging)")
    state.tokens.append(x.shape[1])
    out, metric = _attention(block.attn, block.norm1(x), state.size if state.prop_attn else None)
    x = x + block.drop_path1(block.ls1(out))
    plan = bipartite_matching(metric, state.r, state.class_token) if state.r > 0 else None
    if plan is not None:
        size = state.size if state.size is not None else x.new_ones(x.shape[0], x.shape[1], 1)
        x, state.size = merge_weighted(x, size, plan)
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _pool(model: nn.Module, state: _State, plain: Callable[..., Tensor], x: Tensor, pool_type: str | None = None) -> Tensor:
    pool_type = model.global_pool if pool_type is None else pool_type
    if state.size is None or pool_type not in ("avg", "avgmax") or x.shape[1] != state.size.shape[1]:
        return plain(x, pool_type)
    start = 0 if model.pool_include_prefix else model.num_prefix_tokens
    tokens, size = x[:, start:], state.size[:, start:].to(x.dtype)
    mean = (tokens * size).sum(dim=1) / size.sum(dim=1)
    return mean if pool_type == "avg" else 0.5 * (tokens.amax(dim=1) + mean)


class TokenMerging:
    """ToMe on one timm ViT: :meth:`attach` wraps every block's forward, :meth:`detach` restores it.

    Also a context manager (``with TokenMerging(model, r=8): model(x)``). ``r`` may be changed while
    attached; it applies from the next forward pass.
    """

    def __init__(self, model: nn.Module, r: int = 0, prop_attn: bool = True) -> None:
        error = tome_support_error(model)
        if error is not None:
            raise ConfigError(f"backbone.tome: {error}")
        if r < 0:
            raise ConfigError(f"backbone.tome: r must be >= 0, got {r}")
        self.model = model
        dynamic = getattr(model, "dynamic_img_size", False) or getattr(model.patch_embed, "num_patches", None) is None
        image_tokens = None if dynamic else int(model.patch_embed.num_patches) + int(model.num_prefix_tokens)
        self.state = _State(r=r, prop_attn=prop_attn, class_token=bool(model.has_class_token), image_tokens=image_tokens)
        self.attached = False

    @property
    def r(self) -> int:
        return self.state.r

    @r.setter
    def r(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"r must be >= 0, got {value}")
        self.state.r = value

    @property
    def sizes(self) -> Tensor | None:
        """Token sizes after the last block of the last forward pass (None if nothing merged)."""
        return self.state.size

    @property
    def tokens_per_block(self) -> list[int]:
        """Tokens entering each block in the last forward pass."""
        return list(self.state.tokens or [])

    def attach(self) -> TokenMerging:
        if self.attached:
            raise RuntimeError("token merging is already attached")
        if any("forward" in vars(b) for b in self.model.blocks) or "pool" in vars(self.model):
            raise RuntimeError("a block's forward is already replaced (token merging attached twice?)")
        for i, block in enumerate(self.model.blocks):
            block.forward = types.MethodType(lambda blk, *a, _f=i == 0, **k: _block_forward(blk, self.state, _f, *a, **k), block)
        plain = self.model.pool
        self.model.pool = lambda x, pool_type=None: _pool(self.model, self.state, plain, x, pool_type)
        self.attached = True
        return self

    def detach(self) -> None:
        if not self.attached:
            return
        for block in self.model.blocks:
            del block.forward
        del self.model.pool
        self.state.size, self.state.tokens = None, None
        self.attached = False

    def __enter__(self) -> TokenMerging:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    @contextmanager
    def at(self, r: int) -> Iterator[None]:
        """Temporarily merge ``r`` tokens per block."""
        old = self.r
        self.r = r
        try:
            yield
        finally:
            self.r = old


def token_schedule(n_tokens: int, depth: int, r: int, class_token: bool = True) -> list[int]:
    """Tokens entering each block, and after the last, when every block merges ``r`` (with the cap)."""
    out = [n_tokens]
    for _ in range(depth):
        out.append(out[-1] - min(r, max_merge(out[-1], class_token)))
    return out
