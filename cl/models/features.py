"""Frozen-feature cache: run a frozen backbone once per sample and reuse the features.

For strategies that only need features of a frozen backbone this removes the backbone from every
training step and every evaluation; it is the main speed lever of the framework. Features are
cached on disk keyed by the backbone weights checksum, the input pipeline and the exact pool bytes,
so runs of a sweep that share a backbone and a benchmark compute them once.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from cl.config import config_hash
from cl.data.benchmark import Benchmark
from cl.errors import WeightsError
from cl.models.backbone import Backbone
from cl.utils import atomic_save, load_error_summary, remove_stale_temps, tensor_sha256


@torch.no_grad()
def extract_features(
    backbone: Backbone, x: Tensor, batch_size: int, device: torch.device, progress: bool = False, desc: str = "features"
) -> Tensor:
    """Features of uint8 images ``x`` through the frozen backbone (eval mode), float32 on CPU."""
    backbone.set_train(False)
    model = backbone.model.to(device)
    # ConvNets run ~1.8x faster on CPU in channels-last layout (profiled: conv2d dominated the
    # extraction); the model is put back afterwards, since strategies may train it.
    convnet = any(isinstance(m, torch.nn.Conv2d) for m in model.modules()) and not hasattr(model, "blocks")
    layout = torch.channels_last if convnet else torch.contiguous_format
    model.to(memory_format=layout)
    chunks = []
    try:
        for start in tqdm(range(0, len(x), batch_size), desc=desc, disable=None if progress else True, leave=False):
            batch = backbone.transform(x[start : start + batch_size], device).contiguous(memory_format=layout)
            chunks.append(model(batch).float().cpu())
    finally:
        model.to(memory_format=torch.contiguous_format)
    if not chunks:
        return torch.empty((0, backbone.feature_dim))
    features = torch.cat(chunks)
    bad = int((~torch.isfinite(features)).any(dim=1).sum())
    if bad:  # never cached, never trained on
        raise WeightsError(f"backbone {backbone.name} gives non-finite features (NaN or inf) for {bad} of {len(features)} "
                           f"images; its weights are unusable (a diverged pretraining?)")
    return features


def feature_cache_key(backbone: Backbone, bench: Benchmark, device: torch.device, precision: str = "fp32") -> str:
    """Everything the features depend on: weights, architecture and its kwargs (pooling, activations
    change features, not weights), input pipeline, images, thread count, device and precision."""
    return config_hash(
        {
            "weights": backbone.weights.get("sha256"),
            "arch": backbone.name,
            "kwargs": backbone.kwargs,
            "transform": backbone.transform.to_dict(),
            "pool": tensor_sha256(bench.source.x_train, bench.source.x_test),
            "threads": torch.get_num_threads(),
            "device": device.type,
            **({"precision": precision} if precision != "fp32" else {}),  # fp32 keys stay as they were
        }
    )


def cached_features(
    backbone: Backbone,
    bench: Benchmark,
    *,
    cache_dir: Path | None,
    batch_size: int,
    device: torch.device,
    progress: bool = False,
    precision: str = "fp32",
) -> tuple[Tensor, Tensor, bool]:
    """(train pool features, test pool features, cache hit?) for the benchmark's image pools.

    A cache file records the checksum of its tensors; one that is unreadable, of the wrong shape or
    whose bytes no longer match is rebuilt with a warning, never used. A cache that cannot be
    written (read-only, full) costs only the reuse.
    """
    path = cache_dir / "features" / f"{feature_cache_key(backbone, bench, device, precision)}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        cached = _read_verified(path, len(bench.source.x_train), len(bench.source.x_test), backbone.feature_dim)
        if cached is not None:
            return cached[0], cached[1], True
    train = extract_features(backbone, bench.source.x_train, batch_size, device, progress, "features (train)")
    test = extract_features(backbone, bench.source.x_test, batch_size, device, progress, "features (test)")
    if path is not None:
        remove_stale_temps(path.parent, min_age_s=3600)  # left by a writer killed an hour ago or more
        tensors = {"train": train.contiguous(), "test": test.contiguous()}
        try:
            atomic_save(path, lambda tmp: save_file(tensors, str(tmp), metadata={"sha256": tensor_sha256(train, test)}))
        except OSError as err:
            warnings.warn(f"could not write the feature cache in {path.parent} ({err.strerror}); continuing without it", stacklevel=2)
    return train, test, False


def _read_verified(path: Path, n_train: int, n_test: int, dim: int) -> tuple[Tensor, Tensor] | None:
    try:
        with safe_open(str(path), "pt") as fh:
            expected = (fh.metadata() or {}).get("sha256")
        data = load_file(str(path))
        train, test = data["train"], data["test"]
        if tuple(train.shape) != (n_train, dim) or tuple(test.shape) != (n_test, dim):
            raise ValueError(f"shapes {tuple(train.shape)}, {tuple(test.shape)}; expected ({n_train}, {dim}), ({n_test}, {dim})")
        if expected is None or tensor_sha256(train, test) != expected:
            raise ValueError("checksum mismatch")
    except Exception as err:  # noqa: BLE001 - anything wrong with a cache file: rebuild it
        warnings.warn(f"feature cache {path} is unusable ({load_error_summary(err)}); extracting again", stacklevel=3)
        return None
    return train, test
