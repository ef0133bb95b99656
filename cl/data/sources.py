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
import pickle
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import Tensor

from cl.config import DatasetConfig, PathField, Seed
from cl.data.disk import INTERPOLATIONS, Decode, DiskImages, ImageFiles, channel_stats_exact, images_sha256
from cl.errors import DataError
from cl.registry import BENCHMARKS

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class SourceData:
    """A whole dataset in memory, with original (not yet reordered) labels."""

    x_train: Tensor | DiskImages  # uint8 [N, C, H, W], in memory or decoded from files on demand
    y_train: Tensor  # int64 [N]
    x_test: Tensor | DiskImages
    y_test: Tensor
    classes: list[str]
    fingerprint: str  # sha256 of the bytes the data came from, for cache keys and provenance
    origin: str  # where it was read from
    pools_digest: str | None = None  # set when file-backed pools were decoded into memory: their file identity
    decode: Decode | None = None  # how image files were decoded (file-backed sources)
    domains_train: Tensor | None = None  # int64 [N]: domain of each sample (multi-domain sources)
    domains_test: Tensor | None = None
    domain_names: list[str] | None = None

    @property
    def streamed(self) -> bool:
        return isinstance(self.x_train, DiskImages) or isinstance(self.x_test, DiskImages)

    def pools_sha256(self) -> str:
        """sha256 of the two image pools: their bytes, or for files the files' bytes and decoding (the
        same whether they are streamed or were decoded into memory)."""
        return self.pools_digest or images_sha256(self.x_train, self.x_test)

    def __post_init__(self) -> None:
        if self.decode is None and isinstance(self.x_train, DiskImages):
            self.decode = self.x_train.files.decode
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

        Computed from exact integer sums, batch by batch: a floating-point reduction's last bits
        depend on the thread count, and these numbers are part of cache keys shared across processes.
        Sources of image files are measured on a seeded subsample of 2048 images whether they are
        streamed or were decoded into memory (the two are the same run), since decoding all of
        ImageNet-R to normalise would cost more than the run (:func:`cl.data.disk.channel_stats_exact`).
        """
        means, stds, _ = channel_stats_exact(self.x_train, subsample=self.decode is not None)
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

    def load(self, data_root: Path, hint: dict[str, Any] | None = None) -> SourceData:
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

    def load(self, data_root: Path, hint: dict[str, Any] | None = None) -> SourceData:
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

    def load(self, data_root: Path, hint: dict[str, Any] | None = None) -> SourceData:
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


class FileDatasetConfig(DatasetConfig):
    """A dataset of image files: decoded lazily (:mod:`cl.data.disk`) at ``image_size``.

    ``resize``/``interpolation``/``crop_pct`` set to ``auto`` follow the pretrained config of a hub
    backbone (timm's evaluation transform for its tag) and are ``squash``/``bilinear`` otherwise.
    """

    image_size: int | None = Field(None, ge=1, description="decoded image side; null = the hub backbone's input size")
    resize: Literal["auto", "squash", "crop"] = Field(
        "auto", description="squash = scale to a square; crop = shorter side to image_size/crop_pct, centre crop (timm eval)")
    crop_pct: float | None = Field(None, gt=0, le=1, description="for resize: crop; null = the hub tag's, else 0.875")
    interpolation: Literal["auto", "nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"] = "auto"

    MODE: ClassVar[str] = "RGB"

    def decode(self, hint: dict[str, Any] | None = None) -> Decode:
        """The decode settings, with ``auto`` resolved from a hub backbone's pretrained config ``hint``."""
        hint = hint or {}
        size = self.image_size or (hint.get("input_size") or [None])[-1]
        if size is None:
            raise DataError(f"benchmark.dataset.image_size: required for {self.name} unless the backbone has hub weights (whose input size it takes)")
        resize = self.resize if self.resize != "auto" else ("crop" if hint.get("crop_mode", "center") == "center" and hint else "squash")
        crop_pct = self.crop_pct or float(hint.get("crop_pct") or 0.875)
        interpolation = self.interpolation if self.interpolation != "auto" else str(hint.get("interpolation") or "bilinear")
        if interpolation not in INTERPOLATIONS:
            interpolation = "bicubic"  # timm's "random"/unknown modes: its evaluation transform uses bicubic
        return Decode(int(size), self.MODE, resize, crop_pct if resize == "crop" else 1.0, interpolation)


def file_split(paths: list[Path], decode: Decode) -> DiskImages:
    return DiskImages(ImageFiles(paths, decode))


def listing_fingerprint(names: list[str], pools: list[DiskImages], labels: list[int], *extra: str) -> str:
    """sha256 of a file listing: names, labels and file bytes (where a file sits is part of the data)."""
    h = hashlib.sha256()
    for text in extra:
        h.update(text.encode())
    digests = [d for p in pools for d in p.files.digests]
    for name, digest, label in zip(names, digests, labels, strict=True):
        h.update(f"{name}\t{label}\t{digest}\n".encode())
    return h.hexdigest()


@BENCHMARKS.register("image_folder", help="any root/{train,test}/<class>/<image> tree, decoded lazily")
class ImageFolderConfig(FileDatasetConfig):
    name: Literal["image_folder"] = "image_folder"
    root: str = PathField(description="folder with one sub-folder per split")
    train_dir: str = "train"
    test_dir: str = "test"
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

    def load(self, data_root: Path, hint: dict[str, Any] | None = None) -> SourceData:
        classes = self._classes()
        decode = replace(self.decode(hint), mode="L" if self.channels == 1 else "RGB")

        def read(split: str) -> tuple[DiskImages, list[int], list[str]]:
            base = Path(self.root) / split
            if not base.is_dir():
                raise DataError(f"image folder not found: {base}")
            extra = sorted(p.name for p in base.iterdir() if p.is_dir() and p.name not in classes)
            if extra:
                raise DataError(f"{base}: classes {extra} are not in {self.train_dir}/")
            paths, labels, names = [], [], []
            for label, cls in enumerate(classes):
                folder = base / cls
                files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
                if not files:  # every class needs train and test images, or its accuracy is undefined
                    raise DataError(f"{folder}: class '{cls}' has no images in {split}/")
                paths += files
                labels += [label] * len(files)
                names += [f"{split}/{cls}/{p.name}" for p in files]
            return file_split(paths, decode), labels, names

        (xtr, ytr, ntr), (xte, yte, nte) = read(self.train_dir), read(self.test_dir)
        fingerprint = listing_fingerprint(ntr + nte, [xtr, xte], ytr + yte)
        return SourceData(xtr, torch.tensor(ytr), xte, torch.tensor(yte), classes, fingerprint, str(self.root))


# --------------------------------------------------------------------------------------------
# CUB-200-2011 (official archive layout)
# --------------------------------------------------------------------------------------------


def read_table(path: Path, digest: Any = None) -> dict[str, str]:
    """A '<id> <value>' metadata file (CUB's images.txt, ...) as a dict; its text updates ``digest``."""
    if not path.is_file():
        raise DataError(f"{path.parent}: missing data file {path.name}")
    text = path.read_text()
    if digest is not None:
        digest.update(text.encode())  # labels and the split are part of the data, not only the pixels
    rows = {}
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise DataError(f"{path}:{n}: expected '<id> <value>', got {line.strip()[:40]!r}")
            rows[parts[0]] = parts[1].strip()
    return rows


@BENCHMARKS.register("cub200", help="CUB-200-2011, 200 bird classes (official split; Avalanche download)")
class CUB200Config(FileDatasetConfig):
    name: Literal["cub200"] = "cub200"
    root: str | None = PathField(None, description="directory containing CUB_200_2011/ (default: the data root)")
    image_size: int | None = Field(224, ge=1, description="decoded image side; null = the hub backbone's input size")
    download: bool = Field(True, description="download with Avalanche's CUB200 if not found")

    def num_classes(self) -> int:
        return 200

    def load(self, data_root: Path, hint: dict[str, Any] | None = None) -> SourceData:
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
        paths, labels, split = (read_table(base / n, h) for n in ("images.txt", "image_class_labels.txt", "train_test_split.txt"))
        classes_file = read_table(base / "classes.txt", h) if (base / "classes.txt").is_file() else {}
        parts: dict[str, tuple[list[Path], list[int]]] = {"1": ([], []), "0": ([], [])}
        try:
            for image_id in sorted(paths, key=int):
                label, where = int(labels[image_id]) - 1, split[image_id]
                if where not in parts or not 0 <= label < 200:
                    raise ValueError(f"image {image_id}: split {where!r}, label {label + 1}")
                parts[where][0].append(base / "images" / paths[image_id])
                parts[where][1].append(label)
        except KeyError as err:
            raise DataError(f"{base}: image id {err} is missing from a metadata file") from None
        except ValueError as err:
            raise DataError(f"{base}: malformed metadata ({err})") from None
        names = [classes_file.get(str(i + 1), str(i + 1)).strip() for i in range(200)]
        (ptr, ytr), (pte, yte) = parts["1"], parts["0"]
        if not ptr or not pte:
            raise DataError(f"{base}: empty train or test split")
        decode = self.decode(hint)
        xtr, xte = file_split(ptr, decode), file_split(pte, decode)
        for digest in xtr.files.digests + xte.files.digests:
            h.update(bytes.fromhex(digest))
        return SourceData(xtr, torch.tensor(ytr), xte, torch.tensor(yte), names, h.hexdigest(), str(base))


# --------------------------------------------------------------------------------------------
# ImageNet-R / ImageNet-A (the splits of the pretrained-model CL literature) and DomainNet
# --------------------------------------------------------------------------------------------


def _folder_listing(base: Path, classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """Files of ``base/<class>/*`` (classes: sorted sub-folders, as torchvision's ImageFolder labels them)."""
    if not base.is_dir():
        raise DataError(f"data folder not found: {base}")
    classes = classes or sorted(p.name for p in base.iterdir() if p.is_dir())
    paths, labels = [], []
    for label, cls in enumerate(classes):
        folder = base / cls
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        paths += files
        labels += [label] * len(files)
    return paths, labels, classes


class _ImageNetVariantConfig(FileDatasetConfig):
    """ImageNet-R / -A in one of the layouts the pretrained-model CL papers use.

    ``split: folders`` - ``<folder>/{train,test}/<wnid>/`` as in the pre-split archives of APER,
    RanPAC and EASE (labels: sorted wnids, as torchvision's ImageFolder gives them).
    ``split: lists`` - CODA-Prompt's split files (``<folder>_train.yaml`` / ``<folder>_test.yaml``: a
    ``data`` list of paths ending in ``<folder>/<wnid>/<file>`` and a ``targets`` list) over the
    original archive ``<folder>/<wnid>/``.
    ``split: random`` - the original archive split at random, ``test_fraction`` of all images to test
    (a global split like L2P's; the same draw as TFDS's slicing is not reproducible outside TFDS).
    """

    root: str | None = PathField(None, description="directory containing the dataset folder (default: the data root)")
    split: Literal["folders", "lists", "random"] = "folders"
    train_list: str | None = PathField(None, description="split: lists - the train list (default: <root>/<folder>_train.yaml)")
    test_list: str | None = PathField(None, description="split: lists - the test list (default: <root>/<folder>_test.yaml)")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="split: random - share of all images held out for test")
    split_seed: Seed = 0
    image_size: int | None = Field(224, ge=1, description="decoded image side; null = the hub backbone's input size")

    FOLDER: ClassVar[str] = ""
    URL: ClassVar[str] = ""

    def num_classes(self) -> int:
        return 200

    def load(self, data_root: Path, hint: dict[str, Any] | None = None) -> SourceData:
        root = Path(self.root) if self.root else data_root
        base = root / self.FOLDER
        if not base.is_dir():
            raise DataError(f"{self.FOLDER} not found in {root} (download {self.URL} and extract it there; no automatic download)")
        h = hashlib.sha256(f"{self.name}:{self.split}".encode())
        if self.split == "folders":
            ptr, ytr, classes = _folder_listing(base / "train")
            pte, yte, _ = _folder_listing(base / "test", classes)
            extra = sorted(p.name for p in (base / "test").iterdir() if p.is_dir() and p.name not in classes)
            if extra:
                raise DataError(f"{base / 'test'}: classes {extra[:3]} are not in {base / 'train'}")
        elif self.split == "random":
            paths, labels, classes = _folder_listing(base)
            g = torch.Generator().manual_seed(self.split_seed)
            test = torch.zeros(len(paths), dtype=torch.bool)
            test[torch.randperm(len(paths), generator=g)[: round(len(paths) * self.test_fraction)]] = True
            ptr = [p for p, t in zip(paths, test.tolist()) if not t]
            ytr = [y for y, t in zip(labels, test.tolist()) if not t]
            pte = [p for p, t in zip(paths, test.tolist()) if t]
            yte = [y for y, t in zip(labels, test.tolist()) if t]
            h.update(f"{self.test_fraction}:{self.split_seed}".encode())
        else:
            (ptr, ytr, wtr), (pte, yte, wte) = (self._read_list(base, root, which, h) for which in ("train", "test"))
            wnid: dict[int, str] = {}
            for y, w in zip(ytr + yte, wtr + wte):
                if wnid.setdefault(y, w) != w:
                    raise DataError(f"{self.name} split lists: label {y} names both {wnid[y]} and {w}")
            classes = [wnid.get(i, str(i)) for i in range(max(wnid) + 1)] if wnid else []
        if len(classes) != self.num_classes():
            raise DataError(f"{base}: {len(classes)} classes found, {self.name} has {self.num_classes()}")
        decode = self.decode(hint)
        xtr, xte = file_split(ptr, decode), file_split(pte, decode)
        names = [str(Path(p).relative_to(base)) for p in ptr + pte]
        fingerprint = listing_fingerprint(names, [xtr, xte], ytr + yte, h.hexdigest())
        return SourceData(xtr, torch.tensor(ytr, dtype=torch.int64), xte, torch.tensor(yte, dtype=torch.int64), classes, fingerprint, str(base))

    def _read_list(self, base: Path, root: Path, which: str, digest: Any) -> tuple[list[Path], list[int], list[str]]:
        import yaml

        given = self.train_list if which == "train" else self.test_list
        path = Path(given) if given else root / f"{self.FOLDER}_{which}.yaml"
        if not path.is_file():
            raise DataError(f"{self.name} split list not found: {path}")
        text = path.read_text()
        digest.update(text.encode())
        try:
            doc = yaml.safe_load(text)
            data, targets = [str(p) for p in doc["data"]], [int(t) for t in doc["targets"]]
        except Exception as err:  # noqa: BLE001 - any malformed list is one line
            raise DataError(f"{path}: not a split list with 'data' and 'targets' lists ({type(err).__name__})") from None
        if len(data) != len(targets):
            raise DataError(f"{path}: {len(data)} paths but {len(targets)} targets")
        paths, wnids = [], []
        for entry in data:
            parts = Path(entry).parts
            if self.FOLDER not in parts or len(parts) - parts.index(self.FOLDER) != 3:
                raise DataError(f"{path}: entry {entry!r} does not end in {self.FOLDER}/<wnid>/<file>")
            i = parts.index(self.FOLDER)
            paths.append(base / parts[i + 1] / parts[i + 2])
            wnids.append(parts[i + 1])
        if any(not 0 <= t < self.num_classes() for t in targets):
            raise DataError(f"{path}: targets outside 0..{self.num_classes() - 1}")
        return paths, targets, wnids


@BENCHMARKS.register("imagenet_r", help="ImageNet-R, 200 classes (pre-split folders, CODA-Prompt lists, or a seeded split)")
class ImageNetRConfig(_ImageNetVariantConfig):
    name: Literal["imagenet_r"] = "imagenet_r"
    FOLDER: ClassVar[str] = "imagenet-r"
    URL: ClassVar[str] = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"


@BENCHMARKS.register("imagenet_a", help="ImageNet-A, 200 classes (pre-split folders or a seeded split)")
class ImageNetAConfig(_ImageNetVariantConfig):
    name: Literal["imagenet_a"] = "imagenet_a"
    FOLDER: ClassVar[str] = "imagenet-a"
    URL: ClassVar[str] = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar"


DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")


@BENCHMARKS.register("domainnet", help="DomainNet, 345 classes in 6 domains (official lists); for domain-incremental streams")
class DomainNetConfig(FileDatasetConfig):
    name: Literal["domainnet"] = "domainnet"
    root: str | None = PathField(None, description="directory with <domain>/ folders and <domain>_{train,test}.txt (default: <data root>/domainnet)")
    domains: list[Literal["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]] = Field(
        ["real", "quickdraw", "painting", "sketch", "infograph", "clipart"],
        min_length=1, description="domains in stream order (default: RanPAC's order)")
    image_size: int | None = Field(224, ge=1, description="decoded image side; null = the hub backbone's input size")

    @field_validator("domains")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"domains repeat: {value}")
        return value

    def num_classes(self) -> int:
        return 345

    def num_domains(self) -> int:
        return len(self.domains)

    def load(self, data_root: Path, hint: dict[str, Any] | None = None) -> SourceData:
        root = Path(self.root) if self.root else data_root / "domainnet"
        h = hashlib.sha256(repr(self.domains).encode())
        names: dict[int, str] = {}
        split_parts: dict[str, tuple[list[Path], list[int], list[int]]] = {"train": ([], [], []), "test": ([], [], [])}
        for d, domain in enumerate(self.domains):
            for split, (paths, labels, doms) in split_parts.items():
                listing = root / f"{domain}_{split}.txt"
                if not listing.is_file():
                    raise DataError(f"DomainNet list not found: {listing} (official lists: http://ai.bu.edu/M3SDA/)")
                text = listing.read_text()
                h.update(text.encode())
                for n, line in enumerate(text.splitlines(), 1):
                    if not line.strip():
                        continue
                    parts = line.split()
                    try:
                        rel, label = parts[0], int(parts[1])
                        if len(parts) != 2 or not 0 <= label < 345 or len(Path(rel).parts) != 3:
                            raise ValueError
                    except (ValueError, IndexError):
                        raise DataError(f"{listing}:{n}: expected '<domain>/<class>/<file> <label 0..344>', got {line.strip()[:60]!r}") from None
                    cls = Path(rel).parts[1]
                    if names.setdefault(label, cls) != cls:
                        raise DataError(f"{listing}:{n}: label {label} is '{names[label]}' elsewhere, '{cls}' here")
                    paths.append(root / rel)
                    labels.append(label)
                    doms.append(d)
        decode = self.decode(hint)
        (ptr, ytr, dtr), (pte, yte, dte) = split_parts["train"], split_parts["test"]
        xtr, xte = file_split(ptr, decode), file_split(pte, decode)
        for digest in xtr.files.digests + xte.files.digests:
            h.update(bytes.fromhex(digest))
        classes = [names.get(i, str(i)) for i in range(345)]
        return SourceData(xtr, torch.tensor(ytr, dtype=torch.int64), xte, torch.tensor(yte, dtype=torch.int64), classes,
                          h.hexdigest(), str(root), domains_train=torch.tensor(dtr, dtype=torch.int64),
                          domains_test=torch.tensor(dte, dtype=torch.int64), domain_names=list(self.domains))


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

    def load(self, data_root: Path, hint: dict[str, Any] | None = None) -> SourceData:
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
