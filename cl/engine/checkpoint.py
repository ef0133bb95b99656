"""Atomic, verifiable checkpoints with a fallback to the previous one.

``save`` writes ``last.pt`` through a temporary file (fsync + rename) after moving the previous
``last.pt`` to ``prev.pt``; a crash at any point leaves at least one complete checkpoint. ``load``
reads with ``torch.load(weights_only=True)``, so a checkpoint can never execute code, and falls back
to ``prev.pt`` when ``last.pt`` is missing, truncated or corrupt.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from cl.errors import RunDirError
from cl.utils import atomic_save, load_error_summary

FORMAT = 2  # 2: carries the run identity


def save_checkpoint(directory: Path, payload: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    last, prev = directory / "last.pt", directory / "prev.pt"
    payload = {"format": FORMAT, **payload}
    if last.exists():
        os.replace(last, prev)
    atomic_save(last, lambda tmp: torch.save(payload, tmp))
    return last


def _read(path: Path) -> dict[str, Any]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError("not a checkpoint of this format")
    return payload


def load_checkpoint(directory: Path) -> dict[str, Any] | None:
    """Newest readable checkpoint in ``directory``, or None if there is none at all."""
    candidates = [p for p in (directory / "last.pt", directory / "prev.pt") if p.exists()]
    if not candidates:
        return None
    problems = []
    for path in candidates:
        try:
            return _read(path)
        except Exception as err:  # noqa: BLE001 - any unreadable file: try the older one
            why = load_error_summary(err)
            problems.append(f"{path.name}: {why}")
            warnings.warn(f"checkpoint {path} is unreadable ({why}); trying an older one", stacklevel=2)
    raise RunDirError(f"no readable checkpoint in {directory} ({'; '.join(problems)})")


def prune_checkpoints(directory: Path, keep: str) -> None:
    """After a run has finished (``metrics.json`` written): keep ``all`` (last and previous), the
    ``last`` one, or ``none``. Only the files :func:`save_checkpoint` writes are removed."""
    names = {"all": (), "last": ("prev.pt",), "none": ("prev.pt", "last.pt")}[keep]
    for name in names:
        path = directory / name
        if path.is_file() and not path.is_symlink():
            path.unlink()
