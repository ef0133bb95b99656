"""Backbone factory on ``timm.create_model``: weights (hub | file | pretrain | none), freezing, checksums.

Only timm's public API is used. A local weights file is read safely (safetensors, or
``torch.load(weights_only=True)``) and must fit the architecture exactly: every tensor present,
same shapes, finite values (only a classifier head is ignored). Hub weights go through timm's own
loader, with its usual adaptations.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import timm
import torch
from timm.models import group_modules
from torch import Tensor, nn

from cl.config import BackboneConfig
from cl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, BatchTransform
from cl.errors import ConfigError, WeightsError
from cl.utils import file_sha256, load_error_summary, state_dict_sha256


@dataclass
class Backbone:
    """A timm feature extractor (``num_classes=0``) and everything needed to feed and describe it."""

    model: nn.Module
    name: str
    feature_dim: int
    trainable: str  # none | batchnorm | last_blocks | all (BackboneConfig.trainable)
    transform: BatchTransform
    weights: dict[str, Any] = field(default_factory=dict)  # provenance: source, sha256, path, ...
    kwargs: dict[str, Any] = field(default_factory=dict)  # the timm.create_model arguments used
    _train_roots: list[nn.Module] = field(default_factory=list, repr=False)
    tome: Any = field(default=None, repr=False)  # cl.models.tocom.TomeRuntime when backbone.tome is set

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Forwards inside see the backbone as training data ("train") or evaluation ("eval") does:
        with ``backbone.tome`` each merges its own r (and evaluation adds the compensator); else a no-op."""
        if self.tome is None:
            yield
            return
        with self.tome.phase(name):
            yield

    @property
    def frozen(self) -> bool:
        return self.trainable == "none"

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


def apply_trainable(model: nn.Module, cfg: BackboneConfig) -> None:
    """Set ``requires_grad`` by ``backbone.trainable``."""
    model.requires_grad_(cfg.trainable == "all")
    if cfg.trainable in ("none", "all"):
        return
    if cfg.trainable == "batchnorm":
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not bns:
            raise ConfigError(f"backbone.trainable: 'batchnorm' but {cfg.name} has no BatchNorm layers")
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
        raise WeightsError(f"{path}: cannot load weights safely ({load_error_summary(err)})") from None
    for key in ("state_dict", "model", "module"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return state, sha


def create_model(name: str, kwargs: dict[str, Any], **extra: Any) -> nn.Module:
    try:
        return timm.create_model(name, num_classes=0, **extra, **kwargs)
    except TypeError as err:
        raise ConfigError(f"backbone.kwargs: {name} rejects these arguments ({err})") from None


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    classifier = (getattr(model, "pretrained_cfg", {}) or {}).get("classifier") or ()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(f"{h}." for h in heads)


def check_exact(model: nn.Module, state: dict[str, Tensor], name: str, origin: str) -> list[str]:
    """Raise WeightsError unless ``state`` fits ``model`` exactly. Returns the keys that will be left out.

    Every tensor of the model must come from ``state`` with the same shape, a compatible dtype
    (floating for floating, integer for integer) and finite values, and BatchNorm running
    variances must not be negative; the only keys left out are the classifier's (the backbone has
    no head) and BatchNorm's ``num_batches_tracked`` counters when absent. Nothing is silently
    skipped, reshaped or adapted (timm's pretrained loader would adapt input channels or drop a
    mismatched stem; here that is an error, so the recorded checksum describes the weights that run).
    """
    model_state = model.state_dict()
    heads = _head_prefixes(model)
    missing = sorted(k for k in model_state if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in model_state and not k.startswith(heads))
    shape = sorted(k for k in model_state if k in state and tuple(state[k].shape) != tuple(model_state[k].shape))
    if missing or unexpected or shape:
        detail = ", ".join(
            part for part in (
                f"{len(missing)} missing keys, e.g. {missing[0]}" if missing else "",
                f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}" if unexpected else "",
                f"{len(shape)} tensors of another shape, e.g. {shape[0]} {tuple(state[shape[0]].shape)} vs "
                f"{tuple(model_state[shape[0]].shape)}" if shape else "",
            ) if part
        )
        hint = "; check benchmark.channels and backbone.kwargs" if shape else ""
        raise WeightsError(f"{origin}: weights do not match backbone '{name}' ({detail}){hint}")
    kind = sorted(
        k for k in model_state
        if k in state and (state[k].is_floating_point() != model_state[k].is_floating_point() or state[k].is_complex() or state[k].dtype == torch.bool)
    )
    if kind:
        raise WeightsError(f"{origin}: {kind[0]} is {state[kind[0]].dtype}, the model holds {model_state[kind[0]].dtype}")
    bad = sorted(k for k in model_state if k in state and state[k].is_floating_point() and not torch.isfinite(state[k]).all())
    if bad:
        raise WeightsError(f"{origin}: {len(bad)} weight tensors hold NaN or infinite values, e.g. {bad[0]}")
    negative = sorted(k for k in model_state if k.endswith("running_var") and k in state and bool((state[k] < 0).any()))
    if negative:
        raise WeightsError(f"{origin}: {negative[0]} has negative variances")
    return sorted(k for k in state if k not in model_state)


def load_exact(model: nn.Module, state: dict[str, Tensor], name: str, origin: str) -> list[str]:
    """Load ``state`` into ``model`` after :func:`check_exact`. Returns the keys left out."""
    ignored = check_exact(model, state, name, origin)
    model.load_state_dict({k: v for k, v in state.items() if k not in ignored}, strict=False)
    return ignored


def _load_into(name: str, kwargs: dict[str, Any], state: dict[str, Tensor], origin: str) -> tuple[nn.Module, list[str]]:
    model = create_model(name, kwargs)
    return model, load_exact(model, state, name, origin)


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
        model = create_model(cfg.name, kwargs)
    elif source == "hub":
        try:
            model = create_model(cfg.name, kwargs, pretrained=True)
        except (OSError, RuntimeError, ValueError) as err:
            raise WeightsError(
                f"could not fetch hub weights for '{cfg.name}' ({type(err).__name__}); offline, fill the Hugging Face "
                f"cache (HF_HOME) on a machine with internet, or download them and use backbone.weights.source: file"
            ) from None
        pcfg = getattr(model, "pretrained_cfg", {}) or {}
        info.update({k: pcfg.get(k) for k in ("hf_hub_id", "url", "tag") if pcfg.get(k)})
        # what the weights were trained to see, for the record (the benchmark sets the input size)
        info["pretrained_input"] = {k: pcfg.get(k) for k in ("input_size", "interpolation", "crop_pct", "mean", "std")}
    elif source == "file":
        state, sha = load_weights_file(cfg.weights.path or "", cfg.weights.sha256)
        model, ignored = _load_into(cfg.name, kwargs, state, cfg.weights.path or "")
        info.update({"path": str(Path(cfg.weights.path or "").resolve()), "file_sha256": sha, "ignored_keys": ignored})
    else:  # pretrain
        if pretrained_state is None:
            raise RuntimeError("source 'pretrain' needs the pretrained state (see cl.models.pretrain)")
        model, _ = _load_into(cfg.name, kwargs, pretrained_state, "pretrained backbone")
        info.update(pretrain_info or {})
    info["sha256"] = state_dict_sha256(model)

    if cfg.normalize == "imagenet" or (cfg.normalize == "auto" and source in ("hub", "file")):
        pcfg = getattr(model, "pretrained_cfg", {}) or {}
        mean = tuple(pcfg.get("mean", IMAGENET_MEAN)) if source == "hub" else IMAGENET_MEAN
        std = tuple(pcfg.get("std", IMAGENET_STD)) if source == "hub" else IMAGENET_STD
        if transform.channels == 1:
            mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
        transform = replace(transform, mean=tuple(mean), std=tuple(std))
    if source == "hub" and transform.size is not None:  # stored images resized as the tag's weights expect
        mode = (getattr(model, "pretrained_cfg", {}) or {}).get("interpolation")
        if mode in ("bilinear", "bicubic"):
            transform = replace(transform, interpolation=mode)
    elif cfg.normalize == "none":
        transform = replace(transform, mean=(0.0,) * transform.channels, std=(1.0,) * transform.channels)

    apply_trainable(model, cfg)
    backbone = Backbone(model, cfg.name, int(model.num_features), cfg.trainable, transform, info, kwargs, train_roots(model))
    backbone.set_train(False)
    return backbone


def hub_input_hint(cfg: BackboneConfig) -> dict[str, Any] | None:
    """What a hub tag's weights were trained to see (input size, interpolation, crop), read from timm's
    model registry without downloading anything; None unless ``weights.source`` is hub."""
    if cfg.weights.source != "hub":
        return None
    from timm.models import get_pretrained_cfg

    try:
        pcfg = get_pretrained_cfg(cfg.name)
    except (RuntimeError, ValueError, KeyError):
        pcfg = None
    if pcfg is None:
        return None
    return {"input_size": list(pcfg.input_size), "interpolation": pcfg.interpolation, "crop_pct": pcfg.crop_pct,
            "crop_mode": pcfg.crop_mode}


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
