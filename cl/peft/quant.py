"""1-bit weights: the quantiser of Jie, Wang, Deng (ICCV 2023, "precision redundancy") and packing.

A weight matrix ``w`` is standardised with its own mean and standard deviation and quantised to
the two levels of a standard normal split at its median, ±Φ⁻¹(3/4) = ±0.6745:

    w_q = μ + 0.6745 σ sign(w − μ)        (sign(0) = +1)

Training uses it as fake quantisation with a straight-through estimator (the gradient reaches the
latent float weight unchanged). Storage keeps one bit per weight plus μ and σ as float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

LEVEL = 0.6744897501960817  # Φ⁻¹(0.75): the median of |z| for z ~ N(0, 1)


def quantize_1bit(w: Tensor) -> tuple[Tensor, float, float]:
    """(signs as bool, mean, std) of ``w``; ``dequantize_1bit`` inverts it."""
    mu = float(w.mean())
    sigma = float(w.std(unbiased=False)) if w.numel() > 1 else 0.0
    return w >= mu, mu, sigma


def dequantize_1bit(signs: Tensor, mu: float, sigma: float) -> Tensor:
    return mu + LEVEL * sigma * (signs.float() * 2 - 1)


def fake_quant_1bit(w: Tensor) -> Tensor:
    """The 1-bit weight in the forward pass, the identity in the backward pass."""
    mu = w.mean()
    sigma = w.std(unbiased=False)
    wq = mu + LEVEL * sigma * torch.where(w >= mu, 1.0, -1.0)
    return w + (wq - w).detach()


def pack_bits(signs: Tensor) -> Tensor:
    return torch.from_numpy(np.packbits(signs.flatten().cpu().numpy().astype(np.uint8)))


def unpack_bits(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    n = math.prod(shape)
    bits = np.unpackbits(packed.cpu().numpy())[:n]
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


def packed_bytes(numel: int) -> int:
    """Bytes of one packed 1-bit tensor: the bits plus float32 μ and σ."""
    return math.ceil(numel / 8) + 8
