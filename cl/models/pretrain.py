"""Make a pretrained backbone offline: supervised training on the base session or a source benchmark.

The result is cached under ``<cache_dir>/backbones/`` by a hash of everything that determines it
(architecture, kwargs, training hyper-parameters, the exact training bytes and the input
pipeline), with a JSON provenance file next to the weights. Training is deterministic on CPU for a
given seed, so the same config always maps to the same weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from cl.config import BackboneConfig, PretrainConfig, config_hash
from cl.data.benchmark import Benchmark, Split, build_benchmark, make_transform
from cl.data.disk import DiskImages
from cl.data.transforms import BatchTransform, random_crop_flip
from cl.errors import TrainingDiverged
from cl.models.backbone import check_exact, create_model
from cl.utils import atomic_save, git_info, load_error_summary, remove_stale_temps, package_versions, state_dict_sha256, tensor_sha256, write_json


def _data_sha256(x: Tensor | DiskImages, y: Tensor) -> str:
    if isinstance(x, DiskImages):
        return hashlib.sha256(f"{x.sha256()}:{tensor_sha256(y)}".encode()).hexdigest()
    return tensor_sha256(x, y)


def pretraining_data(pcfg: PretrainConfig, bench: Benchmark, data_root: Path, seed: int) -> tuple[Tensor, Tensor, BatchTransform, str]:
    """(uint8 images, labels, transform, description) to pretrain on."""
    if pcfg.train_on == "base_session":
        exp = bench.experiences[0]
        return exp.train.x, exp.train.y, bench.transform, f"base session of {bench.config.dataset.name} ({len(exp.classes)} classes)"
    assert pcfg.benchmark is not None
    # The source must produce inputs shaped like the target's: same channels and size.
    target = bench.transform
    size = target.size or bench.native_size[0]
    src_cfg = pcfg.benchmark.model_copy(update={"image_size": size, "channels": target.channels})
    src = build_benchmark(src_cfg, data_root, seed)
    x, y = src.pool("train")
    return x, y, make_transform(src.source, src_cfg), f"benchmark {src_cfg.dataset.name} ({src.n_classes} classes)"


def pretrain_key(cfg: BackboneConfig, pcfg: PretrainConfig, x: Tensor, y: Tensor, transform: BatchTransform, device: torch.device) -> str:
    """Everything the pretrained weights depend on, bit for bit: the thread count and device too."""
    return config_hash(
        {
            "arch": cfg.name,
            "kwargs": cfg.kwargs,
            "pretrain": pcfg.model_dump(mode="json"),
            "data": _data_sha256(x, y),
            "transform": transform.to_dict(),
            "threads": torch.get_num_threads(),
            "device": device.type,
        }
    )


def train_supervised(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    transform: BatchTransform,
    pcfg: PretrainConfig,
    device: torch.device,
    progress: bool = False,
) -> dict[str, Any]:
    """Train ``model`` (a timm model with ``num_classes=0``) plus a temporary linear head."""
    n_classes = int(y.max()) + 1
    torch.manual_seed(pcfg.seed)
    head = nn.Linear(int(model.num_features), n_classes)
    model.to(device).train()
    head.to(device).train()
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=pcfg.lr, momentum=pcfg.momentum, weight_decay=pcfg.weight_decay, nesterov=pcfg.momentum > 0)
    steps_per_epoch = math.ceil(len(y) / pcfg.batch_size)
    total = steps_per_epoch * pcfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    g = torch.Generator().manual_seed(pcfg.seed)
    history = []
    bar = tqdm(total=total, desc="pretrain", disable=None if progress else True, leave=False)
    data = Split(x, y)
    for epoch in range(pcfg.epochs):
        correct, seen, loss_sum = 0, 0, 0.0
        for step, (xb_u8, yb_cpu) in enumerate(data.batches(pcfg.batch_size, g)):  # no 1-sample batch: BatchNorm
            xb = transform(xb_u8, device)
            if pcfg.augment:
                xb = random_crop_flip(xb, g)
            yb = yb_cpu.to(device)
            logits = head(model(xb))
            loss = F.cross_entropy(logits, yb, label_smoothing=pcfg.label_smoothing)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"pretraining diverged (loss {loss.item()} at epoch {epoch}, step {step}); "
                    f"lower backbone.weights.pretrain.lr (now {pcfg.lr}). Nothing was cached"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(yb)
            loss_sum += loss.item() * len(yb)
            bar.update()
        history.append({"epoch": epoch, "loss": loss_sum / seen, "train_acc": correct / seen})
        # A finite but exploded loss is divergence too: cross-entropy at chance is ln(C); no healthy
        # epoch averages a hundred times that, and no healthy training ends above three times it.
        chance = max(math.log(n_classes), 1e-3)
        limit = 100 * chance if epoch < pcfg.epochs - 1 else 3 * chance
        if loss_sum / seen > limit:
            raise TrainingDiverged(
                f"pretraining diverged (mean loss {loss_sum / seen:.3g} in epoch {epoch}, chance is {math.log(n_classes):.2f}); "
                f"lower backbone.weights.pretrain.lr (now {pcfg.lr}). Nothing was cached"
            )
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
    bar.close()
    model.eval()
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise TrainingDiverged(f"pretraining left non-finite weights (e.g. {bad[0]}); lower backbone.weights.pretrain.lr. Nothing was cached")
    return {"history": history, "n_samples": len(y), "n_classes": n_classes}


def get_pretrained(
    cfg: BackboneConfig,
    bench: Benchmark,
    *,
    data_root: Path,
    cache_dir: Path,
    seed: int,
    device: torch.device,
    progress: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Return cached pretrained weights for ``cfg``, training them first if needed.

    Returns:
        (state_dict of the ``num_classes=0`` model, provenance dict).
    """
    pcfg = cfg.weights.pretrain or PretrainConfig()
    x, y, transform, description = pretraining_data(pcfg, bench, data_root, seed)
    key = pretrain_key(cfg, pcfg, x, y, transform, device)
    path = cache_dir / "backbones" / f"{cfg.name}-{key}.safetensors"
    meta_path = path.with_suffix(".json")
    kwargs = dict(cfg.kwargs)
    kwargs.setdefault("in_chans", transform.channels)
    torch.manual_seed(pcfg.seed)
    model = create_model(cfg.name, kwargs)  # a backbone.kwargs typo is a one-line error before training
    remove_stale_temps(path.parent, min_age_s=3600)  # left by a writer killed an hour ago or more
    cached = _read_cached(path, meta_path, key, model)
    if cached is not None:
        return cached
    start = time.perf_counter()
    stats = train_supervised(model, x, y, transform, pcfg, device, progress)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "pretrained_on": description,
        "key": key,
        "path": str(path),
        "sha256": state_dict_sha256(state),
        "arch": cfg.name,
        "kwargs": kwargs,
        "pretrain": pcfg.model_dump(mode="json"),
        "transform": transform.to_dict(),
        "data_sha256": _data_sha256(x, y),
        "threads": torch.get_num_threads(),
        "device": device.type,
        "wall_time_s": round(time.perf_counter() - start, 3),
        "git": git_info(),
        "packages": package_versions(),
        **stats,
    }
    try:
        atomic_save(path, lambda tmp: save_file(state, str(tmp), metadata={"sha256": meta["sha256"]}))
        write_json(meta_path, meta)
    except OSError as err:  # a read-only or full cache: the run goes on with the weights in memory
        warnings.warn(f"could not cache the pretrained backbone in {path.parent} ({err.strerror}); continuing without caching", stacklevel=2)
        return state, {**meta, "path": None, "cache": "not written"}
    return state, {**meta, "cache": "miss"}


def _read_cached(path: Path, meta_path: Path, key: str, model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """A cached pretrained backbone, verified against its recorded checksum and checked to fit
    ``model`` exactly with finite values (left untouched); None to rebuild it."""
    if not path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        state = load_file(str(path))
        if not isinstance(meta, dict) or meta.get("key") != key:
            raise ValueError("provenance file missing or of another backbone")
        if state_dict_sha256(state) != meta.get("sha256"):
            raise ValueError("checksum mismatch")
        check_exact(model, state, str(meta.get("arch")), str(path))
    except Exception as err:  # noqa: BLE001 - anything wrong with a cache entry: rebuild it
        warnings.warn(f"cached backbone {path} is unusable ({load_error_summary(err)}); pretraining again", stacklevel=3)
        return None
    return state, {**meta, "cache": "hit"}
