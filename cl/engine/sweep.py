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
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from cl.config import (
    ConfigError, Model, RunConfig, Seed, apply_overrides, check_folder_name, config_hash, deep_merge, format_validation_error, load_yaml,
    parse_run_config, resolve_paths,
)
from cl.engine.rundir import name_run, override_label, planned_state
from cl.errors import RunDirError, UserError
from cl.utils import write_json


class SuiteEntry(Model):
    name: str
    overrides: dict[str, Any] = Field(default_factory=dict, description="nested overrides of the run config")

    @field_validator("name")
    @classmethod
    def _safe(cls, value: str) -> str:
        return check_folder_name(value)


class SuiteConfig(Model):
    suite: str
    config: str = Field(description="base run config, relative to the suite file")
    overrides: dict[str, Any] = Field(default_factory=dict)
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    benchmarks: list[SuiteEntry] = Field(default_factory=list)
    strategies: list[SuiteEntry] = Field(min_length=1)

    @field_validator("suite")
    @classmethod
    def _safe(cls, value: str) -> str:
        return check_folder_name(value)

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        dupes = sorted({s for s in seeds if seeds.count(s) > 1})
        if dupes:
            raise ValueError(f"seeds must be distinct (repeated: {', '.join(map(str, dupes))}); a repeated seed is the same run")
        return seeds


@dataclass
class PlannedRun:
    benchmark: str | None
    strategy: str
    seed: int
    data: dict[str, Any]  # the merged raw config: what is sent to workers (plain data pickles anywhere)
    cfg: RunConfig  # the same, validated, for the planning process


def plan_suite(path: str | Path, cli_overrides: list[str] | None = None, out_dir: str | None = None) -> tuple[SuiteConfig, list[PlannedRun]]:
    """Expand and validate every run of a suite; raises ConfigError naming the entry at fault.

    ``--set`` overrides rename the runs they change (``er`` -> ``er,strategy.lr=0.5``), so their
    results never land in the directories of the suite as written; two runs that still map to one
    directory (``--set seed=7`` on a multi-seed suite, ``--set run_name=x``) are refused here.
    """
    path = Path(path).expanduser()
    raw = load_yaml(path, run_config=False)
    try:
        suite = SuiteConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{path}: {format_validation_error(err, SuiteConfig, data=raw)}") from None
    for kind, entries in (("benchmarks", suite.benchmarks), ("strategies", suite.strategies)):
        names = [e.name for e in entries]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"{path}: duplicate {kind} names: {', '.join(dupes)}")
    here = path.resolve().parent

    def local(overrides: dict[str, Any]) -> dict[str, Any]:  # paths in the suite are relative to it
        return resolve_paths(overrides, here)

    base = deep_merge(load_yaml(here / suite.config), local(suite.overrides))
    benchmarks: list[SuiteEntry | None] = list(suite.benchmarks) or [None]
    planned = []
    for bench in benchmarks:
        for strat in suite.strategies:
            for seed in suite.seeds:
                data = copy.deepcopy(base)
                if bench is not None:
                    data = deep_merge(data, local(bench.overrides))
                data = deep_merge(data, local(strat.overrides))
                data.update(
                    experiment=suite.suite if bench is None else f"{suite.suite}/{bench.name}",
                    run_name=strat.name,
                    seed=seed,
                )
                if out_dir is not None:
                    data["out_dir"] = out_dir
                before = data
                data = name_run(apply_overrides(data, cli_overrides or []), cli_overrides or [], before)
                where = f"{path}: {'benchmark ' + bench.name + ', ' if bench else ''}strategy {strat.name}, seed {seed}"
                try:
                    cfg = parse_run_config(data)
                except ConfigError as err:
                    raise ConfigError(f"{where}: {err}") from None
                planned.append(PlannedRun(bench.name if bench else None, strat.name, seed, data, cfg))
    seen: dict[Path, PlannedRun] = {}
    for run in planned:
        key = run.cfg.run_dir().resolve()
        if key in seen:
            other = seen[key]
            raise ConfigError(
                f"{path}: strategy {other.strategy} seed {other.seed} and strategy {run.strategy} seed {run.seed} "
                f"would write the same run directory {run.cfg.run_dir()} (a --set of seed or run_name?)"
            )
        seen[key] = run
    return suite, planned


def plan_states(planned: list[PlannedRun], overwrite: bool) -> list[tuple[str, str | None]]:
    """What each planned run would do: run, resume, reuse, or conflict (a run of another config)."""
    states = []
    for run in planned:
        if overwrite:
            states.append(("run (overwrite)", None))
            continue
        state, diff = planned_state(run.cfg)
        if state == "unfinished":
            resumable = any((run.cfg.run_dir() / "ckpt").glob("*.pt"))
            state = "resume" if resumable else "restart"
        states.append(({"new": "run", "finished": "reuse"}.get(state, state), diff))
    return states


def check_plan(planned: list[PlannedRun], overwrite: bool) -> None:
    """Refuse a sweep whose run directories hold runs of other configs, before anything runs."""
    conflicts = [(run, diff) for run, (state, diff) in zip(planned, plan_states(planned, overwrite)) if state == "conflict"]
    if conflicts:
        run, diff = conflicts[0]
        more = f" (and {len(conflicts) - 1} more run{'s' * (len(conflicts) > 2)})" if len(conflicts) > 1 else ""
        raise RunDirError(f"{run.cfg.run_dir()} holds a run of another config ({diff}){more}; pass --overwrite to replace {'them' if more else 'it'}")


def execute(data: dict[str, Any], overwrite: bool = False, threads: int | None = None) -> dict[str, Any]:
    """Run (or resume, or reuse) one run from its raw config; failures are returned, not raised.

    This is what local worker processes and Ray tasks execute, so it takes and returns plain data.
    """
    import torch

    from cl.engine.loop import run as run_one

    if threads:
        torch.set_num_threads(threads)
    cfg = parse_run_config(data)
    outcome: dict[str, Any] = {"run_dir": str(cfg.run_dir()), "experiment": cfg.experiment, "run": cfg.name, "seed": cfg.seed}
    try:
        outcome.update(ok=True, error=None, metrics=run_one(cfg, resume=not overwrite, overwrite=overwrite))
    except UserError as err:
        outcome.update(ok=False, error=f"{type(err).__name__}: {err}", metrics=None)
    except Exception as err:  # noqa: BLE001 - one failed run must not lose the others
        tail = traceback.format_exc().strip().splitlines()[-1]
        outcome.update(ok=False, error=f"{type(err).__name__}: {err} [{tail}]", metrics=None)
    return outcome


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
        if all_finished(planned, cfg):
            continue
        t0 = time.perf_counter()
        try:
            inputs = prepare_inputs(cfg, want_features=wants)
        except Exception as err:  # noqa: BLE001 - each run prepares again and reports its own failure
            if not isinstance(err, UserError):
                print(f"shared inputs for seed {cfg.seed} failed ({type(err).__name__}: {err}); the runs will report it", flush=True)
            continue
        w = inputs.backbone.weights
        print(
            f"shared inputs for seed {cfg.seed}: backbone {inputs.backbone.name} ({w.get('source')}, {w.get('cache', '-')}), "
            f"features {inputs.setup['feature_cache'] or '-'}, {time.perf_counter() - t0:.1f}s",
            flush=True,
        )


def all_finished(planned: list[PlannedRun], cfg: RunConfig) -> bool:
    """True if every run sharing this config's inputs is already finished."""
    from cl.engine.rundir import is_finished

    same = [r for r in planned if r.cfg.benchmark == cfg.benchmark and r.cfg.backbone == cfg.backbone and r.cfg.seed == cfg.seed]
    return all(is_finished(r.cfg.run_dir()) for r in same)


def exit_with_parent(parent_pid: int) -> None:
    """Make a worker process die with the process that started it (even on SIGKILL of the parent).

    Linux's parent-death signal does it at once; a watchdog thread that sees the parent pid change
    covers other systems and the case where the parent died before this ran.
    """
    import signal
    import threading

    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(1.0)

    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _report_progress(i: int, total: int, outcome: dict[str, Any]) -> None:
    if outcome["ok"]:
        m = outcome["metrics"]
        print(f"[{i}/{total}] {outcome['run_dir']}: final_acc {m['final_acc']:.4f}", flush=True)
    else:
        print(f"[{i}/{total}] {outcome['run_dir']}: FAILED {outcome['error']}", flush=True)


def run_local(planned: list[PlannedRun], jobs: int, overwrite: bool) -> list[dict[str, Any]]:
    """In this process (jobs = 1) or a pool of ``jobs`` processes sharing the CPU cores."""
    if jobs <= 1:
        outcomes = []
        for i, run in enumerate(planned):
            outcomes.append(execute(run.data, overwrite))
            _report_progress(i + 1, len(planned), outcomes[-1])
        return outcomes
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // jobs)
    results: dict[int, dict[str, Any]] = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(execute, run.data, overwrite, threads): k for k, run in enumerate(planned)}
        for done, future in enumerate(as_completed(futures), 1):
            k = futures[future]
            try:
                results[k] = future.result()
            except Exception as err:  # noqa: BLE001 - a crashed worker process
                results[k] = {"run_dir": str(planned[k].cfg.run_dir()), "experiment": planned[k].cfg.experiment,
                              "run": planned[k].cfg.name, "seed": planned[k].seed, "ok": False, "error": f"worker crashed: {err}", "metrics": None}
            _report_progress(done, len(planned), results[k])
    return [results[k] for k in range(len(planned))]


def run_ray(planned: list[PlannedRun], overwrite: bool, address: str | None, cpus_per_run: int) -> list[dict[str, Any]]:
    """As Ray tasks: on an existing cluster (``address``, e.g. "auto" or "ray://host:10001") or a
    local instance. Every node must have this package installed and see ``out_dir`` and the cache."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        started = True
    try:
        task = ray.remote(num_cpus=cpus_per_run, max_retries=0)(execute)
        refs = {task.remote(run.data, overwrite, cpus_per_run): k for k, run in enumerate(planned)}
        results: dict[int, dict[str, Any]] = {}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            k = refs[done[0]]
            try:
                results[k] = ray.get(done[0])
            except Exception as err:  # noqa: BLE001 - worker died, node lost, ...
                results[k] = {"run_dir": str(planned[k].cfg.run_dir()), "experiment": planned[k].cfg.experiment,
                              "run": planned[k].cfg.name, "seed": planned[k].seed, "ok": False, "error": f"ray task failed: {type(err).__name__}", "metrics": None}
            _report_progress(len(results), len(planned), results[k])
    finally:
        if started:
            ray.shutdown()
    return [results[k] for k in range(len(planned))]


def run_suite(
    path: str | Path,
    cli_overrides: list[str] | None = None,
    out_dir: str | None = None,
    overwrite: bool = False,
    jobs: int = 1,
    executor: str = "local",
    ray_address: str | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """Plan, warm shared caches, execute, then write the comparison report to ``<out>/<suite>/``
    (``<out>/<suite>/report,<overrides>/`` when ``--set`` overrides change results)."""
    from analysis.report import RunRecord, write_report

    suite, planned = plan_suite(path, cli_overrides, out_dir)
    check_plan(planned, overwrite)
    warm_caches(planned)
    if executor == "ray":
        outcomes = run_ray(planned, overwrite, ray_address, max(1, (os.cpu_count() or 1) // max(jobs, 1)))
    else:
        outcomes = run_local(planned, jobs, overwrite)
    root = Path(planned[0].cfg.out_dir) / suite.suite
    label = override_label(cli_overrides or [], {})
    if label is not None:  # a sweep with --set overrides reports beside the suite's own report, not over it
        root = root / f"report,{label}"
    write_json(root / "outcomes.json", [{k: v for k, v in o.items() if k != "metrics"} for o in outcomes])
    records = [
        RunRecord(Path(o["run_dir"]), o["experiment"], o["run"], o["seed"], o["metrics"],
                  "finished" if o["ok"] else "failed", o["error"])
        for o in outcomes
    ]
    text = write_report(records, root, title=suite.suite if label is None else f"{suite.suite} with {label}")
    return text, outcomes
