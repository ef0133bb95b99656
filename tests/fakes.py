"""Tiny fake copies of datasets that cannot be downloaded here, in their official on-disk layouts."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


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
