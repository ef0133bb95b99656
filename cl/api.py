"""The Python API, for notebooks and scripts: the runs the CLI makes, with the same run directories,
the same identity checks and the same refusals (errors are :class:`cl.errors.UserError`).

    from cl.api import load_run, run

    metrics = run("experiments/fmnist/b4inc2.yaml", overrides=["strategy.memory_size=500"])
    finished = load_run(metrics["run_dir"])
    finished.acc_matrix            # numpy [experiences x experiences], NaN above the diagonal
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from cl.errors import ConfigError, RunDirError

if TYPE_CHECKING:
    import numpy as np

    from cl.config import RunConfig


def load_config(
    config: str | Path | dict[str, Any] | RunConfig,
    overrides: Sequence[str] = (),
    *,
    out_dir: str | None = None,
    smoke: bool = False,
    plugins: Sequence[str] = (),
) -> RunConfig:
    """A validated run config, resolved as ``cl run`` resolves it.

    Args:
        config: a YAML file, a dict written like one (``base:`` and relative paths against the
            working directory), or a RunConfig (then ``overrides`` etc. must be empty).
        overrides: ``key.path=value`` strings, as ``--set``; they name the run as on the CLI.
        out_dir: root of the run directories (``--out``).
        smoke: the ``--smoke`` rehearsal of the config.
        plugins: modules or ``.py`` files to import (``--import``), added to the config's ``plugins``.
    """
    from cl.config import RunConfig, apply_overrides, deep_merge, load_yaml, parse_run_config, resolve_paths
    from cl.engine.rundir import name_run
    from cl.plugins import absolute_specs, import_plugins

    for what, value in (("overrides", overrides), ("plugins", plugins)):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{what}: expected a list of strings, got {value!r:.80}")
    if out_dir is not None and not isinstance(out_dir, str):
        raise ConfigError(f"out_dir: expected a string, got {type(out_dir).__name__}")

    if isinstance(config, RunConfig):
        if overrides or out_dir is not None or smoke or plugins:
            raise ConfigError("a RunConfig is already resolved: give overrides, out_dir, smoke and plugins with a YAML path or dict")
        return config
    if isinstance(config, dict):
        data = resolve_paths({k: v for k, v in config.items() if k != "base"}, Path.cwd())
        bases = config.get("base")
        if bases is not None and not (isinstance(bases, str) or (isinstance(bases, list) and all(isinstance(b, str) for b in bases))):
            raise ConfigError("'base' must be a path or a list of paths")
        for base in [bases] if isinstance(bases, str) else list(bases or []):
            data = deep_merge(load_yaml(Path(base).expanduser().absolute()), data)
    elif isinstance(config, (str, Path)):
        data = load_yaml(config)
        for kind, command in (("tune", "cl tune"), ("suite", "cl sweep")):
            if kind in data:
                raise ConfigError(f"{config} is a {'tuning file' if kind == 'tune' else 'suite'}, not a run config: run it with `{command} {config}`")
    else:
        raise ConfigError(f"config: expected a YAML path, a dict or a RunConfig, got {type(config).__name__}")
    overrides = list(overrides)
    data = name_run(apply_overrides(data, overrides), overrides, data)
    if out_dir is not None:
        data["out_dir"] = out_dir
    if plugins:
        specs = absolute_specs(list(plugins), Path.cwd())
        import_plugins(specs)
        data["plugins"] = [*(data.get("plugins") or []), *specs]
    cfg = parse_run_config(data)
    if smoke:
        from cl.engine.smoke import smoke_config

        _, cfg = smoke_config(data, cfg)
    return cfg


def run(
    config: str | Path | dict[str, Any] | RunConfig,
    overrides: Sequence[str] = (),
    *,
    out_dir: str | None = None,
    plugins: Sequence[str] = (),
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run one config to the end, as ``cl run``; returns its metrics (those of ``metrics.json``)
    with ``run_dir`` added. ``resume=True`` returns a finished run of the same config as it is."""
    from cl.engine.loop import run as run_loop

    cfg = load_config(config, overrides, out_dir=out_dir, plugins=plugins)
    metrics = run_loop(cfg, resume=resume, overwrite=overwrite)
    assert metrics is not None  # only stop_after stops early
    return {**metrics, "run_dir": str(cfg.run_dir())}


@dataclass(frozen=True)
class FinishedRun:
    """A finished run directory, read back: what it was (config, environment) and what it measured."""

    path: Path
    config: dict[str, Any]  # the resolved config (config.yaml)
    metrics: dict[str, Any]  # metrics.json
    env: dict[str, Any]  # env.json: seed, versions, git SHA, backbone checksum, plugins

    @property
    def acc_matrix(self) -> np.ndarray:
        """Accuracy on experience j (column) after training experience i (row); NaN where j > i."""
        import numpy as np

        return np.array([[np.nan if v is None else v for v in row] for row in self.metrics["acc_matrix"]], dtype=float)

    def log(self) -> list[dict[str, Any]]:
        """The per-epoch and per-experience entries of ``log.jsonl``."""
        path = self.path / "log.jsonl"
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.is_file() else []


def load_run(run_dir: str | Path) -> FinishedRun:
    """Read a finished run; an unfinished one, or a metrics.json that belongs to another run, is refused."""
    import yaml

    from cl.engine.rundir import read_marker

    if not isinstance(run_dir, (str, Path)):
        raise RunDirError(f"load_run: expected a run directory path, got {type(run_dir).__name__}")
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise RunDirError(f"{path}: no such run directory")
    marker = read_marker(path)
    if marker is None:
        raise RunDirError(f"{path} is not a run directory (no run.json)")
    if not (path / "metrics.json").is_file():
        raise RunDirError(f"{path} holds an unfinished run (no metrics.json): finish it with `cl run CONFIG --resume`")
    try:
        metrics = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
        config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        env = json.loads((path / "env.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise RunDirError(f"{path}: unreadable run files ({type(err).__name__})") from None
    if not isinstance(metrics, dict) or metrics.get("identity") != marker.get("identity"):
        raise RunDirError(f"{path}/metrics.json belongs to another run than run.json names")
    if not isinstance(config, dict) or not isinstance(env, dict):
        raise RunDirError(f"{path}: config.yaml or env.json is not a mapping")
    from cl.analysis.report import check_metrics

    try:
        check_metrics(metrics)  # the shapes acc_matrix and the reports rely on
    except ValueError as err:
        raise RunDirError(f"{path}/metrics.json: {err}") from None
    return FinishedRun(path, config, metrics, env)


__all__ = ["FinishedRun", "load_config", "load_run", "run"]
