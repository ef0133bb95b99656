"""Shared fixtures: tiny synthetic streams, tiny timm models, isolated run/cache directories."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

warnings.filterwarnings("ignore", message="no QP solver found")
torch.set_num_threads(2)


def tiny_config(tmp: Path, **overrides: Any) -> dict[str, Any]:
    """A run config on a 6-class synthetic stream (3 experiences) with a tiny pretrained ResNet."""
    cfg: dict[str, Any] = {
        "experiment": "tiny",
        "out_dir": str(tmp / "runs"),
        "cache_dir": str(tmp / "cache"),
        "data_root": str(tmp / "data"),
        "progress": False,
        "benchmark": {
            "dataset": {"name": "synthetic", "n_classes": 6, "train_per_class": 30, "test_per_class": 10, "image_size": 16, "noise": 30.0},
            "n_experiences": 3,
        },
        "backbone": {
            "name": "test_resnet",
            "weights": {"source": "pretrain", "pretrain": {"epochs": 2, "batch_size": 32}},
        },
        "strategy": {"name": "er", "memory_size": 24},
        "train": {"epochs": 2, "batch_size": 16, "eval_batch_size": 64},
    }
    return merge(cfg, overrides)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and "name" not in v else copy.deepcopy(v)
    return out


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache directory for the session, so the tiny backbone is pretrained once."""
    return tmp_path_factory.mktemp("cache")
