"""Benchmarks and dataset sources, offline: files are written by the tests themselves."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from cl.config import BenchmarkConfig, _specialise
from cl.data.benchmark import build_benchmark, subsample_per_class
from cl.data.sources import DEBIAN_FASHION_MNIST, read_cifar_batch, read_idx
from cl.data.transforms import BatchTransform, random_crop_flip
from cl.errors import DataError
from tests.fakes import write_cifar, write_cub


def bench_cfg(**kw) -> BenchmarkConfig:
    raw = {"dataset": {"name": "synthetic", "n_classes": 6, "train_per_class": 10, "test_per_class": 5}, "n_experiences": 3, **kw}
    return _specialise(BenchmarkConfig, raw).model_validate(raw)


def test_class_incremental_split_follows_class_order(tmp: Path):
    b = build_benchmark(bench_cfg(class_order=[5, 4, 3, 2, 1, 0]), tmp, seed=0)
    assert b.class_order == [5, 4, 3, 2, 1, 0]
    assert [e.classes for e in b.experiences] == [[0, 1], [2, 3], [4, 5]]
    first = b.experiences[0]
    # new label 0 is original class 5: the stored images are those of class 5
    assert torch.equal(b.source.y_train[first.train_ids][first.train.y == 0], torch.full((10,), 5))
    assert all(len(e.train) == 20 and len(e.test) == 10 for e in b.experiences)
    assert len(b.avalanche.train_stream) == 3


def test_base_session_and_seeded_order(tmp: Path):
    b = build_benchmark(bench_cfg(base_classes=4, class_order_seed=7), tmp, seed=0)
    assert [len(e.classes) for e in b.experiences] == [4, 1, 1]
    again = build_benchmark(bench_cfg(base_classes=4, class_order_seed=7), tmp, seed=99)
    assert again.class_order == b.class_order  # the order seed overrides the run seed
    assert sorted(b.class_order) == list(range(6))


def test_task_incremental_has_avalanche_task_labels(tmp: Path):
    b = build_benchmark(bench_cfg(scenario="task_incremental"), tmp, seed=0)
    assert [e.task_label for e in b.avalanche.train_stream] == [0, 1, 2]


def test_subsample_per_class_is_balanced_and_deterministic():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 5)
    keep = subsample_per_class(y, 10, seed=3)
    assert torch.bincount(y[keep]).tolist() == [10, 10, 5]
    assert torch.equal(keep, subsample_per_class(y, 10, seed=3))
    assert not torch.equal(keep, subsample_per_class(y, 10, seed=4))


def test_transform_channels_resize_normalise():
    t = BatchTransform(1, 3, 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)
    out = t(x)
    assert out.shape == (2, 3, 8, 8)
    assert torch.allclose(out, torch.full_like(out, 2.0))  # (1 - 0.5) / 0.25


def test_random_crop_flip_shapes_and_determinism():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    a = random_crop_flip(x, torch.Generator().manual_seed(0))
    b = random_crop_flip(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    same = random_crop_flip(x, torch.Generator().manual_seed(0), padding=0, flip=False)
    assert torch.equal(same, x)


def write_idx(path: Path, array: np.ndarray, truncate: int = 0) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data[: len(data) - truncate] if truncate else data))


def make_fmnist_dir(root: Path, n_train: int = 40, n_test: int = 20, truncate: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (n_train, 28, 28)), truncate)
    write_idx(root / "train-labels-idx1-ubyte.gz", np.arange(n_train) % 10)
    write_idx(root / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (n_test, 28, 28)))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.arange(n_test) % 10)
    return root


def test_fashion_mnist_reader_on_written_idx_files(tmp: Path):
    root = make_fmnist_dir(tmp / "fm")
    raw = {"dataset": {"name": "fashion_mnist", "root": str(root)}, "n_experiences": 5}
    b = build_benchmark(_specialise(BenchmarkConfig, raw).model_validate(raw), tmp, seed=0)
    assert b.source.x_train.shape == (40, 1, 28, 28) and b.source.x_train.dtype == torch.uint8
    assert b.n_classes == 10 and len(b.experiences) == 5


def test_truncated_idx_file_is_a_clear_error(tmp: Path):
    root = make_fmnist_dir(tmp / "fm", truncate=100)
    with pytest.raises(DataError, match="truncated or corrupt IDX file"):
        read_idx(root / "train-images-idx3-ubyte.gz")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    raw = {"dataset": {"name": "fashion_mnist", "root": str(root)}, "n_experiences": 5}
    with pytest.raises(DataError):
        build_benchmark(_specialise(BenchmarkConfig, raw).model_validate(raw), tmp, seed=0)


def test_missing_fashion_mnist_without_download_is_a_clear_error(tmp: Path):
    raw = {"dataset": {"name": "fashion_mnist", "root": str(tmp / "nowhere"), "download": False}, "n_experiences": 5}
    with pytest.raises(DataError, match="Fashion-MNIST not found in"):
        build_benchmark(_specialise(BenchmarkConfig, raw).model_validate(raw), tmp, seed=0)


@pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(), reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian_package(tmp: Path):
    raw = {"dataset": {"name": "fashion_mnist"}, "n_experiences": 5, "train_per_class": 20, "test_per_class": 10}
    b = build_benchmark(_specialise(BenchmarkConfig, raw).model_validate(raw), tmp, seed=0)
    assert b.source.origin == str(DEBIAN_FASHION_MNIST)
    assert len(b.source.y_train) == 200 and len(b.source.y_test) == 100


@pytest.mark.parametrize("n_classes", [10, 100])
def test_cifar_loader_on_tiny_cifar_format_files(tmp: Path, n_classes: int):
    write_cifar(tmp, n_classes, per_file=n_classes * 2)
    raw = {"dataset": {"name": f"cifar{n_classes}", "root": str(tmp), "download": False}, "n_experiences": 10}
    b = build_benchmark(_specialise(BenchmarkConfig, raw).model_validate(raw), tmp, seed=0)
    n_train = n_classes * 2 * (5 if n_classes == 10 else 1)
    assert b.source.x_train.shape == (n_train, 3, 32, 32)
    assert b.source.classes[1] == "class1"


def test_cifar_reader_refuses_code_in_pickles(tmp: Path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        read_cifar_batch(path)


def test_image_folder_source(tmp: Path):
    from PIL import Image

    for split, n in (("train", 3), ("test", 2)):
        for c, colour in enumerate(("red", "blue")):
            folder = tmp / "imgs" / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (10 + i, 12), colour).save(folder / f"{i}.png")
    raw = {"dataset": {"name": "image_folder", "root": str(tmp / "imgs"), "image_size": 8}, "n_experiences": 2}
    b = build_benchmark(_specialise(BenchmarkConfig, raw).model_validate(raw), tmp, seed=0)
    assert b.source.x_train.shape == (6, 3, 8, 8) and b.source.classes == ["class_0", "class_1"]
    red = b.source.x_train[b.source.y_train == 0]
    assert int(red[:, 0].float().mean()) == 255 and int(red[:, 2].float().mean()) == 0


def test_digits_source(tmp: Path):
    raw = {"dataset": {"name": "digits"}, "n_experiences": 5}
    b = build_benchmark(_specialise(BenchmarkConfig, raw).model_validate(raw), tmp, seed=0)
    total = len(b.source.y_train) + len(b.source.y_test)
    assert total == 1797 and b.source.x_train.shape[1:] == (1, 8, 8)
    assert abs(len(b.source.y_test) / total - 0.2) < 0.01
    assert int(b.source.x_train.max()) == 255


def test_channel_stats_are_exact_and_thread_independent():
    """They feed cache keys shared across processes with different thread counts."""
    from cl.data.sources import SourceData

    x = torch.randint(0, 256, (300, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    src = SourceData(x, torch.zeros(300, dtype=torch.long), x[:1], torch.zeros(1, dtype=torch.long), ["a"], "f", "o")
    mean, std = src.channel_stats()
    ref = x.double() / 255
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), ref.mean((0, 2, 3)), rtol=1e-12)
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), ref.std((0, 2, 3)), rtol=1e-12)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert src.channel_stats() == (mean, std)
    finally:
        torch.set_num_threads(threads)


def test_cub200_loader_on_a_tiny_official_layout(tmp: Path):
    write_cub(tmp)
    raw = {"dataset": {"name": "cub200", "root": str(tmp), "image_size": 8, "download": False}, "n_experiences": 10}
    b = build_benchmark(_specialise(BenchmarkConfig, raw).model_validate(raw), tmp, seed=0)
    assert b.source.x_train.shape == (200, 3, 8, 8) and len(b.source.y_test) == 200
    assert b.source.classes[4] == "005.Bird" and int(b.source.x_train[b.source.y_train == 4][0, 0, 0, 0]) == 5
    assert [len(e.classes) for e in b.experiences] == [20] * 10


def test_shuffled_batches_fold_a_trailing_single_sample():
    from cl.data.benchmark import Split

    split = Split(torch.arange(11), torch.arange(11))
    shuffled = list(split.batches(5, torch.Generator().manual_seed(0)))
    assert [len(x) for x, _ in shuffled] == [5, 6]  # BatchNorm cannot train on a batch of one
    assert sorted(torch.cat([x for x, _ in shuffled]).tolist()) == list(range(11))
    assert [len(x) for x, _ in split.batches(5)] == [5, 5, 1]  # evaluation order is untouched
    assert [len(x) for x, _ in split.batches(4, torch.Generator())] == [4, 4, 3]
