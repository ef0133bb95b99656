"""Run directories: ``<out_dir>/<experiment>/<run>/seed<k>/`` and what makes a result trustworthy.

A run directory belongs to exactly one resolved config. Its ``run.json`` (written first, when the
directory is created) holds the run's *identity*: the hash of the config without the keys that
cannot change a result (progress bars, thread count, where data and caches live), the fingerprint
of the data, and the checksum of the backbone weights. It is also the marker that this framework
created the directory: nothing without it is ever written into or deleted.

* A finished run (``metrics.json`` present, written last) is reused only when the identity matches.
* An unfinished run is continued (``--resume``) only when the identity matches, and its checkpoint
  carries the same identity.
* Otherwise: one line naming the keys that differ; ``--overwrite`` replaces the run.
* A lock (``.lock``, ``flock``) makes a second process on the same directory a one-line error.
"""

from __future__ import annotations

import errno
import fcntl
import json
import warnings
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from cl.config import (
    FREEZE_TO_TRAINABLE, IDENTITY_DEFAULTS, PLACEMENT_KEYS, VOLATILE_KEYS, RunConfig, check_run_dir, config_hash, config_to_dict, flatten, is_path_field, parse_override,
)
from cl.yamlio import yaml_text
from cl.errors import RunDirError
from cl.utils import atomic_write_text

MARKER = "run.json"
LOCK = ".lock"
RUN_FILES = ("metrics.json", "config.yaml", "env.json", "log.jsonl")
FORMAT = 1



# ---- identity -------------------------------------------------------------------------------


def _drop(data: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        data = data.get(key)  # type: ignore[assignment]
        if not isinstance(data, dict):
            return
    data.pop(last, None)


def _without_paths(model: BaseModel, data: dict[str, Any]) -> dict[str, Any]:
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if is_path_field(field):
            data.pop(name, None)
        elif isinstance(value, BaseModel) and isinstance(data.get(name), dict):
            _without_paths(value, data[name])
    return data


def result_config(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config without volatile keys, paths and folder names: what a result depends on."""
    data = _without_paths(cfg, config_to_dict(cfg))
    for key in (*VOLATILE_KEYS, "experiment", "run_name"):
        _drop(data, key)
    backbone = data.get("backbone")
    if isinstance(backbone, dict) and "trainable" in backbone:  # hashed as before the rename (FREEZE_TO_TRAINABLE)
        old = {new: old for old, new in FREEZE_TO_TRAINABLE.items()}
        backbone["freeze"] = old[backbone.pop("trainable")]
    if data.get("plugins"):  # a plugin by its module name and content, not by where its file lies
        from cl.plugins import provenance

        data["plugins"] = [f"{p['module']}@{p['sha256']}" for p in provenance(data["plugins"])]
    flat = flatten(data)
    for key, default in IDENTITY_DEFAULTS.items():
        if key in flat and flat[key] == default:
            _drop(data, key)
    return data


def result_hash(cfg: RunConfig) -> str:
    return config_hash(result_config(cfg))


def run_identity(cfg: RunConfig, data_fingerprint: str, weights_sha256: str | None) -> dict[str, Any]:
    """What a run's numbers are a function of: config, data bytes, backbone weights."""
    return {"config": result_hash(cfg), "data": data_fingerprint, "weights": weights_sha256}


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 24 else text[:21] + "..."


def config_diff(old: dict[str, Any], new: dict[str, Any], limit: int = 4) -> list[str]:
    """``key: old -> new`` for every flattened key that differs (the first ``limit``, then a count)."""
    a, b = flatten(old), flatten(new)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))
    parts = [f"{k}: {_short(a.get(k, '<unset>'))} -> {_short(b.get(k, '<unset>'))}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return parts


def identity_diff(marker: dict[str, Any], identity: dict[str, Any], config: dict[str, Any]) -> str | None:
    """None if ``marker`` (a run.json) describes the same run, else what differs, for one line."""
    old = marker.get("identity") or {}
    parts: list[str] = []
    if old.get("config") != identity["config"]:
        parts += config_diff(marker.get("config") or {}, config) or ["config hash"]
    if "data" in identity and old.get("data") != identity["data"]:
        parts.append("data fingerprint")
    if "weights" in identity and old.get("weights") != identity["weights"]:
        parts.append("backbone weights sha256")
    return "; ".join(parts) if parts else None


# ---- the directory ----------------------------------------------------------------------------


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").is_file()


def _valid_marker(marker: Any) -> bool:
    return (
        isinstance(marker, dict) and marker.get("format") == FORMAT
        and isinstance(marker.get("identity"), dict) and isinstance(marker.get("config"), dict)
    )


def read_marker(run_dir: Path) -> dict[str, Any] | None:
    """The run.json of a directory (None if absent). One that is not this framework's is an error:
    such a directory is never written into nor deleted, ``--overwrite`` included."""
    path = run_dir / MARKER
    if not path.is_file() and not path.is_symlink():
        return None
    try:
        if path.is_symlink():
            raise ValueError("a symlink")
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        marker, why = None, f"unreadable: {type(err).__name__}"
    else:
        why = "not a run marker of this framework"
    if not _valid_marker(marker):
        raise RunDirError(f"{path} is {why}, so {run_dir} may not be ours; refusing to write into or delete it (move it away)")
    return marker


def _contents(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.iterdir() if p.name != LOCK] if run_dir.is_dir() and not run_dir.is_symlink() else []


def _symlink_inside(run_dir: Path) -> Path | None:
    for root, dirs, files in os.walk(run_dir):  # os.walk does not follow symlinked directories
        for name in (*dirs, *files):
            if (Path(root) / name).is_symlink():
                return Path(root) / name
    return None


def _enclosing_run(path: Path) -> Path | None:
    """The nearest directory above ``path`` that is a run directory (holds run.json), if any."""
    for parent in path.resolve().parents:
        if (parent / MARKER).is_file():
            return parent
    return None


def check_ours(run_dir: Path, *, clearing: bool = False) -> None:
    """Refuse a run directory we must not write into or delete.

    It must not be a symlink or a file, lie inside another run directory, exist with content but
    without a valid run.json of ours, or hold a symlink (writes would go through it; only
    ``clearing`` it for ``--overwrite`` is safe, as symlinks are removed, never followed).
    """
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise RunDirError(f"{run_dir} exists and is not a run directory; refusing to touch it")
    outer = _enclosing_run(run_dir)
    if outer is not None:
        raise RunDirError(f"{run_dir} would lie inside the run directory {outer}; choose another experiment, run name or out_dir")
    if not _contents(run_dir):
        return
    if not (run_dir / MARKER).is_file() and not (run_dir / MARKER).is_symlink():
        raise RunDirError(
            f"{run_dir} exists but has no {MARKER}, so it was not created by this version of cl; "
            f"refusing to write into or delete it (move it away)"
        )
    read_marker(run_dir)
    if not clearing:
        odd = [n for n in RUN_FILES if (run_dir / n).exists() and not (run_dir / n).is_file()]
        if odd:
            raise RunDirError(f"{run_dir / odd[0]} is not a regular file; pass --overwrite to replace the run")
    link = None if clearing else _symlink_inside(run_dir)
    if link is not None:
        raise RunDirError(f"{link} is a symlink inside a run directory; refusing to write through it (remove it)")


def _another_config(run_dir: Path, diff: str) -> RunDirError:
    kind = "a finished" if is_finished(run_dir) else "an unfinished"
    return RunDirError(f"{run_dir} holds {kind} run of another config ({diff}); pass --overwrite to replace it")


def _already_finished(run_dir: Path) -> RunDirError:
    return RunDirError(f"{run_dir} holds a finished run; --resume reports it (if config, data and weights match), --overwrite replaces it")


def _unfinished(run_dir: Path) -> RunDirError:
    return RunDirError(f"{run_dir} holds an unfinished run; pass --resume to continue it or --overwrite to replace it")


def _has_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / "ckpt").glob("*.pt"))


def check_report_dir(directory: Path, out_dir: str | Path) -> None:
    """A sweep's report folder: inside ``out_dir`` (symlinks followed), not inside a run directory."""
    root = Path(out_dir).resolve()
    if directory.is_symlink() or not directory.resolve().is_relative_to(root):
        raise RunDirError(f"report folder {directory} is a symlink or resolves outside out_dir {root}; refusing to write there")
    outer = _enclosing_run(directory / "x")
    if outer is not None:
        raise RunDirError(f"report folder {directory} would lie inside the run directory {outer}; choose another out_dir")
    check_writable(directory)


def check_writable(directory: Path) -> None:
    """The nearest existing ancestor of ``directory`` must be a writable directory."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirError(f"{existing} is a file; out_dir must be a directory")
    if not os.access(existing, os.W_OK):
        raise RunDirError(f"{existing} is not writable; choose another out_dir (--out)")


def check_before_run(cfg: RunConfig, *, resume: bool, overwrite: bool) -> None:
    """Refuse what the config alone shows to be refused, before any data or backbone is loaded.

    The same checks run again, under the lock, when the directory is opened.
    """
    from cl.data.fakes import refuse_fake_data

    refuse_fake_data(cfg)
    run_dir = check_run_dir(cfg)
    check_writable(run_dir)
    check_ours(run_dir, clearing=overwrite)
    holder = lock_holder(run_dir)
    if holder is not None:  # busy now: say so at once, not after loading everything
        raise RunDirError(f"{run_dir} is in use by another cl process (pid {holder}); wait for it or stop it")
    if overwrite:
        return
    state, diff = planned_state(cfg)
    if state == "conflict":
        raise _another_config(run_dir, diff or "")
    if state == "finished" and not resume:
        raise _already_finished(run_dir)
    if state == "unfinished" and not resume and _has_checkpoint(run_dir):
        raise _unfinished(run_dir)


def _check_finished_metrics(run_dir: Path, marker: dict[str, Any]) -> None:
    """A finished run's metrics.json must be the one this run wrote: readable, with its identity."""
    path = run_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
        same = isinstance(metrics, dict) and metrics.get("identity") == marker.get("identity")
    except (OSError, ValueError):
        same = False
    if not same:
        raise RunDirError(f"{path} is unreadable or belongs to another run; pass --overwrite to re-run")


def planned_state(cfg: RunConfig) -> tuple[str, str | None]:
    """What a run would do with its directory, from the config alone (no data or weights loaded).

    Returns (state, detail): ("new" | "finished" | "unfinished" | "conflict", what differs).
    """
    run_dir = check_run_dir(cfg)
    check_ours(run_dir)
    marker = read_marker(run_dir)
    if marker is None:
        return "new", None
    diff = identity_diff(marker, {"config": result_hash(cfg)}, result_config(cfg))
    if diff:
        return "conflict", diff
    if is_finished(run_dir):
        _check_finished_metrics(run_dir, marker)
        return "finished", None
    return "unfinished", None


def _clear(run_dir: Path) -> None:
    """Delete everything in a directory of ours except the lock we hold and the marker, which the
    caller then replaces atomically: a kill in between leaves a directory that is still ours."""
    for entry in _contents(run_dir):
        if entry.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def lock_holder(run_dir: Path) -> str | None:
    """The pid recorded by the process holding the run's lock, or None if it is free (writes nothing)."""
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except OSError:
        return os.read(fd, 64).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock``, released by ``release`` or by process exit."""

    def __init__(self, run_dir: Path) -> None:
        path = run_dir / LOCK
        try:
            self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise RunDirError(f"{path} is a symlink; refusing to use it as a lock") from None
            raise
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.read(self._fd, 64).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            self._fd = None
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirError(f"{run_dir} is in use by another cl process (pid {holder}); wait for it or stop it") from None
            raise
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@dataclass
class OpenRun:
    path: Path
    mode: str  # "fresh" | "resume" | "finished"
    lock: RunLock


def open_run_dir(cfg: RunConfig, identity: dict[str, Any], *, resume: bool, overwrite: bool) -> OpenRun:
    """Lock the run directory and check its state against the request and the run's identity.

    Args:
        cfg: the run's config.
        identity: :func:`run_identity` of the prepared run.
        resume: continue an unfinished run, or report a finished one (sweeps always pass True).
        overwrite: replace whatever run of ours the directory holds.
    """
    run_dir = check_run_dir(cfg)
    check_ours(run_dir, clearing=overwrite)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    try:
        config = result_config(cfg)
        check_ours(run_dir, clearing=overwrite)  # again, under the lock
        marker = read_marker(run_dir)
        if overwrite:
            marker = None
        if marker is not None:
            diff = identity_diff(marker, identity, config)
            if diff:
                raise _another_config(run_dir, diff)
            if is_finished(run_dir):
                if not resume:
                    raise _already_finished(run_dir)
                return OpenRun(run_dir, "finished", lock)
            if _has_checkpoint(run_dir):
                if not resume:
                    raise _unfinished(run_dir)
                return OpenRun(run_dir, "resume", lock)
            # Unfinished without a checkpoint (it died before the first one): nothing to continue.
        _clear(run_dir)
        marker = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "identity": identity, "config": config}
        atomic_write_text(run_dir / MARKER, json.dumps(marker, indent=1, sort_keys=True) + "\n")
        return OpenRun(run_dir, "fresh", lock)
    except BaseException:
        lock.release()
        raise


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    atomic_write_text(run_dir / "config.yaml", yaml_text(config_to_dict(cfg)))


# ---- naming runs by their --set overrides -----------------------------------------------------

_KEEP = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.=+-")


def _token(text: str) -> str:
    return "".join(c if c in _KEEP else "_" for c in text)


def override_label(overrides: list[str], before: dict[str, Any], limit: int = 96) -> str | None:
    """A readable, path-safe label for the ``--set`` overrides that change a result.

    ``["strategy.lr=0.5", "progress=false"]`` -> ``"strategy.lr=0.5"``. Overrides of volatile and
    placement keys, and overrides that leave the value as it was, are left out; the last override of a
    key wins. A label longer than ``limit`` is cut and ends in a hash of the full overrides, so
    distinct labels stay distinct.
    """
    chosen: dict[str, Any] = {}
    for text in overrides:
        keys, value = parse_override(text)
        chosen[".".join(keys)] = value
    flat = flatten(before)
    parts = []
    for key, value in chosen.items():
        volatile = any(key == v or key.startswith(v + ".") for v in VOLATILE_KEYS)  # loggers.wandb, loader.num_workers
        if volatile or key in PLACEMENT_KEYS or (key in flat and flat[key] == value):
            continue
        shown = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        parts.append(f"{_token(key)}={_token(shown)}")
    if not parts:
        return None
    label = ",".join(parts)
    if len(label) > limit:
        digest = "+h" + config_hash(sorted((k, json.dumps(v, default=str)) for k, v in chosen.items()))[:8]
        label = label[: max(limit - len(digest), 0)] + digest
    return label


def _dataset_name(data: dict[str, Any]) -> Any:
    bench = data.get("benchmark")
    dataset = bench.get("dataset") if isinstance(bench, dict) else None
    return dataset.get("name") if isinstance(dataset, dict) else None


def _warn_if_dataset_moved(data: dict[str, Any], overrides: list[str], before: dict[str, Any]) -> None:
    """``--set benchmark.dataset.name=digits`` on an fmnist config would file a digits run under the
    config's experiment folder (``fmnist_b4inc2``): say so, unless the experiment was set too."""
    if any(parse_override(t)[0] == ["experiment"] for t in overrides):
        return
    old, new = _dataset_name(before), _dataset_name(data)
    if old != new and isinstance(new, str):
        warnings.warn(f"--set changed the dataset from '{old}' to '{new}' but the run is still filed under experiment "
                      f"'{data.get('experiment', 'default')}'; add --set experiment=NAME to file it under a name of its own", stacklevel=3)


def name_run(data: dict[str, Any], overrides: list[str], before: dict[str, Any]) -> dict[str, Any]:
    """Give a run built with ``--set`` overrides its own directory: ``<name>,<label>``.

    An explicit ``--set run_name=...`` is kept as given (identity checks still refuse a clash).
    """
    _warn_if_dataset_moved(data, overrides, before)
    if any(parse_override(t)[0] == ["run_name"] for t in overrides):
        return data
    strategy = data.get("strategy")
    base = data.get("run_name") or (strategy.get("name") if isinstance(strategy, dict) else None)
    if not isinstance(base, str):
        return data  # validation reports the missing strategy
    base = base[:109]  # room for ",<label>" within a 120-character folder name (the label hash keeps it distinct)
    label = override_label(overrides, before, limit=119 - len(base))
    if label is None:
        return data
    return {**data, "run_name": f"{base},{label}"}


# ---- the event log ------------------------------------------------------------------------------


def _is_json_line(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


class JsonlLog:
    """JSON-lines log of a run: truncated on a fresh start, cut back to the checkpoint on resume.

    A resumed run drops the lines written after its checkpoint; if the log is shorter than the
    checkpoint remembers (it was cut by a crash or by hand) it is cut back to its last complete
    line instead, never padded, so every line stays valid JSON.
    """

    def __init__(self, path: Path, resume_offset: int | None = None) -> None:
        self.path = path
        self.lost_bytes = 0
        self.dropped_lines = 0
        if resume_offset is None or not path.exists():
            path.write_bytes(b"")
        else:
            data = path.read_bytes()
            self.lost_bytes = max(resume_offset - len(data), 0)
            data = data[: min(len(data), resume_offset)]
            data = data[: data.rfind(b"\n") + 1]  # a partial last line is dropped
            lines = data.splitlines(keepends=True)
            kept = [ln for ln in lines if _is_json_line(ln)]
            self.dropped_lines = len(lines) - len(kept)
            path.write_bytes(b"".join(kept))
        self._fh = open(path, "a", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> None:
        self._fh.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}, allow_nan=True) + "\n")
        self._fh.flush()

    @property
    def offset(self) -> int:
        self._fh.flush()
        return self._fh.tell()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()
