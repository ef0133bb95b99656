"""Per-task storage of PEFT modules: compact state dicts, optionally 1-bit, saved as safetensors.

``pack(method)`` turns a trained module into what is kept for its task: float32 tensors, except
that with ``bits: 1`` every weight matrix becomes its packed signs plus (μ, σ) (:mod:`cl.peft.quant`).
``unpack(method, packed)`` loads it back (1-bit weights dequantised, and the module told not to
quantise them again). ``packed_nbytes`` is the stored size; ``save``/``load`` write one
``.safetensors`` file per task, with the method's config in the metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from cl.peft.base import PeftMethod
from cl.peft.quant import dequantize_1bit, pack_bits, quantize_1bit, unpack_bits

BITS, STATS = ".__bits", ".__mu_sigma"


def pack(method: PeftMethod) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name, t in method.state_dict().items():
        t = t.detach().cpu()
        if method.cfg.bits == 1 and t.dim() >= 2:  # the weight matrices (what PeftMethod.w quantises)
            signs, mu, sigma = quantize_1bit(t)
            out[name + BITS] = pack_bits(signs)
            out[name + STATS] = torch.tensor([mu, sigma], dtype=torch.float32)
        else:
            out[name] = t.float().contiguous() if t.is_floating_point() else t.contiguous()
    return out


def unpack(method: PeftMethod, packed: dict[str, Tensor]) -> None:
    state = {}
    for name, t in method.state_dict().items():
        if name + BITS in packed:
            mu, sigma = packed[name + STATS].tolist()
            state[name] = dequantize_1bit(unpack_bits(packed[name + BITS], tuple(t.shape)), mu, sigma).to(t.dtype)
        else:
            state[name] = packed[name]
    method.load_state_dict(state)
    method.quantised_weights_loaded = method.cfg.bits == 1


def packed_nbytes(packed: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in packed.values())


def save(packed: dict[str, Tensor], path: str | Path, config: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in packed.items()}, str(tmp), metadata={"config": json.dumps(config)})
    tmp.replace(path)


def load(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        config = json.loads((f.metadata() or {}).get("config", "{}"))
    return load_file(str(path)), config
