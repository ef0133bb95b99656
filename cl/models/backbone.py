"""Backbone factory on ``timm.create_model``: weights (hub | file | pretrain | none), freezing, checksums.

Only timm's public API is used. Weights from a local file go through timm's own pretrained-loading
path (``pretrained_cfg_overlay={'state_dict': ...}``), so input-channel adaptation and classifier
removal behave exactly as for hub weights, but the file itself is read safely (safetensors, or
``torch.load(weights_only=True)``) before timm sees it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import group_modules
from torch import Tensor, nn

from cl.config import BackboneConfig
from cl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, BatchTransform
from cl.errors import ConfigError, WeightsError
from cl.utils import file_sha256, state_dict_sha256


@dataclass
class Backbone:
    """A timm feature extractor (``num_classes=0``) and everything needed to feed and describe it."""

    model: nn.Module
    name: str
    feature_dim: int
    freeze: str
    transform: BatchTransform
    weights: dict[str, Any] = field(default_factory=dict)  # provenance: source, sha256, path, ...
    _train_roots: list[nn.Module] = field(default_factory=list, repr=False)

    @property
    def frozen(self) -> bool:
        return self.freeze == "frozen"

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def set_train(self, mode: bool = True) -> None:
        """Train mode only for the parts the freeze policy trains; frozen parts stay in eval.

        Frozen BatchNorm layers in train mode would keep updating their running statistics.
        """
        self.model.eval()
        if mode:
            for module in self._train_roots:
                module.train()

    def forward(self, x: Tensor) -> Tensor:
        """Pooled pre-logits features of a normalised float batch."""
        return self.model(x)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm))


def block_groups(model: nn.Module) -> list[list[str]]:
    """Module names per block, first to last, from timm's ``group_matcher`` (used for last-k).

    A trailing group made only of normalisation layers (a ViT's final ``norm``) is merged into the
    last block, so ``last_k: 1`` means the last transformer block together with the final norm.
    """
    grouped = group_modules(model, model.group_matcher(coarse=False))
    groups = [names for _, names in sorted(grouped.items())]
    modules = dict(model.named_modules())
    if len(groups) > 1 and all(_is_norm(modules[n]) for n in groups[-1] if n in modules):
        groups[-2] = groups[-2] + groups[-1]
        groups.pop()
    return groups


def apply_freeze(model: nn.Module, cfg: BackboneConfig) -> None:
    """Set ``requires_grad`` by the freeze policy."""
    model.requires_grad_(cfg.freeze == "all")
    if cfg.freeze in ("frozen", "all"):
        return
    if cfg.freeze == "bn_only":
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not bns:
            raise ConfigError(f"backbone.freeze: 'bn_only' but {cfg.name} has no BatchNorm layers")
        for m in bns:
            m.requires_grad_(True)
        return
    groups = block_groups(model)
    k = cfg.trainable_blocks or 0
    if k > len(groups):
        raise ConfigError(f"backbone.trainable_blocks: {k} but {cfg.name} has {len(groups)} blocks")
    modules = dict(model.named_modules())
    for names in groups[-k:]:
        for name in names:
            if name in modules:
                modules[name].requires_grad_(True)


def train_roots(model: nn.Module) -> list[nn.Module]:
    """Largest sub-modules whose parameters all train: they (and their dropout etc.) follow train mode."""
    roots: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        params = list(module.parameters())
        if params and all(p.requires_grad for p in params):
            roots.append(module)
            return
        for child in module.children():
            visit(child)

    visit(model)
    return roots


def load_weights_file(path: str | Path, expected_sha256: str | None = None) -> tuple[dict[str, Tensor], str]:
    """Read a weights file without executing code. Returns (state_dict, file sha256)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    sha = file_sha256(path)
    if expected_sha256 and sha != expected_sha256.lower():
        raise WeightsError(f"{path}: sha256 mismatch (expected {expected_sha256}, file has {sha})")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to parse becomes one clear line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(f"{path}: cannot load weights safely ({first[:200]})") from None
    for key in ("state_dict", "model", "module"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return state, sha


def _create(name: str, kwargs: dict[str, Any], **extra: Any) -> nn.Module:
    try:
        return timm.create_model(name, num_classes=0, **extra, **kwargs)
    except TypeError as err:
        raise ConfigError(f"backbone.kwargs: {name} rejects these arguments ({err})") from None


def _check_keys(model: nn.Module, state: dict[str, Tensor], name: str, origin: str) -> None:
    """Refuse a checkpoint that does not cover the architecture.

    timm's pretrained loader turns ``strict`` off when it adapts a model (other class count or input
    channels), so a checkpoint of another architecture would otherwise load "successfully" and
    leave random weights. The file must be in timm's state-dict format: every backbone key present,
    nothing unknown except the classifier timm drops.
    """
    classifier = (getattr(model, "pretrained_cfg", {}) or {}).get("classifier") or ()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    model_keys = set(model.state_dict())
    missing = sorted(model_keys - set(state))
    unexpected = sorted(k for k in set(state) - model_keys if not k.startswith(tuple(f"{h}." for h in heads)))
    if missing or unexpected:
        detail = ", ".join(
            part for part in (
                f"{len(missing)} missing keys, e.g. {missing[0]}" if missing else "",
                f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}" if unexpected else "",
            ) if part
        )
        raise WeightsError(f"{origin}: weights do not match backbone '{name}' ({detail})")


def _load_into(name: str, kwargs: dict[str, Any], state: dict[str, Tensor], origin: str) -> nn.Module:
    # timm logs a warning when weights already have the model's channel count; that is expected here.
    builder_log = logging.getLogger("timm.models._builder")
    level = builder_log.level
    builder_log.setLevel(logging.ERROR)
    try:
        model = _create(name, kwargs, pretrained=True, pretrained_cfg_overlay={"state_dict": dict(state)})
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(err).__name__)
        raise WeightsError(f"{origin}: weights do not match backbone '{name}' ({detail[:160]})") from None
    finally:
        builder_log.setLevel(level)
    _check_keys(model, state, name, origin)
    return model


def create_backbone(
    cfg: BackboneConfig,
    transform: BatchTransform,
    *,
    seed: int,
    pretrained_state: dict[str, Tensor] | None = None,
    pretrain_info: dict[str, Any] | None = None,
) -> Backbone:
    """Build the backbone for a run.

    Args:
        cfg: the backbone section.
        transform: the benchmark's input pipeline; its channels set ``in_chans`` unless kwargs do,
            and its normalisation is replaced by the weights' own statistics when asked.
        seed: seeds random initialisation (source ``none``) so runs are reproducible.
        pretrained_state: weights produced by :mod:`cl.models.pretrain` (source ``pretrain``).
        pretrain_info: provenance of those weights.
    """
    kwargs = dict(cfg.kwargs)
    kwargs.setdefault("in_chans", transform.channels)
    if kwargs["in_chans"] != transform.channels:
        raise ConfigError(
            f"backbone.kwargs.in_chans: {kwargs['in_chans']} but the benchmark gives {transform.channels}-channel "
            f"inputs (set benchmark.channels)"
        )
    source = cfg.weights.source
    info: dict[str, Any] = {"source": source}
    torch.manual_seed(seed)
    if source == "none":
        model = _create(cfg.name, kwargs)
    elif source == "hub":
        try:
            model = _create(cfg.name, kwargs, pretrained=True)
        except (OSError, RuntimeError, ValueError) as err:
            raise WeightsError(
                f"could not fetch hub weights for '{cfg.name}' ({type(err).__name__}); offline, download them "
                f"elsewhere and use backbone.weights.source: file"
            ) from None
        pcfg = getattr(model, "pretrained_cfg", {}) or {}
        info.update({k: pcfg.get(k) for k in ("hf_hub_id", "url", "tag") if pcfg.get(k)})
    elif source == "file":
        state, sha = load_weights_file(cfg.weights.path or "", cfg.weights.sha256)
        model = _load_into(cfg.name, kwargs, state, cfg.weights.path or "")
        info.update({"path": str(Path(cfg.weights.path or "").resolve()), "file_sha256": sha})
    else:  # pretrain
        if pretrained_state is None:
            raise RuntimeError("source 'pretrain' needs the pretrained state (see cl.models.pretrain)")
        model = _load_into(cfg.name, kwargs, pretrained_state, "pretrained backbone")
        info.update(pretrain_info or {})
    info["sha256"] = state_dict_sha256(model)

    if cfg.normalize == "imagenet" or (cfg.normalize == "auto" and source in ("hub", "file")):
        pcfg = getattr(model, "pretrained_cfg", {}) or {}
        mean = tuple(pcfg.get("mean", IMAGENET_MEAN)) if source == "hub" else IMAGENET_MEAN
        std = tuple(pcfg.get("std", IMAGENET_STD)) if source == "hub" else IMAGENET_STD
        if transform.channels == 1:
            mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
        transform = replace(transform, mean=tuple(mean), std=tuple(std))
    elif cfg.normalize == "none":
        transform = replace(transform, mean=(0.0,) * transform.channels, std=(1.0,) * transform.channels)

    apply_freeze(model, cfg)
    backbone = Backbone(model, cfg.name, int(model.num_features), cfg.freeze, transform, info, train_roots(model))
    backbone.set_train(False)
    return backbone


def check_input(backbone: Backbone, input_shape: tuple[int, int, int], device: torch.device) -> int:
    """Run one dummy sample; a size mismatch becomes a clear error. Returns the feature size."""
    x = torch.zeros((1, *input_shape), device=device)
    try:
        with torch.no_grad():
            out = backbone.model.to(device)(x)
    except (RuntimeError, AssertionError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(
            f"backbone: {backbone.name} cannot take {tuple(input_shape)} inputs ({first[:160]}); "
            f"set backbone.kwargs.img_size or benchmark.image_size"
        ) from None
    return int(out.shape[-1])
