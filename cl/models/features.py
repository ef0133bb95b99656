"""Frozen-feature cache: run a frozen backbone once per sample and reuse the features.

For strategies that only need features of a frozen backbone this removes the backbone from every
training step and every evaluation; it is the main speed lever of the framework. Features are
cached on disk keyed by the backbone weights checksum, the input pipeline and the exact pool bytes,
so runs of a sweep that share a backbone and a benchmark compute them once.

An entry is a directory ``features/<key>/`` holding one raw row-major array per split
(``train.bin``, ``test.bin``, float32 or float16) and ``state.json`` with the sha256 of every chunk of
:data:`CHUNK_ROWS` rows written so far. Extraction writes chunk by chunk, so a run killed mid-way
resumes at the first missing chunk; reads are memory-mapped and every chunk is verified before use.
A chunk whose bytes no longer match is extracted again, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from cl.config import config_hash
from cl.data.benchmark import Benchmark
from cl.data.disk import DiskImages, iterate_batches
from cl.errors import WeightsError
from cl.models.backbone import Backbone
from cl.utils import load_error_summary, write_json

CHUNK_ROWS = 2048
FORMAT = 2  # 1 was one safetensors file per entry, written at the end
DTYPES = {"float32": np.float32, "float16": np.float16}
DEFAULT_PHASES = {"train": "train", "test": "eval"}  # how each pool is seen (Backbone.phase)


@torch.no_grad()
def extract_features(
    backbone: Backbone, x: Tensor | DiskImages, batch_size: int, device: torch.device, progress: bool | Any = False,
    desc: str = "features",
) -> Tensor:
    """Features of uint8 images ``x`` through the frozen backbone (eval mode), float32 on CPU.
    ``progress``: a bool, or an open tqdm bar to advance."""
    backbone.set_train(False)
    model = backbone.model.to(device)
    # ConvNets run ~1.8x faster on CPU in channels-last layout (profiled: conv2d dominated the
    # extraction); the model is put back afterwards, since strategies may train it.
    convnet = any(isinstance(m, torch.nn.Conv2d) for m in model.modules()) and not hasattr(model, "blocks")
    layout = torch.channels_last if convnet else torch.contiguous_format
    model.to(memory_format=layout)
    chunks = []
    bar = progress if not isinstance(progress, bool) else tqdm(total=len(x), desc=desc, disable=None if progress else True, leave=False)
    try:
        for xb in iterate_batches(x, batch_size):
            batch = backbone.transform(xb, device).contiguous(memory_format=layout)
            chunks.append(model(batch).float().cpu())
            bar.update(len(xb))
    finally:
        if bar is not progress:
            bar.close()
        model.to(memory_format=torch.contiguous_format)
    if not chunks:
        return torch.empty((0, backbone.feature_dim))
    features = torch.cat(chunks)
    bad = int((~torch.isfinite(features)).any(dim=1).sum())
    if bad:  # never cached, never trained on
        raise WeightsError(f"backbone {backbone.name} gives non-finite features (NaN or inf) for {bad} of {len(features)} "
                           f"images; its weights are unusable (a diverged pretraining?)")
    return features


def feature_cache_key(backbone: Backbone, bench: Benchmark, device: torch.device, precision: str = "fp32", dtype: str = "float32",
                      phases: dict[str, str] | None = None) -> str:
    """Everything the features depend on: weights, architecture and its kwargs (pooling, activations
    change features, not weights), input pipeline, images, thread count, device and precision."""
    return config_hash(
        {
            "weights": backbone.weights.get("sha256"),
            "arch": backbone.name,
            "kwargs": backbone.kwargs,
            "transform": backbone.transform.to_dict(),
            "pool": bench.source.pools_sha256(),
            "format": FORMAT,
            "dtype": dtype,
            "threads": torch.get_num_threads(),
            "device": device.type,
            **({"precision": precision} if precision != "fp32" else {}),  # fp32 keys stay as they were
            # token merging: each pool at its phase's r (train: r_train; test: r_eval + compensator)
            **({"tome": backbone.tome.key(), "phases": phases or DEFAULT_PHASES} if backbone.tome is not None else {}),
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
    dtype: str = "float32",
    phases: dict[str, str] | None = None,
) -> tuple[Tensor, Tensor, bool]:
    """(train pool features, test pool features, cache hit?) for the benchmark's image pools, as float32.

    With a cache directory the features live in a chunked, memory-mapped entry (see the module
    docstring): complete entries are read, interrupted ones resumed, damaged chunks re-extracted with
    a warning. A cache that cannot be written (read-only, full) costs only the reuse.
    """
    pools = {"train": bench.source.x_train, "test": bench.source.x_test}
    phase = phases or DEFAULT_PHASES

    def extractor(split: str) -> Any:
        def extract(rows_x: Any, bar: Any) -> Tensor:
            with backbone.phase(phase[split]):
                return extract_features(backbone, rows_x, batch_size, device, bar, f"features ({split})")

        return extract

    if cache_dir is not None:
        entry = cache_dir / "features" / feature_cache_key(backbone, bench, device, precision, dtype, phases)
        try:
            out, hit = FeatureEntry(entry, {k: len(v) for k, v in pools.items()}, backbone.feature_dim, dtype).fill(
                {k: extractor(k) for k in pools}, pools, progress)
            return out["train"], out["test"], hit
        except OSError as err:
            warnings.warn(f"could not write the feature cache in {entry.parent} ({err.strerror or err}); continuing without it", stacklevel=2)
    feats = {k: extractor(k)(v, progress) for k, v in pools.items()}
    if dtype != "float32":  # the same numbers as a cached run would see
        feats = {k: v.to(getattr(torch, dtype)).float() for k, v in feats.items()}
    return feats["train"], feats["test"], False


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8)).hexdigest()


class FeatureEntry:
    """One cache entry: ``<split>.bin`` raw arrays plus ``state.json`` (shapes and chunk checksums)."""

    def __init__(self, directory: Path, rows: dict[str, int], dim: int, dtype: str, chunk_rows: int = CHUNK_ROWS) -> None:
        self.dir, self.rows, self.dim, self.dtype, self.chunk = directory, rows, dim, dtype, chunk_rows
        self.np_dtype = np.dtype(DTYPES[dtype])
        self.meta = {"format": FORMAT, "rows": rows, "dim": dim, "dtype": dtype, "chunk_rows": chunk_rows}

    def _chunks(self, split: str) -> list[slice]:
        n = self.rows[split]
        return [slice(s, min(s + self.chunk, n)) for s in range(0, n, self.chunk)]

    def _state(self) -> dict[str, list[str | None]]:
        """Checksums of the chunks written so far; an entry that does not match this one is reset."""
        fresh = {k: [None] * len(self._chunks(k)) for k in self.rows}
        path = self.dir / "state.json"
        if not path.exists():
            return fresh
        try:
            state = json.loads(path.read_text())
            if state.get("meta") != self.meta:
                raise ValueError("shape, dtype or format differ")
            sums = state["chunks"]
            if {k: len(v) for k, v in sums.items()} != {k: len(v) for k, v in fresh.items()}:
                raise ValueError("wrong number of chunks")
            for split in self.rows:
                size = (self.dir / f"{split}.bin").stat().st_size
                if size != self.rows[split] * self.dim * self.np_dtype.itemsize:
                    raise ValueError(f"{split}.bin has {size} bytes")
            return sums
        except Exception as err:  # noqa: BLE001 - anything wrong with an entry: start it again
            warnings.warn(f"feature cache {self.dir} is unusable ({load_error_summary(err)}); extracting again", stacklevel=4)
            return fresh

    def _allocate(self, split: str) -> None:
        path = self.dir / f"{split}.bin"
        size = self.rows[split] * self.dim * self.np_dtype.itemsize
        if path.is_file() and path.stat().st_size == size:
            return
        with open(path, "wb") as fh:
            if size:
                os.posix_fallocate(fh.fileno(), 0, size)  # ENOSPC now, not SIGBUS on a later write

    def _map(self, split: str) -> np.ndarray:
        if self.rows[split] == 0:
            return np.empty((0, self.dim), self.np_dtype)
        return np.memmap(self.dir / f"{split}.bin", dtype=self.np_dtype, mode="c", shape=(self.rows[split], self.dim))

    def fill(self, extract: Any, pools: dict[str, Any], progress: bool) -> tuple[dict[str, Tensor], bool]:
        """Verify the written chunks, extract the missing ones (``extract(images, bar)``, or a dict of
        such functions per split), return every split as float32."""
        self.dir.mkdir(parents=True, exist_ok=True)
        links = [p.name for p in (self.dir, *(self.dir / f"{s}.bin" for s in self.rows)) if p.is_symlink()]
        if links:  # never written through: the cache is not used
            raise OSError(f"{', '.join(links)} in the cache entry is a symlink")
        sums = self._state()
        if all(v is None for split in sums.values() for v in split):
            for split in self.rows:  # a new (or reset) entry: the arrays are allocated before any chunk is written
                self._allocate(split)
        maps = {split: self._map(split) for split in self.rows}
        damaged = 0
        for split, chunks in sums.items():
            for i, sl in enumerate(self._chunks(split)):
                if chunks[i] is not None and _sha(maps[split][sl]) != chunks[i]:
                    chunks[i], damaged = None, damaged + 1
        if damaged:
            warnings.warn(f"feature cache {self.dir}: {damaged} chunk(s) are damaged and are extracted again", stacklevel=3)
        todo = [(split, i, sl) for split, chunks in sums.items() for i, sl in enumerate(self._chunks(split)) if chunks[i] is None]
        if todo:
            bar = tqdm(total=sum(sl.stop - sl.start for _, _, sl in todo), desc="features", disable=None if progress else True, leave=False)
            try:
                with_fd = {split: open(self.dir / f"{split}.bin", "r+b") for split in {t[0] for t in todo}}
                try:
                    for split, i, sl in todo:
                        fn = extract[split] if isinstance(extract, dict) else extract
                        feats = fn(pools[split][sl], bar).numpy().astype(self.np_dtype)
                        fh = with_fd[split]
                        fh.seek(sl.start * self.dim * self.np_dtype.itemsize)
                        fh.write(feats.tobytes())
                        fh.flush()
                        os.fsync(fh.fileno())
                        sums[split][i] = _sha(feats)
                        write_json(self.dir / "state.json", {"meta": self.meta, "chunks": sums})
                finally:
                    for fh in with_fd.values():
                        fh.close()
            finally:
                bar.close()
            maps = {split: self._map(split) for split in self.rows}
        return {k: torch.from_numpy(np.asarray(m)).float() for k, m in maps.items()}, not todo

