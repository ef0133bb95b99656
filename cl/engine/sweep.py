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
    parse_run_config,
)
from cl.engine.rundir import check_before_run, check_report_dir, name_run, override_label, planned_state
from cl.engine.smoke import smoke_config
from cl.errors import RunDirError, UserError
from cl.utils import write_json


# Files of the report that a sweep writes into <out_dir>/<suite>/, beside the run folders.
REPORT_NAMES = ("outcomes.json", "report.html", "summary.md", "summary.csv", "metrics_long.csv", "plots")


class SuiteEntry(Model):
    name: str
    overrides: dict[str, Any] = Field(default_factory=dict, description="nested overrides of the run config")

    @field_validator("name")
    @classmethod
    def _safe(cls, value: str) -> str:
        if value in REPORT_NAMES or value.startswith("report,"):
            raise ValueError(f"'{value}' is the name of a report file in the suite folder; choose another")
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


def plan_suite(
    path: str | Path, cli_overrides: list[str] | None = None, out_dir: str | None = None, smoke: bool = False,
    imports: list[str] | None = None,
) -> tuple[SuiteConfig, list[PlannedRun]]:
    """Expand and validate every run of a suite; raises ConfigError naming the entry at fault.

    ``--set`` overrides rename the runs they change (``er`` -> ``er,strategy.lr=0.5``), so their
    results never land in the directories of the suite as written; two runs that still map to one
    directory (``--set seed=7`` on a multi-seed suite, ``--set run_name=x``) are refused here.
    """
    path = Path(path).expanduser()
    raw = load_yaml(path, run_config=False)
    if isinstance(raw, dict) and "tune" in raw:
        raise ConfigError(f"{path} is a tuning file, not a suite: run it with `cl tune {path}`")
    if isinstance(raw, dict) and "suite" not in raw and set(raw) & set(RunConfig.model_fields):
        raise ConfigError(f"{path} is a run config, not a suite (no 'suite:' key): run it with `cl run {path}`")
    try:
        suite = SuiteConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{path}: {format_validation_error(err, SuiteConfig, data=raw)}") from None
    for kind, entries in (("benchmarks", suite.benchmarks), ("strategies", suite.strategies)):
        names = [e.name for e in entries]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"{path}: duplicate {kind} names: {', '.join(dupes)}")
    base = load_yaml(suite.config)  # made absolute against the suite file that wrote it
    if "suite" in base:
        raise ConfigError(f"{path}: config {suite.config} is a suite, not a run config")
    base = deep_merge(base, suite.overrides)
    if imports:  # cl sweep --import: every run imports the plugin (in its own process too)
        base["plugins"] = [*(base.get("plugins") or []), *imports]
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
                before = data
                data = name_run(apply_overrides(data, cli_overrides or []), cli_overrides or [], before)
                where = f"{path}: {'benchmark ' + bench.name + ', ' if bench else ''}strategy {strat.name}, seed {seed}"
                try:
                    cfg = parse_run_config(data)
                    if smoke:
                        data, cfg = smoke_config(data, cfg)
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
    """What each planned run would do: run, resume, restart, reuse, or refuse (and why)."""
    states: list[tuple[str, str | None]] = []
    for run in planned:
        try:
            check_before_run(run.cfg, resume=True, overwrite=overwrite)
        except RunDirError as err:
            states.append(("refuse", str(err)))
            continue
        if overwrite:
            states.append(("run (overwrite)", None))
            continue
        state, _ = planned_state(run.cfg)
        if state == "unfinished":
            state = "resume" if any((run.cfg.run_dir() / "ckpt").glob("*.pt")) else "restart"
        states.append(({"new": "run", "finished": "reuse"}.get(state, state), None))
    return states


def check_plan(planned: list[PlannedRun], overwrite: bool) -> None:
    """Refuse a sweep if any run would be refused (a directory holding another config, not ours,
    not writable, ...), before anything runs."""
    refused = [why for state, why in plan_states(planned, overwrite) if state == "refuse"]
    if refused:
        more = f" (and {len(refused) - 1} more run{'s' * (len(refused) > 2)})" if len(refused) > 1 else ""
        raise RunDirError(f"{refused[0]}{more}")


def execute(data: dict[str, Any], overwrite: bool = False, threads: int | None = None, lines: bool = False) -> dict[str, Any]:
    """Run (or resume, or reuse) one run from its raw config; failures are returned, not raised.

    This is what local worker processes and Ray tasks execute, so it takes and returns plain data.
    ``lines``: print per-epoch progress lines when output is not a terminal (SLURM task logs).
    """
    import torch

    from cl.engine import progress
    from cl.engine.loop import run as run_one

    if threads:
        torch.set_num_threads(threads)
    cfg = parse_run_config(data)
    outcome: dict[str, Any] = {"run_dir": str(cfg.run_dir()), "experiment": cfg.experiment, "run": cfg.name, "seed": cfg.seed}
    progress.PIPED_LINES, before = lines, progress.PIPED_LINES
    try:
        outcome.update(ok=True, error=None, metrics=run_one(cfg, resume=not overwrite, overwrite=overwrite))
    except UserError as err:
        outcome.update(ok=False, error=f"{type(err).__name__}: {err}", metrics=None)
    except Exception as err:  # noqa: BLE001 - one failed run must not lose the others
        tail = traceback.format_exc().strip().splitlines()[-1]
        outcome.update(ok=False, error=f"{type(err).__name__}: {err} [{tail}]", metrics=None)
    finally:
        progress.PIPED_LINES = before
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
        key = config_hash({"benchmark": cfg.benchmark, "backbone": cfg.backbone, "seed": cfg.seed, "cache": str(cfg.resolved_cache_dir()),
                          "precision": cfg.precision})
        wants = STRATEGIES.get(cfg.strategy.name).wants_features(cfg.strategy)
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


def check_ray_address(address: str | None, timeout: float = 5.0) -> None:
    """A ``host:port`` (or ``ray://host:port``) address must answer within ``timeout`` seconds:
    ``ray.init`` on an unreachable address can hang for minutes."""
    import socket

    if not address or address in ("auto", "local"):
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"--ray-address: expected 'auto', 'host:port' or 'ray://host:port', got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise UserError(f"--ray-address: cannot reach {address} ({err.strerror or type(err).__name__})") from None


def start_ray(address: str | None) -> bool:
    """Connect to (or start) Ray before any work; True if this call started it (and must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    check_ray_address(address)
    try:
        ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise UserError(f"Ray: cannot start or join {address or 'a local instance'} ({type(err).__name__}: {str(err)[:120]})") from None
    return True


def run_ray(planned: list[PlannedRun], overwrite: bool, address: str | None, cpus_per_run: int) -> list[dict[str, Any]]:
    """As Ray tasks: on an existing cluster (``address``, e.g. "auto" or "ray://host:10001") or a
    local instance. Every node must have this package installed and see ``out_dir`` and the cache."""
    import ray

    started = start_ray(address)
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


def report_dir(suite: SuiteConfig, planned: list[PlannedRun], cli_overrides: list[str] | None) -> Path:
    """``<out>/<suite>/``, or ``<out>/<suite>/report,<overrides>/`` when ``--set`` overrides change results
    (beside the suite's own report, not over it)."""
    root = Path(planned[0].cfg.out_dir) / suite.suite
    label = override_label(cli_overrides or [], {})
    return root if label is None else root / f"report,{label}"


def run_suite(
    path: str | Path,
    cli_overrides: list[str] | None = None,
    out_dir: str | None = None,
    overwrite: bool = False,
    jobs: int = 1,
    executor: str = "local",
    ray_address: str | None = None,
    smoke: bool = False,
    slurm: Any = None,
    imports: list[str] | None = None,
    formats: list[str] | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """Plan, warm shared caches, execute, then write the comparison report to ``<out>/<suite>/``
    (``<out>/<suite>/report,<overrides>/`` when ``--set`` overrides change results)."""
    from cl.analysis.report import RunRecord, run_config_or_none, write_report

    suite, planned = plan_suite(path, cli_overrides, out_dir, smoke, imports)
    check_plan(planned, overwrite)
    root = report_dir(suite, planned, cli_overrides)
    check_report_dir(root, planned[0].cfg.out_dir)
    if executor == "ray":
        check_ray_address(ray_address)  # fail in seconds, before the caches are warmed
    if executor == "slurm":
        from cl.engine.slurm import SlurmOptions, check_slurm, run_slurm

        check_slurm()
    warm_caches(planned)
    if executor == "ray":
        outcomes = run_ray(planned, overwrite, ray_address, max(1, (os.cpu_count() or 1) // max(jobs, 1)))
    elif executor == "slurm":
        outcomes = run_slurm(planned, execute, overwrite, root / ".submitit", slurm or SlurmOptions(), _report_progress)
    else:
        outcomes = run_local(planned, jobs, overwrite)
    label = override_label(cli_overrides or [], {})
    # absolute paths: `cl compare` may read this file from any working directory
    write_json(root / "outcomes.json", [{**{k: v for k, v in o.items() if k != "metrics"}, "run_dir": str(Path(o["run_dir"]).resolve())} for o in outcomes])
    records = [
        RunRecord(Path(o["run_dir"]), o["experiment"], o["run"], o["seed"], o["metrics"],
                  "finished" if o["ok"] else "failed", o["error"], config=run_config_or_none(Path(o["run_dir"])) if o["ok"] else None)
        for o in outcomes
    ]
    text = write_report(records, root, title=suite.suite if label is None else f"{suite.suite} with {label}", formats=formats or ())
    return text, outcomes
