"""Run directories: ``<out_dir>/<experiment>/<run>/seed<k>/`` with config, provenance, logs, metrics.

A run directory is *finished* once ``metrics.json`` exists (written atomically, last). A finished run
is never overwritten without ``--overwrite``; an unfinished one is continued with ``--resume``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from cl.config import RunConfig, config_hash, config_to_dict
from cl.errors import RunDirError
from cl.utils import atomic_write_text

# Keys that do not change results; a run may be resumed with different values.
VOLATILE_KEYS = ("progress", "out_dir", "data_root", "cache_dir", "num_threads")


def result_hash(cfg: RunConfig) -> str:
    data = config_to_dict(cfg)
    for key in VOLATILE_KEYS:
        data.pop(key, None)
    return config_hash(data)


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").is_file()


def open_run_dir(cfg: RunConfig, *, resume: bool, overwrite: bool) -> tuple[Path, str]:
    """Check the directory's state against the request. Returns (path, "fresh" | "resume" | "finished")."""
    run_dir = cfg.run_dir()
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    if is_finished(run_dir):
        if resume:
            return run_dir, "finished"
        raise RunDirError(f"{run_dir} holds a finished run; pass --overwrite to replace it")
    has_checkpoint = (run_dir / "ckpt").is_dir() and any((run_dir / "ckpt").iterdir())
    if has_checkpoint and not resume:
        raise RunDirError(f"{run_dir} holds an unfinished run; pass --resume to continue it or --overwrite")
    if resume and has_checkpoint:
        saved = run_dir / "config.yaml"
        if saved.is_file():
            old = yaml.safe_load(saved.read_text())
            for key in VOLATILE_KEYS:
                old.pop(key, None)
            if config_hash(old) != result_hash(cfg):
                raise RunDirError(f"{run_dir}: the config differs from the run being resumed (use --overwrite)")
        return run_dir, "resume"
    return run_dir, "fresh"


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


class JsonlLog:
    """Append-only JSON-lines log; ``offset`` lets a resumed run drop lines written after its checkpoint."""

    def __init__(self, path: Path, truncate_to: int | None = None) -> None:
        self.path = path
        if truncate_to is not None and path.exists():
            with open(path, "r+b") as fh:
                fh.truncate(truncate_to)
        self._fh = open(path, "a", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> None:
        self._fh.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}, allow_nan=True) + "\n")
        self._fh.flush()

    @property
    def offset(self) -> int:
        self._fh.flush()
        return self._fh.tell()

    def close(self) -> None:
        self._fh.close()
