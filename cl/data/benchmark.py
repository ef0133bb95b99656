"""Benchmarks: an Avalanche stream defines the split, our tensors carry the data.

:func:`build_benchmark` loads a source, subsamples it per class, fixes a class order, and asks
Avalanche's ``nc_benchmark`` to split it into experiences (optionally with a larger base session
and with task labels for task-incremental learning). Each Avalanche sample carries a ``sample_id``
attribute, so every experience is mapped back to rows of the in-memory uint8 pool; the loop then
batches those rows directly. The Avalanche scenario stays available (``Benchmark.avalanche``) for
running Avalanche's own strategies on exactly the same stream.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from cl.config import BenchmarkConfig, check_benchmark
from cl.data import disk
from cl.data.disk import DiskImages, as_tensor, iterate_batches
from cl.data.sources import SourceData
from cl.errors import DataError
from cl.data.transforms import BatchTransform
from cl.utils import tensor_sha256


@dataclass
class Split:
    """Inputs and (reordered) labels of one experience's train or test data.

    ``x`` holds uint8 images (a tensor, or :class:`DiskImages` decoded batch by batch), or float
    features once the frozen-feature cache has been applied.
    """

    x: Tensor | DiskImages
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Mini-batches in order, or shuffled with ``generator`` (training).

        When shuffled, a last batch of a single sample is folded into the one before it: BatchNorm
        cannot train on one sample, and dropping it would lose data.
        """
        n = len(self)
        if generator is None:
            if isinstance(self.x, DiskImages):
                yield from zip(iterate_batches(self.x, batch_size), (self.y[s : s + batch_size] for s in range(0, n, batch_size)))
                return
            for start in range(0, n, batch_size):
                yield self.x[start : start + batch_size], self.y[start : start + batch_size]
            return
        order = torch.randperm(n, generator=generator)
        starts = list(range(0, n, batch_size))
        if len(starts) > 1 and n - starts[-1] == 1:
            starts.pop()
        plan = [order[start : starts[i + 1] if i + 1 < len(starts) else n] for i, start in enumerate(starts)]
        if isinstance(self.x, DiskImages):  # decoded as the batches are consumed (in loader workers if set)
            yield from zip(self.x.iterate(plan), (self.y[idx] for idx in plan))
            return
        for idx in plan:
            yield self.x[idx], self.y[idx]


class SealedDataError(RuntimeError):
    """Test data was read where only training and validation data may be (hyper-parameter search)."""


class SealedSplit:
    """Stands in for a test split during tuning: reading it in any way raises :class:`SealedDataError`."""

    def __init__(self, index: int) -> None:
        self._index = index

    def _refuse(self, *args: object, **kwargs: object) -> Any:
        raise SealedDataError(f"test data of experience {self._index} was read during hyper-parameter search")

    __len__ = __iter__ = batches = _refuse  # type: ignore[assignment]

    def __getattr__(self, name: str) -> Any:
        self._refuse()


@dataclass
class Experience:
    """One step of the stream. Classes are contiguous ids ``lo..hi-1`` in order of appearance."""

    index: int
    classes: list[int]
    train: Split
    test: Split
    train_ids: Tensor  # rows of the train pool
    test_ids: Tensor
    val: Split | None = None  # held out from the training data (benchmark.validation)
    val_ids: Tensor | None = None  # rows of the train pool

    @property
    def task_id(self) -> int:
        return self.index

    @property
    def class_range(self) -> tuple[int, int]:
        return self.classes[0], self.classes[-1] + 1


@dataclass
class Benchmark:
    config: BenchmarkConfig
    source: SourceData  # after per-class subsampling, original labels
    class_order: list[int]  # original label of new class 0, 1, ...
    experiences: list[Experience]
    transform: BatchTransform
    avalanche: Any = field(repr=False)  # avalanche CLScenario that defined the split
    native_size: tuple[int, int] = (0, 0)

    @property
    def n_classes(self) -> int:
        return len(self.class_order)

    @property
    def n_experiences(self) -> int:
        return len(self.experiences)

    @property
    def scenario(self) -> str:
        return self.config.scenario

    @property
    def class_names(self) -> list[str]:
        return [self.source.classes[c] for c in self.class_order]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.transform.output_shape(self.native_size)

    def pool(self, split: str) -> tuple[Tensor, Tensor]:
        """All (subsampled) images of a split with reordered labels."""
        if split == "train":
            return self.source.x_train, _remap(self.source.y_train, self.class_order)
        return self.source.x_test, _remap(self.source.y_test, self.class_order)

    def with_inputs(self, train_x: Tensor, test_x: Tensor) -> Benchmark:
        """Same stream with pool inputs replaced (e.g. by frozen features, row for row)."""
        exps = [
            replace(
                e, train=Split(train_x[e.train_ids], e.train.y), test=Split(test_x[e.test_ids], e.test.y),
                val=None if e.val is None or e.val_ids is None else Split(train_x[e.val_ids], e.val.y),
            )
            for e in self.experiences
        ]
        return replace(self, experiences=exps)

    @property
    def has_validation(self) -> bool:
        return all(e.val is not None for e in self.experiences)

    def for_tuning(self, first_k: int | None = None) -> Benchmark:
        """The stream as hyper-parameter search may see it: the first ``first_k`` experiences (all if
        None), with every test split sealed. Any read of test data raises :class:`SealedDataError`."""
        if not self.has_validation:
            raise ValueError("tuning needs benchmark.validation")
        exps = [replace(e, test=SealedSplit(e.index)) for e in self.experiences[: first_k or None]]
        return replace(self, experiences=exps)

    def content_sha256(self) -> str:
        """sha256 of exactly what the stream is made of: the images, labels and class names of both
        splits after subsampling. Part of a run's identity: a relabelled or re-split dataset whose
        files hash the same still changes it."""
        s = self.source
        names = hashlib.sha256("\n".join(s.classes).encode()).hexdigest()
        if s.pools_digest is None and not s.streamed:
            pools = tensor_sha256(s.x_train, s.y_train, s.x_test, s.y_test)  # type: ignore[arg-type]
        else:  # files: their bytes and decoding, whether streamed or decoded into memory
            pools = hashlib.sha256(f"{s.pools_sha256()}:{tensor_sha256(s.y_train, s.y_test)}".encode()).hexdigest()
        return hashlib.sha256(f"{pools}:{names}".encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        return {
            "dataset": self.config.dataset.name,
            "origin": self.source.origin,
            "fingerprint": self.source.fingerprint,
            "scenario": self.scenario,
            "class_order": self.class_order,
            "class_names": self.class_names,
            "classes_per_experience": [len(e.classes) for e in self.experiences],
            "domains": self.source.domain_names if self.scenario == "domain_incremental" else None,
            "train_samples_per_experience": [len(e.train) for e in self.experiences],
            "validation_samples_per_experience": [len(e.val) for e in self.experiences] if self.has_validation else None,
            "test_samples_per_experience": [len(e.test) for e in self.experiences],
            "input_shape": list(self.input_shape),
            "transform": self.transform.to_dict(),
            "decode": self.source.decode.to_dict() if self.source.decode else None,
            "streamed": self.source.streamed,
        }


def subsample_per_class(y: Tensor, per_class: int | None, seed: int) -> Tensor:
    """Sorted row indices keeping at most ``per_class`` random rows of each class."""
    if per_class is None:
        return torch.arange(len(y))
    keep = []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        g = torch.Generator().manual_seed(seed * 1_000_003 + c)
        keep.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(keep).sort().values


def make_class_order(n_classes: int, explicit: list[int] | None, seed: int) -> list[int]:
    if explicit is not None:
        return list(explicit)
    return torch.randperm(n_classes, generator=torch.Generator().manual_seed(seed)).tolist()


class _PoolDataset(torch.utils.data.Dataset):
    """What Avalanche iterates: (float image, original label); the loop never calls __getitem__."""

    def __init__(self, x: Tensor, y: Tensor, transform: BatchTransform) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.transform(self.x[i : i + 1])[0], int(self.y[i])


def _avalanche_dataset(x: Tensor, y: Tensor, transform: BatchTransform) -> Any:
    from avalanche.benchmarks.utils import DataAttribute
    from avalanche.benchmarks.utils.classification_dataset import ClassificationDataset

    n = len(y)
    return ClassificationDataset(
        [_PoolDataset(x, y, transform)],
        data_attributes=[
            DataAttribute(y.tolist(), "targets"),
            DataAttribute([0] * n, "targets_task_labels", use_in_getitem=True),
            DataAttribute(list(range(n)), "sample_id"),
        ],
    )


def _attribute(dataset: Any, name: str) -> Tensor:
    return torch.as_tensor(list(getattr(dataset, name)), dtype=torch.int64)


def make_transform(
    source: SourceData, cfg: BenchmarkConfig, mean: list[float] | None = None, std: list[float] | None = None
) -> BatchTransform:
    channels = cfg.channels or source.channels
    if mean is None or std is None:
        mean, std = source.channel_stats()
        if channels != source.channels:  # stats of the converted images
            lum_mean, lum_std = sum(mean) / len(mean), sum(std) / len(std)
            mean, std = [lum_mean] * channels, [lum_std] * channels
    # a constant channel (std 0) would divide by zero: floor the std at one grey level
    std = [max(s, 1 / 255) for s in std]
    return BatchTransform(source.channels, channels, cfg.image_size, tuple(mean), tuple(std))


def build_benchmark(cfg: BenchmarkConfig, data_root: Path, seed: int, hint: dict[str, Any] | None = None) -> Benchmark:
    """Load the dataset and split it into an Avalanche class-/task-incremental stream.

    Args:
        cfg: the benchmark section of a run config.
        data_root: where datasets are looked for and downloaded to.
        seed: the run seed; the class order uses ``cfg.class_order_seed`` if set, else this.
        hint: a hub backbone's pretrained config; sources of image files decode with it.

    Returns:
        The benchmark, whose experiences hold uint8 images and labels ``0..n_classes-1`` in order
        of appearance.
    """
    from avalanche.benchmarks import nc_benchmark

    sizes = check_benchmark(cfg)
    full = cfg.dataset.load(data_root, hint)
    n_cls = len(full.classes)
    # per class, or per (domain, class) in multi-domain data: a small subsample keeps every domain
    train_keys = full.y_train if full.domains_train is None else full.domains_train * n_cls + full.y_train
    test_keys = full.y_test if full.domains_test is None else full.domains_test * n_cls + full.y_test
    train_keep = subsample_per_class(train_keys, cfg.train_per_class, cfg.subsample_seed)
    test_keep = subsample_per_class(test_keys, cfg.test_per_class, cfg.subsample_seed + 1)
    source = keep_or_stream(replace(
        full, x_train=full.x_train[train_keep], y_train=full.y_train[train_keep], x_test=full.x_test[test_keep],
        y_test=full.y_test[test_keep], pools_digest=None,
        domains_train=None if full.domains_train is None else full.domains_train[train_keep],
        domains_test=None if full.domains_test is None else full.domains_test[test_keep],
    ))
    if cfg.scenario == "domain_incremental":
        return _domain_benchmark(cfg, source)
    _check_every_class(source)
    order = make_class_order(len(source.classes), cfg.class_order, seed if cfg.class_order_seed is None else cfg.class_order_seed)
    transform = make_transform(source, cfg)

    scenario = nc_benchmark(
        _avalanche_dataset(source.x_train, source.y_train, transform),
        _avalanche_dataset(source.x_test, source.y_test, transform),
        n_experiences=len(sizes),
        task_labels=cfg.scenario == "task_incremental",
        fixed_class_order=order,
        per_exp_classes={0: sizes[0]} if cfg.base_classes is not None else None,
        class_ids_from_zero_from_first_exp=True,
    )
    experiences = []
    offset = 0
    for i, (tr, te) in enumerate(zip(scenario.train_stream, scenario.test_stream)):
        classes = sorted(tr.classes_in_this_experience)
        if classes != list(range(offset, offset + sizes[i])):
            raise RuntimeError(f"unexpected class split from Avalanche at experience {i}: {classes}")
        offset += sizes[i]
        train_ids, test_ids = _attribute(tr.dataset, "sample_id"), _attribute(te.dataset, "sample_id")
        train_ids, test_ids = train_ids.sort().values, test_ids.sort().values
        # Avalanche's own (reordered) targets must agree with ours, row for row.
        expected = _attribute(tr.dataset, "targets").sort().values
        if not torch.equal(expected, _remap(source.y_train[train_ids], order).sort().values):
            raise RuntimeError(f"label mismatch with the Avalanche stream at experience {i}")
        val_ids = None
        if cfg.validation is not None:
            train_ids, val_ids = split_validation(source.y_train, train_ids, cfg.validation.fraction, cfg.validation.per_class,
                                                  cfg.validation.seed, source.classes)
        experiences.append(
            Experience(
                index=i,
                classes=classes,
                train=Split(source.x_train[train_ids], _remap(source.y_train[train_ids], order)),
                test=Split(source.x_test[test_ids], _remap(source.y_test[test_ids], order)),
                train_ids=train_ids,
                test_ids=test_ids,
                val=None if val_ids is None else Split(source.x_train[val_ids], _remap(source.y_train[val_ids], order)),
                val_ids=val_ids,
            )
        )
    native = (int(source.x_train.shape[-2]), int(source.x_train.shape[-1]))
    return Benchmark(cfg, source, order, experiences, transform, scenario, native)


def _domain_benchmark(cfg: BenchmarkConfig, source: SourceData) -> Benchmark:
    """One experience per domain, in the dataset's domain order; the label space is shared (identity
    class order) and every experience is tested on its own domain's test images."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets

    assert source.domains_train is not None and source.domains_test is not None and source.domain_names is not None
    n = len(source.classes)
    order = list(range(n))
    transform = make_transform(source, cfg)
    experiences, av_train, av_test = [], [], []
    for d, name in enumerate(source.domain_names):
        train_ids = torch.nonzero(source.domains_train == d).flatten()
        test_ids = torch.nonzero(source.domains_test == d).flatten()
        if not len(train_ids) or not len(test_ids):
            raise DataError(f"{source.origin}: domain '{name}' has no {'train' if not len(train_ids) else 'test'} images")
        val_ids = None
        if cfg.validation is not None:
            train_ids, val_ids = split_validation(source.y_train, train_ids, cfg.validation.fraction, cfg.validation.per_class,
                                                  cfg.validation.seed, source.classes)
        experiences.append(Experience(
            index=d, classes=order, train=Split(source.x_train[train_ids], source.y_train[train_ids]),
            test=Split(source.x_test[test_ids], source.y_test[test_ids]), train_ids=train_ids, test_ids=test_ids,
            val=None if val_ids is None else Split(source.x_train[val_ids], source.y_train[val_ids]), val_ids=val_ids,
        ))
        av_train.append(_avalanche_dataset(source.x_train[train_ids], source.y_train[train_ids], transform))
        av_test.append(_avalanche_dataset(source.x_test[test_ids], source.y_test[test_ids], transform))
    scenario = benchmark_from_datasets(train=av_train, test=av_test)
    native = (int(source.x_train.shape[-2]), int(source.x_train.shape[-1]))
    return Benchmark(cfg, source, order, experiences, transform, scenario, native)


def keep_or_stream(source: SourceData) -> SourceData:
    """File-backed pools stay on disk when ``loader.stream`` says so (``auto``: when decoded they would
    take more than ``loader.max_in_memory_gb``); otherwise they are decoded into memory once. Either
    way the run sees the same pixels and has the same identity."""
    if not source.streamed:
        return source
    decoded = sum(x.nbytes_decoded for x in (source.x_train, source.x_test) if isinstance(x, DiskImages))
    opts = disk.LOADER
    if opts.stream == "always" or (opts.stream == "auto" and decoded > opts.max_in_memory_gb * 2**30):
        return source
    return replace(source, x_train=as_tensor(source.x_train), x_test=as_tensor(source.x_test), pools_digest=source.pools_sha256())


def split_validation(
    y: Tensor, rows: Tensor, fraction: float | None, per_class: int | None, seed: int, names: list[str] | None = None
) -> tuple[Tensor, Tensor]:
    """(train rows, validation rows) of one experience: per class, a seeded random ``fraction`` (rounded,
    at least one) or ``per_class`` of its training rows go to validation; at least one stays in train.

    The draw for a class depends only on the seed and the class's original label, so the split is the
    same whatever the class order or the run seed.
    """
    train, val = [], []
    labels = y[rows]
    for c in torch.unique(labels).tolist():
        mine = rows[labels == c]
        n = len(mine)
        k = per_class if per_class is not None else max(1, round(n * (fraction or 0.0)))
        if k >= n:
            raise DataError(f"benchmark.validation: class '{names[c] if names else c}' has {n} training samples, too few to hold out {k} and keep one")
        g = torch.Generator().manual_seed(seed * 1_000_003 + c)
        perm = mine[torch.randperm(n, generator=g)]
        val.append(perm[:k])
        train.append(perm[k:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def _check_every_class(source: SourceData) -> None:
    """Every class needs train and test samples, or the split (and its accuracy) is undefined."""
    for split, y in (("train", source.y_train), ("test", source.y_test)):
        counts = torch.bincount(y, minlength=len(source.classes))
        empty = [source.classes[c] for c in torch.nonzero(counts == 0).flatten().tolist()]
        if empty:
            more = f" and {len(empty) - 3} more" if len(empty) > 3 else ""
            raise DataError(f"{source.origin}: no {split} samples of class{'es' * (len(empty) > 1)} "
                            f"{', '.join(map(repr, empty[:3]))}{more}; every class needs train and test samples")


def _remap(y: Tensor, order: list[int]) -> Tensor:
    remap = torch.empty(len(order), dtype=torch.int64)
    remap[torch.tensor(order)] = torch.arange(len(order))
    return remap[y]
