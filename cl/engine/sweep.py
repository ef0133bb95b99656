"""Suites: one YAML listing benchmarks x strategies x seeds, run as individual runs, then compared.

A suite file::

    suite: quickstart                 # experiment name: runs/<suite>[/<benchmark>]/<strategy>/seed<k>
    config: base/fmnist.yaml          # the run config every entry starts from (relative path)
    overrides: {train: {epochs: 2}}   # applied to every run
    seeds: [0, 1, 2]
    benchmarks:                       # optional; each adds its own overrides
      - {name: b0, overrides: {benchmark: {base_classes: null}}}
    strategies:
      - {name: er, overrides: {strategy: {name: er, memory_size: 200}}}

Every run config is built and validated before the first run starts, so a typo in the last entry
costs nothing. Finished runs are skipped and unfinished ones resumed, so re-running a suite picks up
where it stopped.
"""

from __future__ import annotations

import copy
import json
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from cl.config import (
    ConfigError, Model, RunConfig, apply_overrides, config_hash, deep_merge, format_validation_error, load_yaml, parse_run_config,
)
from cl.errors import UserError


class SuiteEntry(Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    overrides: dict[str, Any] = Field(default_factory=dict, description="nested overrides of the run config")


class SuiteConfig(Model):
    suite: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    config: str = Field(description="base run config, relative to the suite file")
    overrides: dict[str, Any] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    benchmarks: list[SuiteEntry] = Field(default_factory=list)
    strategies: list[SuiteEntry] = Field(min_length=1)


@dataclass
class PlannedRun:
    benchmark: str | None
    strategy: str
    seed: int
    cfg: RunConfig


def plan_suite(path: str | Path, cli_overrides: list[str] | None = None, out_dir: str | None = None) -> tuple[SuiteConfig, list[PlannedRun]]:
    """Expand and validate every run of a suite; raises ConfigError naming the entry at fault."""
    path = Path(path)
    raw = load_yaml(path)
    try:
        suite = SuiteConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{path}: {format_validation_error(err, SuiteConfig)}") from None
    for kind, entries in (("benchmarks", suite.benchmarks), ("strategies", suite.strategies)):
        names = [e.name for e in entries]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"{path}: duplicate {kind} names: {', '.join(dupes)}")
    base = deep_merge(load_yaml(path.parent / suite.config), suite.overrides)
    benchmarks: list[SuiteEntry | None] = list(suite.benchmarks) or [None]
    planned = []
    for bench in benchmarks:
        for strat in suite.strategies:
            for seed in suite.seeds:
                data = copy.deepcopy(base)
                if bench is not None:
                    data = deep_merge(data, bench.overrides)
                data = deep_merge(data, strat.overrides)
                data.update(
                    experiment=suite.suite if bench is None else f"{suite.suite}/{bench.name}",
                    run_name=strat.name,
                    seed=seed,
                )
                if out_dir is not None:
                    data["out_dir"] = out_dir
                data = apply_overrides(data, cli_overrides or [])
                where = f"{path}: {'benchmark ' + bench.name + ', ' if bench else ''}strategy {strat.name}, seed {seed}"
                try:
                    cfg = parse_run_config(data)
                except ConfigError as err:
                    raise ConfigError(f"{where}: {err}") from None
                planned.append(PlannedRun(bench.name if bench else None, strat.name, seed, cfg))
    return suite, planned


@dataclass
class RunOutcome:
    run: PlannedRun
    metrics: dict[str, Any] | None
    error: str | None = None


def execute(run: PlannedRun, overwrite: bool = False) -> RunOutcome:
    """Run (or resume, or reuse) one planned run; failures are captured, not raised."""
    from cl.engine.loop import run as run_one

    try:
        metrics = run_one(run.cfg, resume=not overwrite, overwrite=overwrite)
        return RunOutcome(run, metrics)
    except UserError as err:
        return RunOutcome(run, None, f"{type(err).__name__}: {err}")
    except Exception as err:  # noqa: BLE001 - one failed run must not lose the others
        tail = traceback.format_exc().strip().splitlines()[-1]
        return RunOutcome(run, None, f"{type(err).__name__}: {err} [{tail}]")


def summarize_suite(suite: SuiteConfig, outcomes: list[RunOutcome], out_root: Path) -> str:
    """Write summary tables and plots per benchmark; return the printable text."""
    from analysis.report import write_comparison

    texts = []
    groups: dict[str | None, dict[str, list[dict[str, Any]]]] = {}
    for o in outcomes:
        if o.metrics is not None:
            groups.setdefault(o.run.benchmark, {}).setdefault(o.run.strategy, []).append(o.metrics)
    for bench, runs in groups.items():
        title = suite.suite if bench is None else f"{suite.suite} / {bench}"
        out_dir = out_root / suite.suite / (bench or "")
        texts.append(f"== {title} ==\n" + write_comparison(runs, out_dir, title) + f"\n(tables and plots in {out_dir})")
    failed = [o for o in outcomes if o.error]
    if failed:
        texts.append("Failed runs:\n" + "\n".join(f"  {o.run.cfg.run_dir()}: {o.error}" for o in failed))
    return "\n\n".join(texts)


def warm_caches(planned: list[PlannedRun]) -> None:
    """Build each distinct pretrained backbone and feature cache once, before the runs.

    Runs then only read the caches, so their wall times are comparable, and parallel runs never
    race to write the same cache file.
    """
    from cl.engine.loop import prepare_inputs
    from cl.registry import STRATEGIES

    groups: dict[str, tuple[RunConfig, bool]] = {}
    for run in planned:
        cfg = run.cfg
        if cfg.backbone.weights.source != "pretrain" and not cfg.backbone.cache_features:
            continue
        key = config_hash({"benchmark": cfg.benchmark, "backbone": cfg.backbone, "seed": cfg.seed, "cache": str(cfg.resolved_cache_dir())})
        wants = STRATEGIES.get(cfg.strategy.name).input_kind == "features"
        old = groups.get(key)
        groups[key] = (cfg, wants or (old is not None and old[1]))
    for cfg, wants in groups.values():
        if is_finished_all(planned, cfg):
            continue
        t0 = time.perf_counter()
        try:
            _, backbone, info = prepare_inputs(cfg, want_features=wants)
        except UserError:
            continue  # the runs themselves will report it
        w = backbone.weights
        print(
            f"shared inputs for seed {cfg.seed}: backbone {backbone.name} ({w.get('source')}, {w.get('cache', '-')}), "
            f"features {info['feature_cache'] or '-'}, {time.perf_counter() - t0:.1f}s",
            flush=True,
        )


def is_finished_all(planned: list[PlannedRun], cfg: RunConfig) -> bool:
    """True if every run sharing this config's inputs is already finished."""
    from cl.engine.rundir import is_finished

    same = [r for r in planned if r.cfg.benchmark == cfg.benchmark and r.cfg.backbone == cfg.backbone and r.cfg.seed == cfg.seed]
    return all(is_finished(r.cfg.run_dir()) for r in same)


def run_suite(path: str | Path, cli_overrides: list[str] | None = None, out_dir: str | None = None, overwrite: bool = False) -> tuple[str, list[RunOutcome]]:
    suite, planned = plan_suite(path, cli_overrides, out_dir)
    warm_caches(planned)
    outcomes = []
    for i, run in enumerate(planned):
        print(f"[{i + 1}/{len(planned)}] {run.cfg.run_dir()}", flush=True)
        outcome = execute(run, overwrite)
        if outcome.error:
            print(f"  failed: {outcome.error}", flush=True)
        outcomes.append(outcome)
    root = Path(planned[0].cfg.out_dir)
    text = summarize_suite(suite, outcomes, root)
    (root / suite.suite).mkdir(parents=True, exist_ok=True)
    (root / suite.suite / "outcomes.json").write_text(
        json.dumps([{"run_dir": str(o.run.cfg.run_dir()), "ok": o.error is None, "error": o.error} for o in outcomes], indent=2)
    )
    return text, outcomes
