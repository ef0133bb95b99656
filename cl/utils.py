"""Small shared helpers: atomic files, hashing, seeding, provenance."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import random
import subprocess
import tempfile
import time
import types
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

# torch's thread count when this process started (the machine's cores): what caches are built with
# unless a config sets num_threads, so every process of a sweep builds and finds the same entries.
DEFAULT_THREADS = torch.get_num_threads()

PACKAGES = ("torch", "torchvision", "timm", "avalanche-lib", "numpy", "scikit-learn", "matplotlib", "pydantic", "PyYAML", "tqdm", "safetensors", "optuna")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _disk_full(directory: Path) -> bool:
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024


def remove_stale_temps(directory: Path, min_age_s: float = 0.0) -> None:
    """Delete the temporary files that an atomic write killed mid-way (SIGKILL) left in ``directory``."""
    if not directory.is_dir():
        return
    now = time.time()
    for tmp in directory.glob(".*.tmp"):
        try:
            if tmp.is_file() and not tmp.is_symlink() and now - tmp.stat().st_mtime >= min_age_s:
                tmp.unlink()
        except OSError:
            pass


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it into place.

    Readers never see a half-written file: either the old file or the complete new one. A symlink at
    ``path`` is replaced, never written through. A writer that fails on a full disk with its own
    exception type (safetensors, ``torch.save``) is reported as the ``OSError`` it is.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
        except OSError:
            raise
        except Exception as err:
            if "No space left on device" in str(err) or _disk_full(path.parent):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
            raise
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` torch threads (CPU results depend on it), then restore the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, allow_nan=True) + "\n")


def atomic_save(path: str | Path, save: Callable[[Path], None]) -> None:
    with atomic_path(path) as tmp:
        save(tmp)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_sha256(*tensors: Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # hashed in place, no copy
    return h.hexdigest()


def state_dict_sha256(module_or_state: nn.Module | dict[str, Tensor]) -> str:
    """Checksum of weights independent of file format: sorted names, dtypes, shapes and bytes."""
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(tensor_sha256(state[name]).encode())
    return h.hexdigest()


def load_error_summary(err: BaseException) -> str:
    """One short clause for a failed ``torch.load(weights_only=True)`` or safetensors read.

    PyTorch's refusal of a pickle that would run code spans a screen and advises ``weights_only=False``;
    we never take that advice, so only the offending global is kept.
    """
    import re

    text = str(err)
    if "Weights only load failed" in text:
        match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if match:
            return f"refused: loading it would run code ({match.group(1)})"
        return "not a readable PyTorch file"
    if "failed finding central directory" in text or "PytorchStreamReader" in text:
        return "truncated or not a PyTorch file"
    first = (text.strip().splitlines() or [type(err).__name__])[0]
    first = re.sub(r"\x1b\[[0-9;]*m", "", first)
    return first if len(first) <= 120 else first[:117] + "..."


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def resolve_device(name: str) -> torch.device:
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if (name == "cuda" and not torch.cuda.is_available()) or (name == "mps" and not mps):
        from cl.errors import ConfigError

        raise ConfigError(f"device: '{name}' requested but no {name.upper()} device is available (use cpu or auto)")
    return torch.device(name)


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_forward(model: torch.nn.Module, device: torch.device, precision: str = "bf16") -> None:
    """Run ``model``'s forward (and whatever is hooked into it, e.g. PEFT modules) under bf16 (or
    fp16) autocast and hand back float32 outputs: the backbone computes in bf16, while heads, losses,
    classifier statistics and scores stay float32 (training a head under bf16 autocast cost an ER
    run 30 points of accuracy; see the README). Bound as a method, so a deep copy of the model
    (ConFiT's reference extractor) runs its own forward, not this one's."""
    model._autocast_device = device.type  # type: ignore[assignment]
    model._autocast_dtype = AUTOCAST_DTYPES[precision]  # type: ignore[assignment]
    model.forward = types.MethodType(_autocast_forward, model)  # type: ignore[method-assign]


def _autocast_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    with torch.autocast(device_type=self._autocast_device, dtype=self._autocast_dtype):  # type: ignore[arg-type]
        out = type(self).forward(self, *args, **kwargs)
    return out.float() if isinstance(out, torch.Tensor) and out.is_floating_point() else out


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            # --no-optional-locks: provenance must not write into the repository (.git/index.lock)
            out = subprocess.run(["git", "--no-optional-locks", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "dirty": bool(status) if status is not None else None}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment_info(device: torch.device) -> dict[str, Any]:
    return {
        "git": git_info(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
