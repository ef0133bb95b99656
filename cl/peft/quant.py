"""1-bit weights: the quantiser of Jie, Wang, Deng (ICCV 2023, "precision redundancy") and packing.

A weight matrix ``w`` is standardised with its own mean μ and (unbiased) standard deviation σ and
each standardised weight is sent to one of two levels of a fixed N(0, 1) codebook split at 0:

    w_q = μ + 0.6745 σ sign(w − μ)        (sign(0) = +1: one bit has no zero)

The levels ±Φ⁻¹(3/4) = ±0.6745 are the *medians* of the two half-normals (the official code's
fixed point: thresholds at midpoints of levels, levels at the medians of their bins). A bin's
median minimises the expected *absolute* error, so these levels minimise E|z − q(z)| for
z ~ N(0, 1); they do not minimise the squared error (Lloyd-Max levels for L2 are the bin means,
±√(2/π) = ±0.7979). Both hold only in so far as a trained weight matrix is Gaussian.

Training uses fake quantisation on a latent float weight, with the straight-through estimator in one
of two forms (``PeftConfig.ste``):

* ``official`` (default; ``utils.QLinear`` of PETL-ViT/binary_adapter): the estimator acts on the
  standardised weight ẑ = (w − μ)/(σ + 1e-5), and the result is de-standardised,
  ``w_q = (q(ẑ) − ẑ).detach()·σ + ẑ·σ + μ``: the gradient also flows through μ and σ.
* ``detached``: ``w_q = w + (q(w) − w).detach()``: the gradient reaches w unchanged.

The forward values are the same; only the gradients differ. Storage keeps one bit per weight plus
μ and σ as float32.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

LEVEL = 0.6744897501960817  # Φ⁻¹(0.75): the median of |z| for z ~ N(0, 1)
EPS = 1e-5  # in the official standardisation; de-standardising multiplies by σ itself


def _std(w: Tensor) -> Tensor:
    return w.std() if w.numel() > 1 else torch.zeros((), dtype=w.dtype, device=w.device)


def quantize_1bit(w: Tensor) -> tuple[Tensor, float, float]:
    """(signs as bool, mean, unbiased std) of ``w``; ``dequantize_1bit`` inverts it."""
    return w >= w.mean(), float(w.mean()), float(_std(w))


def dequantize_1bit(signs: Tensor, mu: float, sigma: float) -> Tensor:
    return mu + LEVEL * sigma * (signs.float() * 2 - 1)


def fake_quant_1bit(w: Tensor, ste: Literal["official", "detached"] = "official") -> Tensor:
    """The 1-bit weight in the forward pass; gradients as described in the module docstring."""
    mu, sigma = w.mean(), _std(w)
    if ste == "detached":
        wq = mu + LEVEL * sigma * torch.where(w >= mu, 1.0, -1.0)
        return w + (wq - w).detach()
    z = (w - mu) / (sigma + EPS)
    zq = LEVEL * torch.where(z >= 0, 1.0, -1.0)
    return (zq - z).detach() * sigma + z * sigma + mu  # forward value zq·σ + μ = μ ± LEVEL·σ


def pack_bits(signs: Tensor) -> Tensor:
    return torch.from_numpy(np.packbits(signs.flatten().cpu().numpy().astype(np.uint8)))


def unpack_bits(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    n = math.prod(shape)
    bits = np.unpackbits(packed.cpu().numpy())[:n]
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


def packed_bytes(numel: int) -> int:
    """Bytes of one packed 1-bit tensor: the bits plus float32 μ and σ."""
    return math.ceil(numel / 8) + 8
