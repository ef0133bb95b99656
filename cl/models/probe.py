"""Per-block features and BatchNorm input statistics of a backbone, for shift analysis."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cl.errors import ConfigError
from cl.models.backbone import Backbone


def _pool(t: Tensor) -> Tensor:
    if t.ndim == 4:  # NCHW
        return t.mean(dim=(2, 3))
    if t.ndim == 3:  # NLC tokens
        return t.mean(dim=1)
    return t.reshape(len(t), -1)


@torch.no_grad()
def backbone_probe(backbone: Backbone, images: Tensor, device: torch.device, layers: list[int] | None = None, bn: bool = True) -> dict[str, Tensor]:
    """Pooled per-block features and BatchNorm input means of uint8 ``images`` (eval mode)."""
    model = backbone.model
    backbone.set_train(False)
    x = backbone.transform(images, device)
    captured: dict[str, tuple[Tensor, Tensor]] = {}
    handles = []
    if bn:
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:

                def hook(mod: nn.Module, inputs: tuple[Tensor, ...], name: str = name) -> None:
                    inp = inputs[0]
                    dims = [d for d in range(inp.ndim) if d != 1]
                    captured[name] = (inp.float().mean(dim=dims), mod.running_mean.detach().float().clone(),
                                      (mod.running_var.detach().float() + mod.eps).sqrt())

                handles.append(module.register_forward_pre_hook(hook))
    try:
        if not hasattr(model, "forward_intermediates"):
            raise ConfigError(f"shift: {backbone.name} has no forward_intermediates; per-layer probes need it")
        outs = model.forward_intermediates(x, indices=layers, intermediates_only=True)
    finally:
        for h in handles:
            h.remove()
    info = [f["module"] for f in getattr(model, "feature_info", [])]
    n_blocks = len(info)
    idx = list(range(n_blocks)) if layers is None else [i if i >= 0 else n_blocks + i for i in layers]
    out: dict[str, Tensor] = {}
    for i, t in zip(idx, outs):
        out[f"feat/{info[i] if i < len(info) else f'layer{i}'}"] = _pool(t).float().cpu()
    for name, (batch, running, std) in captured.items():
        out[f"bn_batch/{name}"] = batch.cpu()
        out[f"bn_running/{name}"] = running.cpu()
        out[f"bn_std/{name}"] = std.cpu()
    return out
