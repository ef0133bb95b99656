"""Parameter-efficient modules for timm backbones, one file per method (registered in ``PEFT``)."""

from cl.peft import adapter, bitfit, consolidator, conv_adapter, convpass, fact, kadaptation, lora, ssf, vpt  # noqa: F401
from cl.peft.base import PeftConfig, PeftMethod, backbone_family

__all__ = ["PeftConfig", "PeftMethod", "backbone_family", "build_peft"]


def build_peft(cfg: PeftConfig, model) -> PeftMethod:  # noqa: ANN001
    """A fresh module set of the method ``cfg.name`` for ``model`` (not attached yet)."""
    from cl.registry import PEFT

    return PEFT.get(cfg.name)(cfg, model)
