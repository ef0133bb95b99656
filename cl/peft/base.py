"""What every parameter-efficient (PEFT) method shares.

A :class:`PeftMethod` is *one task's* module set for one backbone. It is built from the backbone's
structure (layer sizes) but keeps no reference to it: :meth:`PeftMethod.attach` installs forward
hooks on the backbone's own timm modules and :meth:`PeftMethod.detach` removes them, so timm's code
is never edited or copied and switching tasks is a detach/attach. Methods whose update is linear in
the weights also fold into the backbone (:meth:`merge`): afterwards the model is the plain timm
model (same modules, same latency); :meth:`unmerge` restores the exact original weights (they are
kept aside, not recomputed by subtraction, so the backbone stays bit-identical for other tasks).

Every method declares:

* ``mergeable``: it implements :meth:`merged_weights`;
* :meth:`identity_at_init`: attaching a fresh module leaves the backbone's outputs unchanged;
* ``backbones``: which timm families it applies to (``vit`` for ``VisionTransformer``-style models
  with ``blocks[i].attn.qkv`` etc., ``resnet`` for timm ResNets); a mismatch is a one-line
  :class:`~cl.errors.ConfigError`.

With ``bits: 1`` (methods that support it) every weight matrix is fake-quantised to one bit in the
forward pass (straight-through estimator on a latent float weight, ``ste``) and stored packed, as
in Jie et al., ICCV 2023 (:mod:`cl.peft.quant`).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from cl.config import NamedConfig
from cl.errors import ConfigError
from cl.peft.quant import fake_quant_1bit

Hook = tuple[nn.Module, Literal["forward", "pre"], Callable[..., Any]]


class PeftConfig(NamedConfig):
    """Base of every method's config; each method file subclasses it."""

    @property
    def needs_data(self) -> bool:
        """True if this configuration initialises the module from a training batch, which only
        ``peft_per_task`` provides (other strategies refuse it at config time)."""
        return False

    bits: Literal[32, 1] = Field(32, description="1 = weight matrices trained with 1-bit fake quantisation and stored packed")
    ste: Literal["official", "detached"] = Field(
        "official", description="1-bit gradient: official = through the standardisation (μ, σ) as in PETL-ViT; detached = plain straight-through"
    )


class PeftMethod(nn.Module):
    mergeable: ClassVar[bool] = False
    supports_1bit: ClassVar[bool] = False
    backbones: ClassVar[tuple[str, ...]] = ("vit",)

    def __init__(self, cfg: PeftConfig, model: nn.Module) -> None:
        super().__init__()
        family = backbone_family(model)
        if family not in self.backbones:
            raise ConfigError(
                f"peft.name: '{cfg.name}' applies to {' / '.join(self.backbones)} backbones, not {type(model).__name__}"
            )
        if cfg.bits == 1 and not self.supports_1bit:
            raise ConfigError(f"peft.bits: 1-bit storage is not defined for '{cfg.name}' (only for adapter-style weight matrices)")
        self.cfg = cfg
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._backup: dict[str, Tensor] = {}
        self._stash: dict[Any, Tensor] = {}  # inputs captured by pre-hooks for parallel branches
        self.quantised_weights_loaded = False  # set when 1-bit weights were loaded: use them as they are

    # ---- to implement -----------------------------------------------------------------------

    def hooks(self, model: nn.Module) -> list[Hook]:
        """(module of ``model``, "forward" | "pre", hook function) to install."""
        raise NotImplementedError

    def identity_at_init(self) -> bool:
        """True if a freshly built module leaves the backbone's outputs unchanged."""
        return False

    def merged_weights(self, model: nn.Module) -> dict[str, Tensor]:
        """New values of the backbone parameters (by name) that absorb this module."""
        raise NotImplementedError

    @property
    def needs_data(self) -> bool:
        """True while the module waits for :meth:`init_from_data` (data-derived init, e.g. MemVP-F)."""
        return False

    def init_from_data(self, model: nn.Module, x: Tensor, generator: torch.Generator) -> None:
        """Initialise from a training batch ``x`` (as the backbone takes it) before the first step."""
        raise NotImplementedError

    # ---- shared -----------------------------------------------------------------------------

    def stash_input(self, key: Any) -> Callable[..., None]:
        """Pre-hook keeping a module's input for a parallel branch added further on."""

        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            self._stash[key] = args[0]

        return hook

    def stash_output(self, key: Any) -> Callable[..., None]:
        """Forward hook keeping a module's output for a parallel branch added further on."""

        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            self._stash[key] = out

        return hook

    def add_branch(self, key: Any, branch: Callable[[Tensor], Tensor]) -> Callable[..., Tensor]:
        """Forward hook adding ``branch(stashed input)`` to a module's output."""

        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
            return out + branch(self._stash.pop(key))

        return hook

    def w(self, weight: Tensor) -> Tensor:
        """A weight matrix as the forward pass uses it (1-bit fake-quantised when ``bits: 1``)."""
        if self.cfg.bits == 1 and weight.dim() >= 2 and not self.quantised_weights_loaded:
            return fake_quant_1bit(weight, self.cfg.ste)
        return weight

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def merged(self) -> bool:
        return bool(self._backup)

    def attach(self, model: nn.Module) -> PeftMethod:
        if self._handles or self._backup:
            raise RuntimeError(f"{self.cfg.name}: already attached or merged")
        for module, kind, fn in self.hooks(model):
            register = module.register_forward_hook if kind == "forward" else module.register_forward_pre_hook
            self._handles.append(register(fn))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stash.clear()

    @torch.no_grad()
    def merge(self, model: nn.Module) -> None:
        """Fold into the backbone's weights (removing the hooks); the originals are kept for unmerge."""
        if not self.mergeable:
            raise ValueError(f"{self.cfg.name} is not mergeable")
        if self._backup:
            raise RuntimeError(f"{self.cfg.name}: already merged")
        was_training = self.training
        self.eval()  # dropout off: the merged model is the eval-mode model
        new = self.merged_weights(model)
        self.train(was_training)
        params = dict(model.named_parameters())
        self.detach()
        for name, value in new.items():
            self._backup[name] = params[name].detach().clone()
            params[name].copy_(value)

    @torch.no_grad()
    def unmerge(self, model: nn.Module) -> None:
        """Restore the exact original weights and re-attach the hooks."""
        if not self._backup:
            raise RuntimeError(f"{self.cfg.name}: not merged")
        params = dict(model.named_parameters())
        for name, value in self._backup.items():
            params[name].copy_(value)
        self._backup.clear()
        self.attach(model)


# ---- backbone structure -----------------------------------------------------------------------


def backbone_family(model: nn.Module) -> str:
    """'vit' (timm VisionTransformer-style blocks), 'resnet' (timm ResNet) or the class name."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) and all(_is_vit_block(b) for b in blocks):
        return "vit"
    from timm.models.resnet import ResNet

    if isinstance(model, ResNet):
        return "resnet"
    return type(model).__name__


def _is_vit_block(block: nn.Module) -> bool:
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    return (
        isinstance(getattr(attn, "qkv", None), nn.Linear)
        and isinstance(getattr(attn, "proj", None), nn.Linear)
        and isinstance(getattr(mlp, "fc1", None), nn.Linear)
        and isinstance(getattr(mlp, "fc2", None), nn.Linear)
        and all(hasattr(block, n) for n in ("norm1", "norm2", "ls1", "ls2"))
    )


def vit_blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.blocks)  # type: ignore[arg-type]


def block_prefix(model: nn.Module, block: nn.Module) -> str:
    """'blocks.3' for the 4th block: names of backbone parameters for merged weights."""
    for name, module in model.named_modules():
        if module is block:
            return name
    raise KeyError("block not in model")


def vit_dim(model: nn.Module) -> int:
    """Token width d of a ViT (the attention's input size)."""
    return int(vit_blocks(model)[0].attn.qkv.in_features)
