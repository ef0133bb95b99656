"""Tiny fake copies of datasets that cannot be downloaded offline, in their official on-disk layouts.

For tests, smoke rehearsals and benchmarks of the real input pipeline (decoding, splits, streaming)
where the real data are absent. The pixels are synthetic: nothing measured on them is an accuracy.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from cl.errors import DataError


def write_cifar(root: Path, n_classes: int = 10, per_file: int = 20) -> None:
    """CIFAR-10/100 python pickles (``cifar-10-batches-py`` / ``cifar-100-python``), labels cycling over the classes."""
    rng = np.random.default_rng(0)
    if n_classes == 10:
        folder, trains, test, meta = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta"
        label_key, names_key = "labels", "label_names"
    else:
        folder, trains, test, meta = root / "cifar-100-python", ["train"], "test", "meta"
        label_key, names_key = "fine_labels", "fine_label_names"
    folder.mkdir(parents=True)
    for name in [*trains, test]:
        batch = {"data": rng.integers(0, 255, (per_file, 3072), dtype=np.uint8), label_key: [i % n_classes for i in range(per_file)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / meta).write_bytes(pickle.dumps({names_key: [f"class{i}" for i in range(n_classes)]}))


def write_cub(root: Path, size: tuple[int, int] = (12, 9)) -> Path:
    """CUB-200-2011's official layout under ``root/CUB_200_2011`` with 2 images per class (one train,
    one test); pixel (0, 0) of class c's images has red value c."""
    from PIL import Image

    base = root / "CUB_200_2011"
    (base / "images").mkdir(parents=True)
    lines, labels, split = [], [], []
    for i in range(1, 401):
        cls = (i - 1) // 2 + 1
        rel = f"{cls:03d}.Bird/img_{i}.jpg"
        (base / "images" / rel).parent.mkdir(exist_ok=True)
        Image.new("RGB", size, (cls, 0, 0)).save(base / "images" / rel, format="PNG")  # lossless, whatever the name
        lines.append(f"{i} {rel}")
        labels.append(f"{i} {cls}")
        split.append(f"{i} {i % 2}")
    (base / "images.txt").write_text("\n".join(lines))
    (base / "image_class_labels.txt").write_text("\n".join(labels))
    (base / "train_test_split.txt").write_text("\n".join(split))
    (base / "classes.txt").write_text("\n".join(f"{c} {c:03d}.Bird" for c in range(1, 201)))
    return base


def write_image_folder(root: Path, n_classes: int, per_split: int = 1, size: tuple[int, int] = (10, 10)) -> Path:
    """``root/{train,test}/<class>/<image>.png`` with ``per_split`` images per class and split."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(n_classes):
            folder = root / split / f"class{c:03d}"
            folder.mkdir(parents=True)
            for k in range(per_split):
                Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    return root


def _png(path: Path, value: int, size: tuple[int, int]) -> None:
    """A flat image whose red channel is ``value`` (lossless, whatever the file suffix says)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, (value * 7) % 256, 0)).save(path, format="PNG")


WNIDS = [f"n{1440764 + 13 * i:08d}" for i in range(200)]


def write_imagenet_variant(root: Path, folder: str = "imagenet-r", layout: str = "folders", per_class: int = 2,
                           size: tuple[int, int] = (14, 10)) -> Path:
    """ImageNet-R/-A in one of three layouts, 200 wnid classes with ``per_class`` images each:
    ``folders`` = ``<folder>/{train,test}/<wnid>/`` (the pre-split archives), ``flat`` = the original
    ``<folder>/<wnid>/`` archive, ``lists`` = flat plus CODA-Prompt style ``<folder>_{train,test}.yaml``
    (the first image of a class to train, the rest to test; labels in reverse wnid order)."""
    import yaml

    base = root / folder
    lists: dict[str, dict[str, list]] = {"train": {"data": [], "targets": []}, "test": {"data": [], "targets": []}}
    for c, wnid in enumerate(WNIDS):
        for k in range(per_class):
            split = "train" if k < max(1, per_class - 1) else "test"
            rel = Path(split if layout == "folders" else "", wnid, f"art_{k}.jpg")
            _png(base / rel, c, size)
            lists[split]["data"].append(f"data/{folder}/{wnid}/art_{k}.jpg")
            lists[split]["targets"].append(199 - c)
    if layout == "lists":
        for split, doc in lists.items():
            (root / f"{folder}_{split}.yaml").write_text(yaml.safe_dump(doc))
    return base


def write_domainnet(root: Path, domains: tuple[str, ...] = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
                    n_classes: int = 345, per_class: int = 1, size: tuple[int, int] = (12, 12)) -> Path:
    """DomainNet's official layout: ``<domain>/<class>/<domain>_<cls>_<idx>.jpg`` and
    ``<domain>_{train,test}.txt`` lines '<domain>/<class>/<file> <label>'; ``per_class`` images per
    class, split and domain (classes beyond ``n_classes`` are absent)."""
    base = root / "domainnet"
    for d, domain in enumerate(domains):
        for split in ("train", "test"):
            lines = []
            for c in range(n_classes):
                for k in range(per_class):
                    rel = f"{domain}/class_{c:03d}/{domain}_{c:03d}_{k + (100 if split == 'test' else 0):06d}.jpg"
                    _png(base / rel, (c + 40 * d) % 256, size)
                    lines.append(f"{rel} {c}")
            (base / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")
    return base


# --------------------------------------------------------------------------------------------
# `cl fake-data`: a marked root of fake trees, for smoke rehearsals where the real data are absent

MARKER = "FAKE_DATA"
FAKE_DATASETS = ("cifar10", "cifar100", "cub200", "imagenet_r", "imagenet_a", "domainnet")


def write_fake_root(root: Path, names: list[str] | tuple[str, ...] = FAKE_DATASETS) -> list[str]:
    """Write the fake trees of ``names`` under ``root`` (made if absent, else it must be empty or an
    earlier fake root) with enough images for ``--smoke`` (4 training, 1+ test images per class), and
    the :data:`MARKER` file that makes every run but a smoke run refuse the root. Returns the names
    written; a tree already there is kept."""
    unknown = sorted(set(names) - set(FAKE_DATASETS))
    if unknown:
        raise DataError(f"no fake tree for {', '.join(unknown)} (known: {', '.join(FAKE_DATASETS)})")
    marker = root / MARKER
    if marker.is_symlink() or (marker.exists() and not marker.is_file()):
        raise DataError(f"{marker} is not a plain file (a link?): refusing to write through it")
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not marker.is_file())):
        raise DataError(f"{root} exists and is not a fake-data root (no {MARKER} file): refusing to write into it")
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "w") as f:
        f.write("Synthetic images in official dataset layouts, written by `cl fake-data` for --smoke "
                "rehearsals. Runs other than --smoke refuse this directory.\n")
    trees = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "cub200": "CUB_200_2011",
             "imagenet_r": "imagenet-r", "imagenet_a": "imagenet-a", "domainnet": "domainnet"}
    written = []
    for name in names:
        if (root / trees[name]).exists():
            continue
        with tempfile.TemporaryDirectory(dir=root, prefix=".writing-") as tmp:  # a killed write leaves no half tree
            if name in ("cifar10", "cifar100"):
                write_cifar(Path(tmp), 10 if name == "cifar10" else 100, per_file=40 if name == "cifar10" else 400)
            elif name == "cub200":
                write_cub(Path(tmp))
            elif name in ("imagenet_r", "imagenet_a"):
                write_imagenet_variant(Path(tmp), trees[name], "folders", per_class=5)
            else:
                write_domainnet(Path(tmp))
            try:
                os.replace(Path(tmp) / trees[name], root / trees[name])
            except OSError:
                if not (root / trees[name]).is_dir():
                    raise
                continue  # a concurrent `cl fake-data` wrote it first
        written.append(name)
    return written


def fake_root_of(path: Path) -> Path | None:
    """The fake-data root ``path`` lies in (it or a parent holds :data:`MARKER`, as written or with
    links resolved), or None."""
    for start in {Path(os.path.abspath(os.path.expanduser(path))), Path(path).expanduser().resolve()}:
        for folder in (start, *start.parents):
            if os.path.lexists(folder / MARKER):
                return folder
    return None


def fake_files_root(paths: Iterable[str | Path]) -> Path | None:
    """The fake-data root any of ``paths`` resolves into (files linked one by one included), or None."""
    seen: set[Path] = set()
    for path in paths:
        parent = Path(path).resolve().parent
        if parent not in seen:
            seen.add(parent)
            fake = fake_root_of(parent)
            if fake is not None:
                return fake
    return None


def refuse_fake_data(cfg: Any, source: Any = None) -> None:
    """Only a smoke run may read data written by ``cl fake-data``: its numbers are not accuracies.

    Without ``source``: the data roots of the config (its dataset's and a pretraining source
    benchmark's), before anything is loaded. With the loaded ``source``: the folder it was read from
    and every file in it, links resolved (a real-looking root whose files link into a fake one)."""
    if cfg.smoke:
        return
    if source is None:
        paths = [cfg.resolved_data_root()]
        pretrain = cfg.backbone.weights.pretrain
        for bench in (cfg.benchmark, pretrain.benchmark if pretrain is not None else None):
            own = getattr(bench.dataset, "root", None) if bench is not None else None
            paths += [Path(own)] if own else []
        for path in paths:
            fake = fake_root_of(path)
            if fake is not None:
                raise DataError(f"{path} is fake data written by `cl fake-data` ({fake / MARKER}): only --smoke runs may read it")
        return
    origin = Path(source.origin)
    if not origin.exists():  # 'synthetic', bundled data
        return
    linked = []  # links below the dataset folder, to files or folders
    for folder, dirs, names in os.walk(origin):
        linked += [os.path.join(folder, n) for n in (*dirs, *names) if os.path.islink(os.path.join(folder, n))]
    fake = fake_root_of(origin) or fake_files_root(linked)
    if fake is not None:
        raise DataError(f"{origin} holds or links to fake data written by `cl fake-data` ({fake / MARKER}): only --smoke runs may read it")

