"""Dataset sources: each loads a labelled train/test split into uint8 tensors held in memory.

Images are kept as ``uint8 [N, C, H, W]`` (compact; 47 MB for all of Fashion-MNIST) and turned into
float inputs batch by batch (:mod:`cl.data.transforms`). Every source registers a config class in
:data:`cl.registry.BENCHMARKS`, so ``benchmark.dataset`` in a YAML is validated by it.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import math
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from cl.config import DatasetConfig, PathField, Seed
from cl.errors import DataError
from cl.registry import BENCHMARKS

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class SourceData:
    """A whole dataset in memory, with original (not yet reordered) labels."""

    x_train: Tensor  # uint8 [N, C, H, W]
    y_train: Tensor  # int64 [N]
    x_test: Tensor
    y_test: Tensor
    classes: list[str]
    fingerprint: str  # sha256 of the bytes the data came from, for cache keys and provenance
    origin: str  # where it was read from

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.dtype != torch.uint8 or x.ndim != 4:
                raise DataError(f"{self.origin}: {split} images must be uint8 [N, C, H, W], got {x.dtype} {tuple(x.shape)}")
            if len(x) != len(y):
                raise DataError(f"{self.origin}: {split} has {len(x)} images but {len(y)} labels")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(self.classes)):
                raise DataError(f"{self.origin}: {split} labels outside 0..{len(self.classes) - 1}")

    @property
    def channels(self) -> int:
        return int(self.x_train.shape[1])

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images, in [0, 1] units.

        Computed from exact integer sums: a floating-point reduction's last bits depend on the
        thread count, and these numbers are part of cache keys shared across processes.
        """
        x = self.x_train.transpose(0, 1).reshape(self.channels, -1).to(torch.int64)
        n = x.shape[1]
        s1 = x.sum(dim=1).tolist()
        s2 = (x * x).sum(dim=1).tolist()
        means = [a / n / 255 for a in s1]
        stds = [math.sqrt(max(b - a * a / n, 0) / max(n - 1, 1)) / 255 for a, b in zip(s1, s2)]
        return means, stds


@contextlib.contextmanager
def _undo_created_dirs(*paths: Path) -> Iterator[None]:
    """Remove the directories a failed download created on the way to ``paths``: a download that
    fails offline leaves nothing behind (directories that existed before are never touched)."""
    created = []
    for path in paths:
        missing = [p for p in (path, *path.parents) if not p.exists()]
        if missing:
            created.append(missing[-1])  # the shallowest directory that did not exist
    try:
        yield
    except BaseException:
        for top in created:
            if top.is_dir() and not top.is_symlink():
                shutil.rmtree(top, ignore_errors=True)
        raise


def _sha256(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# IDX files (MNIST family)
# --------------------------------------------------------------------------------------------


def read_idx(path: Path) -> tuple[np.ndarray, bytes]:
    """Read an IDX file (optionally gzipped). Returns (array, raw file bytes)."""
    raw = path.read_bytes()
    try:
        data = gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: corrupt or truncated gzip file ({err})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise DataError(f"{path}: truncated or corrupt IDX file (expected {expected} bytes, found {len(data)})")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims), raw


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def load_idx_dir(directory: Path, classes: list[str]) -> SourceData:
    arrays: dict[str, np.ndarray] = {}
    raws: list[bytes] = []
    for key, stem in MNIST_FILES.items():
        path = _find_idx(directory, stem)
        if path is None:
            raise DataError(f"{directory}: missing data file {stem}(.gz)")
        arrays[key], raw = read_idx(path)
        raws.append(raw)

    def images(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a.copy()).unsqueeze(1)

    return SourceData(
        images(arrays["train_x"]),
        torch.from_numpy(arrays["train_y"].astype(np.int64)),
        images(arrays["test_x"]),
        torch.from_numpy(arrays["test_y"].astype(np.int64)),
        classes,
        _sha256(*raws),
        str(directory),
    )


@BENCHMARKS.register("fashion_mnist", help="Fashion-MNIST, 10 classes, 28x28 grey (Debian package or download)")
class FashionMNISTConfig(DatasetConfig):
    name: Literal["fashion_mnist"] = "fashion_mnist"
    root: str | None = PathField(None, description="directory holding the four IDX files (.gz or raw)")
    download: bool = Field(True, description="download with torchvision if no local copy is found")

    CLASSES: ClassVar[list[str]] = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

    def num_classes(self) -> int:
        return 10

    def candidates(self, data_root: Path) -> list[Path]:
        if self.root:
            return [Path(self.root)]
        return [
            data_root / "fashion-mnist",
            DEBIAN_FASHION_MNIST,
            data_root / "FashionMNIST" / "raw",  # torchvision's layout
        ]

    def load(self, data_root: Path) -> SourceData:
        places = self.candidates(data_root)
        for place in places:
            if _find_idx(place, MNIST_FILES["train_x"]) is not None:
                return load_idx_dir(place, self.CLASSES)
        if self.download and not self.root:
            from torchvision.datasets import FashionMNIST

            try:
                with _undo_created_dirs(data_root / "FashionMNIST"):
                    FashionMNIST(str(data_root), train=True, download=True)
                    FashionMNIST(str(data_root), train=False, download=True)
            except Exception as err:  # noqa: BLE001 - any download failure becomes one line
                raise DataError(
                    f"Fashion-MNIST not found in {', '.join(map(str, places))} and download failed "
                    f"({type(err).__name__}); install the Debian package dataset-fashion-mnist"
                ) from None
            return load_idx_dir(data_root / "FashionMNIST" / "raw", self.CLASSES)
        raise DataError(f"Fashion-MNIST not found in {', '.join(map(str, places))}")


# --------------------------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------------------------


@BENCHMARKS.register("digits", help="scikit-learn digits, 10 classes, 8x8 grey (ships with scikit-learn)")
class DigitsConfig(DatasetConfig):
    name: Literal["digits"] = "digits"
    test_fraction: float = Field(0.2, gt=0, lt=1, description="stratified test split")
    split_seed: Seed = 0

    def num_classes(self) -> int:
        return 10

    def load(self, data_root: Path) -> SourceData:
        from sklearn.datasets import load_digits

        digits = load_digits()
        # 0..16 grey levels -> 0..255
        images = np.clip(np.rint(digits.images * (255 / 16)), 0, 255).astype(np.uint8)
        x = torch.from_numpy(images).unsqueeze(1)
        y = torch.from_numpy(digits.target.astype(np.int64))
        g = torch.Generator().manual_seed(self.split_seed)
        test_mask = torch.zeros(len(y), dtype=torch.bool)
        for c in range(10):
            idx = torch.nonzero(y == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            test_mask[idx[: round(len(idx) * self.test_fraction)]] = True
        return SourceData(
            x[~test_mask], y[~test_mask], x[test_mask], y[test_mask],
            [str(c) for c in range(10)],
            _sha256(images.tobytes(), test_mask.numpy().tobytes()),
            "sklearn.datasets.load_digits",
        )


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickle batches, read with a restricted unpickler)
# --------------------------------------------------------------------------------------------


class _SafeUnpickler(pickle.Unpickler):
    """Only the numpy constructors a CIFAR batch needs; anything else is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def safe_unpickle(path: Path) -> tuple[Any, bytes]:
    """(object, raw bytes) of a pickle holding only plain data and numpy arrays."""
    raw = path.read_bytes()
    try:
        return _SafeUnpickler(io.BytesIO(raw), encoding="latin1").load(), raw
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise DataError(f"{path}: not a readable CIFAR file ({err})") from None


def read_cifar_batch(path: Path) -> dict[str, Any]:
    batch, raw = safe_unpickle(path)
    if not isinstance(batch, dict) or "data" not in batch:
        raise DataError(f"{path}: not a CIFAR batch (no 'data' entry)")
    batch["_raw"] = raw
    return batch


CIFAR_LAYOUT = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta", "labels", "label_names"),
    100: ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names"),
}


def load_cifar_dir(root: Path, n_classes: int) -> SourceData:
    folder, train_files, test_file, meta_file, label_key, names_key = CIFAR_LAYOUT[n_classes]
    directory = root / folder
    raws: list[bytes] = []

    def read(files: list[str]) -> tuple[Tensor, Tensor]:
        xs, ys = [], []
        for name in files:
            path = directory / name
            if not path.is_file():
                raise DataError(f"{directory}: missing data file {name}")
            batch = read_cifar_batch(path)
            raws.append(batch["_raw"])
            data = np.asarray(batch["data"], dtype=np.uint8)
            labels = np.asarray(batch[label_key], dtype=np.int64)
            if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
                raise DataError(f"{path}: expected data of shape [N, 3072] with N labels, got {data.shape}")
            xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
            ys.append(torch.from_numpy(labels))
        return torch.cat(xs), torch.cat(ys)

    x_train, y_train = read(train_files)
    x_test, y_test = read([test_file])
    meta_path = directory / meta_file
    classes = [str(c) for c in range(n_classes)]
    if meta_path.is_file():
        meta, _ = safe_unpickle(meta_path)
        names = meta.get(names_key) if isinstance(meta, dict) else None
        if isinstance(names, list) and len(names) == n_classes:
            classes = [str(n) for n in names]
    return SourceData(x_train, y_train, x_test, y_test, classes, _sha256(*raws), str(directory))


class _CifarConfig(DatasetConfig):
    root: str | None = PathField(None, description="directory containing the extracted python batches")
    download: bool = Field(True, description="download with torchvision if not found")

    N: ClassVar[int] = 10

    def num_classes(self) -> int:
        return self.N

    def load(self, data_root: Path) -> SourceData:
        root = Path(self.root) if self.root else data_root
        folder = CIFAR_LAYOUT[self.N][0]
        if not (root / folder).is_dir():
            if not self.download:
                raise DataError(f"CIFAR-{self.N} not found in {root / folder}")
            from torchvision.datasets import CIFAR10, CIFAR100

            try:
                with _undo_created_dirs(root / folder):
                    (CIFAR10 if self.N == 10 else CIFAR100)(str(root), train=True, download=True)
            except Exception as err:  # noqa: BLE001
                raise DataError(f"CIFAR-{self.N} not found in {root / folder} and download failed ({type(err).__name__})") from None
        return load_cifar_dir(root, self.N)


@BENCHMARKS.register("cifar10", help="CIFAR-10, 10 classes, 32x32 RGB (torchvision download)")
class Cifar10Config(_CifarConfig):
    name: Literal["cifar10"] = "cifar10"
    N: ClassVar[int] = 10


@BENCHMARKS.register("cifar100", help="CIFAR-100, 100 classes, 32x32 RGB (torchvision download)")
class Cifar100Config(_CifarConfig):
    name: Literal["cifar100"] = "cifar100"
    N: ClassVar[int] = 100


# --------------------------------------------------------------------------------------------
# Image folders: root/{train,test}/<class>/<image>
# --------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def read_image(path: Path, mode: str, size: int, digest: Any = None) -> Tensor:
    """One image file as uint8 [C, size, size] (bilinear resize); ``digest`` is updated with its bytes."""
    from PIL import Image, UnidentifiedImageError

    raw = path.read_bytes()
    if digest is not None:
        digest.update(raw)
    try:
        img = Image.open(io.BytesIO(raw)).convert(mode).resize((size, size), Image.BILINEAR)
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: unreadable image ({err})") from None
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.reshape(size, size, -1).copy()).permute(2, 0, 1)


@BENCHMARKS.register("image_folder", help="any root/{train,test}/<class>/<image> tree, resized at load")
class ImageFolderConfig(DatasetConfig):
    name: Literal["image_folder"] = "image_folder"
    root: str = PathField(description="folder with one sub-folder per split")
    train_dir: str = "train"
    test_dir: str = "test"
    image_size: int = Field(ge=1, description="images are resized to this square size when loaded")
    channels: Literal[1, 3] = 3

    def _classes(self) -> list[str]:
        train = Path(self.root) / self.train_dir
        if not train.is_dir():
            raise DataError(f"image folder not found: {train}")
        classes = sorted(p.name for p in train.iterdir() if p.is_dir())
        if not classes:
            raise DataError(f"{train}: no class sub-folders")
        return classes

    def num_classes(self) -> int:
        return len(self._classes())

    def load(self, data_root: Path) -> SourceData:
        classes = self._classes()
        mode = "L" if self.channels == 1 else "RGB"
        h = hashlib.sha256()

        def read(split: str) -> tuple[Tensor, Tensor]:
            xs, ys = [], []
            base = Path(self.root) / split
            if not base.is_dir():
                raise DataError(f"image folder not found: {base}")
            extra = sorted(p.name for p in base.iterdir() if p.is_dir() and p.name not in classes)
            if extra:
                raise DataError(f"{base}: classes {extra} are not in {self.train_dir}/")
            for label, cls in enumerate(classes):
                folder = base / cls
                files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
                if not files:  # every class needs train and test images, or its accuracy is undefined
                    raise DataError(f"{folder}: class '{cls}' has no images in {split}/")
                for path in files:
                    h.update(f"{split}/{cls}/{path.name}\n".encode())  # where a file sits is part of the data
                    xs.append(read_image(path, mode, self.image_size, h))
                    ys.append(label)
            if not xs:
                raise DataError(f"{base}: no images found")
            return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)

        x_train, y_train = read(self.train_dir)
        x_test, y_test = read(self.test_dir)
        return SourceData(x_train, y_train, x_test, y_test, classes, h.hexdigest(), str(self.root))


# --------------------------------------------------------------------------------------------
# CUB-200-2011 (official archive layout)
# --------------------------------------------------------------------------------------------


@BENCHMARKS.register("cub200", help="CUB-200-2011, 200 bird classes (official split; Avalanche download)")
class CUB200Config(DatasetConfig):
    name: Literal["cub200"] = "cub200"
    root: str | None = PathField(None, description="directory containing CUB_200_2011/ (default: the data root)")
    image_size: int = Field(224, ge=1, description="images are resized to this square size when loaded")
    download: bool = Field(True, description="download with Avalanche's CUB200 if not found")

    def num_classes(self) -> int:
        return 200

    def load(self, data_root: Path) -> SourceData:
        root = Path(self.root) if self.root else data_root
        base = root / "CUB_200_2011"
        if not (base / "images.txt").is_file():
            if not self.download:
                raise DataError(f"CUB-200-2011 not found in {base}")
            try:
                from avalanche.benchmarks.datasets import CUB200

                with _undo_created_dirs(base):
                    CUB200(str(root), download=True)
            except Exception as err:  # noqa: BLE001
                raise DataError(f"CUB-200-2011 not found in {base} and download failed ({type(err).__name__})") from None

        h = hashlib.sha256()

        def table(name: str) -> dict[str, str]:
            path = base / name
            if not path.is_file():
                raise DataError(f"{base}: missing data file {name}")
            text = path.read_text()
            h.update(text.encode())  # labels and the split are part of the data, not only the pixels
            rows = {}
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    parts = line.split(maxsplit=1)
                    if len(parts) != 2:
                        raise DataError(f"{path}:{n}: expected '<id> <value>', got {line.strip()[:40]!r}")
                    rows[parts[0]] = parts[1].strip()
            return rows

        paths, labels, split = table("images.txt"), table("image_class_labels.txt"), table("train_test_split.txt")
        classes_file = table("classes.txt") if (base / "classes.txt").is_file() else {}
        parts: dict[str, tuple[list[Tensor], list[int]]] = {"1": ([], []), "0": ([], [])}
        try:
            ids = sorted(paths, key=int)
            for image_id in ids:
                label, where = int(labels[image_id]) - 1, split[image_id]
                if where not in parts or not 0 <= label < 200:
                    raise ValueError(f"image {image_id}: split {where!r}, label {label + 1}")
                xs, ys = parts[where]
                xs.append(read_image(base / "images" / paths[image_id], "RGB", self.image_size, h))
                ys.append(label)
        except KeyError as err:
            raise DataError(f"{base}: image id {err} is missing from a metadata file") from None
        except ValueError as err:
            raise DataError(f"{base}: malformed metadata ({err})") from None
        names = [classes_file.get(str(i + 1), str(i + 1)).strip() for i in range(200)]
        (xtr, ytr), (xte, yte) = parts["1"], parts["0"]
        if not xtr or not xte:
            raise DataError(f"{base}: empty train or test split")
        return SourceData(torch.stack(xtr), torch.tensor(ytr), torch.stack(xte), torch.tensor(yte), names, h.hexdigest(), str(base))


# --------------------------------------------------------------------------------------------
# Synthetic data for tests and smoke runs
# --------------------------------------------------------------------------------------------


@BENCHMARKS.register("synthetic", help="class-dependent noisy patterns; tiny and instant, for tests")
class SyntheticConfig(DatasetConfig):
    name: Literal["synthetic"] = "synthetic"
    n_classes: int = Field(6, ge=2)
    train_per_class: int = Field(40, ge=1)
    test_per_class: int = Field(20, ge=1)
    image_size: int = Field(8, ge=2)
    channels: Literal[1, 3] = 1
    noise: float = Field(40.0, ge=0, description="std of the pixel noise, in grey levels")
    seed: Seed = 0

    def num_classes(self) -> int:
        return self.n_classes

    def load(self, data_root: Path) -> SourceData:
        g = torch.Generator().manual_seed(self.seed)
        shape = (self.channels, self.image_size, self.image_size)
        prototypes = torch.rand((self.n_classes, *shape), generator=g) * 255

        def make(per_class: int) -> tuple[Tensor, Tensor]:
            y = torch.arange(self.n_classes).repeat_interleave(per_class)
            x = prototypes[y] + torch.randn((len(y), *shape), generator=g) * self.noise
            return x.clamp_(0, 255).round_().to(torch.uint8), y

        x_train, y_train = make(self.train_per_class)
        x_test, y_test = make(self.test_per_class)
        fingerprint = _sha256(repr(self.model_dump()).encode())
        return SourceData(x_train, y_train, x_test, y_test, [f"c{i}" for i in range(self.n_classes)], fingerprint, "synthetic")
