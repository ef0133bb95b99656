"""Loss functions shared by strategies: pure tensor-in, tensor-out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def multi_similarity_loss(
    embeddings: Tensor, labels: Tensor, alpha: float = 2.0, beta: float = 40.0, lam: float = 0.5, margin: float = 0.1
) -> tuple[Tensor, int]:
    """Multi-Similarity loss with its pair mining (Wang et al., CVPR 2019, https://arxiv.org/abs/1904.06627).

    With S = Z Zᵀ on L2-normalised embeddings, for every anchor i:

    * mining keeps a negative j if S_ij + margin > min_k∈P_i S_ik, and a positive j (j ≠ i) if
      S_ij - margin < max_k∈N_i S_ik;
    * the anchor contributes (1/α) log(1 + Σ_P̃ exp(-α(S_ij - λ))) + (1/β) log(1 + Σ_Ñ exp(β(S_ij - λ)));
    * anchors left without a kept positive or a kept negative contribute nothing.

    The sum is divided by the batch size n, as in the reference implementation. The anchor itself is
    excluded by index, so an exact duplicate of the anchor still counts as a positive.

    Args:
        embeddings: [n, d], normalised here.
        labels: [n].
        alpha, beta, lam, margin: the paper's scale_pos, scale_neg, thresh and margin.

    Returns:
        (loss, number of anchors that contributed).
    """
    z = F.normalize(embeddings, dim=1)
    sim = z @ z.T
    n = len(labels)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    pos = same & ~eye
    neg = ~same
    inf = torch.tensor(float("inf"), device=z.device, dtype=sim.dtype)
    min_pos = torch.where(pos, sim, inf).min(dim=1, keepdim=True).values
    max_neg = torch.where(neg, sim, -inf).max(dim=1, keepdim=True).values
    # mining uses the similarities as numbers, not as part of the graph
    kept_neg = neg & (sim.detach() + margin > min_pos.detach())
    kept_pos = pos & (sim.detach() - margin < max_neg.detach())
    anchors = kept_pos.any(dim=1) & kept_neg.any(dim=1)
    if not anchors.any():
        return embeddings.sum() * 0.0, 0
    zeros = torch.zeros(n, 1, device=z.device, dtype=sim.dtype)
    pos_terms = torch.where(kept_pos, -alpha * (sim - lam), -inf)
    neg_terms = torch.where(kept_neg, beta * (sim - lam), -inf)
    pos_loss = torch.logsumexp(torch.cat([zeros, pos_terms], dim=1), dim=1) / alpha
    neg_loss = torch.logsumexp(torch.cat([zeros, neg_terms], dim=1), dim=1) / beta
    per_anchor = torch.where(anchors, pos_loss + neg_loss, torch.zeros_like(pos_loss))
    return per_anchor.sum() / n, int(anchors.sum())


def proxy_softmax_loss(embeddings: Tensor, labels: Tensor, proxies: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """Softmax over cosine similarities to learnable class proxies, restricted to ``allowed`` classes.

    L = -log exp(s cos(z, p_y)) / Σ_{c allowed} exp(s cos(z, p_c))
    """
    logits = scale * F.normalize(embeddings, dim=1) @ F.normalize(proxies, dim=1).T
    logits = logits.masked_fill(~allowed[None, :], float("-inf"))
    return F.cross_entropy(logits, labels)
