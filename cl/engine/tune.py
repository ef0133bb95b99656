"""Hyper-parameter search that never sees the test set: ``cl tune TUNE.yaml``.

A tuning file names a run config (or a suite and some of its strategy entries), a search space
over dotted config keys, a protocol and a budget::

    tune: er_lr                        # study name: <out_dir>/tune/<name>/
    config: ../fmnist/b4inc2.yaml      # or  suite: ../cil_fmnist.yaml  + strategies: {entry: space}
    overrides: {train: {epochs: 2}}    # applied to every trial
    validation: {fraction: 0.1}        # when the config has no benchmark.validation
    protocol: {first_k: 2}             # tune on the first k experiences only (null: the whole stream)
    objective: avg_incremental_acc     # on validation: final_acc, avg_incremental_acc, avg_anytime_acc, ...
    seeds: [0]
    trials: 20
    space:
      strategy.lr: {log_uniform: [1.0e-4, 0.1]}
      strategy.rebalance: {choices: [none, old_tasks, class_ratio]}
      strategy.memory_size: {integer: [100, 500], step: 100}

Every trial runs the real loop in memory on the validation splits (carved from training data) with
every test split sealed: reading test data anywhere fails the trial. Trials share the prepared data,
backbone and feature cache, so on a frozen backbone a trial costs seconds. The search is Optuna's
TPE sampler with median pruning on the per-experience validation accuracy, stored in a SQLite study
that an interrupted search resumes. It writes ``best.yaml`` (or ``suite.yaml``) that ``cl run`` /
``cl sweep`` take unchanged, ``trials.csv``/``trials.md``, ``trials.png`` and ``tune.json``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from cl.config import (
    PLACEMENT_KEYS, Model, RunConfig, Seed, ValidationConfig, _absolute, apply_overrides, check_folder_name, config_hash, deep_merge,
    flatten, format_validation_error, load_yaml, nest, parse_run_config,
)
from cl.errors import ConfigError, TrainingDiverged, UserError
from cl.utils import atomic_write_text, environment_info, write_json
from cl.yamlio import yaml_text


class Param(Model):
    """One dimension of the search space: exactly one of the kinds."""

    choices: list[Any] | None = Field(None, min_length=1, description="categorical values")
    uniform: list[float] | None = Field(None, min_length=2, max_length=2, description="[low, high]")
    log_uniform: list[float] | None = Field(None, min_length=2, max_length=2, description="[low, high], sampled on a log scale")
    integer: list[int] | None = Field(None, min_length=2, max_length=2, description="[low, high], inclusive")
    step: int | None = Field(None, ge=1, description="for integer: grid step")

    @model_validator(mode="after")
    def _one_kind(self) -> Param:
        kinds = [k for k in ("choices", "uniform", "log_uniform", "integer") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of choices, uniform, log_uniform, integer")
        low_high = getattr(self, kinds[0]) if kinds[0] != "choices" else None
        if low_high is not None and not low_high[0] < low_high[1]:
            raise ValueError(f"{kinds[0]}: need low < high, got {list(low_high)}")
        if self.log_uniform is not None and self.log_uniform[0] <= 0:
            raise ValueError("log_uniform: bounds must be positive")
        if self.step is not None and self.integer is None:
            raise ValueError("'step' is only used with integer")
        if self.integer is not None and self.step is not None and (self.integer[1] - self.integer[0]) % self.step:
            raise ValueError(f"integer: the range {list(self.integer)} is not a whole number of steps of {self.step}")
        return self

    def suggest(self, trial: Any, name: str) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(name, self.choices)
        if self.uniform is not None:
            return trial.suggest_float(name, *self.uniform)
        if self.log_uniform is not None:
            return trial.suggest_float(name, *self.log_uniform, log=True)
        assert self.integer is not None
        return trial.suggest_int(name, *self.integer, step=self.step or 1)


Space = dict[str, Param]


# Validation scalars a search can optimise, and the direction each is better in.
OBJECTIVES = {"avg_incremental_acc": "maximize", "final_acc": "maximize", "final_avg_acc": "maximize", "avg_anytime_acc": "maximize",
              "forgetting": "minimize", "bwt": "maximize"}


class ProtocolConfig(Model):
    first_k: int | None = Field(None, ge=1, description="tune on the first k experiences only; null: the whole stream")


class TuneConfig(Model):
    tune: str = Field(description="study name: <out_dir>/tune/<name>/")
    config: str | None = Field(None, description="base run config (relative to this file)")
    suite: str | None = Field(None, description="or a suite whose strategy entries are tuned (relative to this file)")
    benchmark: str | None = Field(None, description="suite mode: the suite's benchmark entry to tune on (default: the first)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="nested overrides applied to every trial")
    validation: ValidationConfig | None = Field(None, description="used when the config has no benchmark.validation")
    protocol: ProtocolConfig = Field(default_factory=ProtocolConfig)
    objective: Literal[tuple(OBJECTIVES)] = Field("avg_incremental_acc", description="validation metric to optimise")  # type: ignore[valid-type]
    direction: Literal["maximize", "minimize"] | None = Field(None, description="default: the metric's better direction")
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    trials: int = Field(20, ge=1, description="trials per study (finished or pruned), counted across resumes")
    sampler_seed: Seed = 0
    pruner: Literal["median", "none"] = "median"
    space: Space = Field(default_factory=dict, description="config mode: dotted key -> parameter")
    strategies: dict[str, Space] = Field(default_factory=dict, description="suite mode: entry name -> space")

    @field_validator("tune")
    @classmethod
    def _safe(cls, value: str) -> str:
        return check_folder_name(value)

    @model_validator(mode="after")
    def _mode(self) -> TuneConfig:
        if (self.config is None) == (self.suite is None):
            raise ValueError("give exactly one of 'config' and 'suite'")
        if self.config is not None and (not self.space or self.strategies):
            raise ValueError("with 'config', give the search 'space' (and no 'strategies')")
        if self.suite is not None and (not self.strategies or self.space):
            raise ValueError("with 'suite', give 'strategies': {entry: space} (and no 'space')")
        if self.suite is None and self.benchmark is not None:
            raise ValueError("'benchmark' names an entry of a suite; it is only used with 'suite'")
        if self.direction is None:
            object.__setattr__(self, "direction", OBJECTIVES[self.objective])
        return self


@dataclass
class Study:
    """One search: a base raw config and its space (a suite mode tune has one study per entry)."""

    name: str  # entry name in suite mode, else the tune name
    base: dict[str, Any]  # raw run config every trial starts from
    space: Space


def load_tune(path: str | Path, cli_overrides: list[str] | None = None, out_dir: str | None = None) -> tuple[TuneConfig, list[Study], Path]:
    """Parse a tuning file into its studies; every trial config is validated before any trial runs."""
    from cl.engine.sweep import plan_suite

    path = Path(path).expanduser()
    raw = load_yaml(path, run_config=False)
    for key in ("config", "suite"):
        if isinstance(raw.get(key), str):
            raw[key] = _absolute(raw[key], path.resolve().parent)
    try:
        tcfg = TuneConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{path}: {format_validation_error(err, TuneConfig, data=raw)}") from None
    studies: list[Study] = []
    if tcfg.config is not None:
        studies.append(Study(tcfg.tune, load_yaml(tcfg.config), tcfg.space))
    else:
        _, planned = plan_suite(tcfg.suite, out_dir=out_dir)  # type: ignore[arg-type]
        bench = tcfg.benchmark or planned[0].benchmark
        benches = list(dict.fromkeys(p.benchmark for p in planned))
        if bench not in benches:
            raise ConfigError(f"{path}: benchmark: '{bench}' is not a benchmark of the suite (benchmarks: {', '.join(map(str, benches))})")
        for entry, space in tcfg.strategies.items():
            match = [p for p in planned if p.strategy == entry and p.benchmark == bench]
            if not match:
                names = sorted({p.strategy for p in planned})
                raise ConfigError(f"{path}: strategies.{entry}: no such entry in the suite (entries: {', '.join(names)})")
            data = {k: v for k, v in match[0].data.items() if k not in PLACEMENT_KEYS}
            studies.append(Study(entry, data, space))
    for study in studies:
        base = deep_merge(study.base, tcfg.overrides)
        base = apply_overrides(base, cli_overrides or [])
        if out_dir is not None:
            base["out_dir"] = out_dir
        bench = base.setdefault("benchmark", {})
        if isinstance(bench, dict) and bench.get("validation") is None:
            if tcfg.validation is None:
                raise ConfigError(f"{path}: study {study.name}: the config has no benchmark.validation; give 'validation' in the tuning file")
            bench["validation"] = tcfg.validation.model_dump(mode="json")
        study.base = base
        try:  # the config every trial starts from (a fault here is the file's or a --set's, not a dimension's)
            cfg = parse_run_config(copy.deepcopy(base))
        except ConfigError as err:
            raise ConfigError(f"{path}: study {study.name}: {err}") from None
        if tcfg.objective == "avg_anytime_acc" and cfg.benchmark.scenario != "online":
            raise ConfigError(f"{path}: objective 'avg_anytime_acc' is measured on online streams only (study {study.name} is {cfg.benchmark.scenario})")
        for key, param in study.space.items():  # every dimension must name a valid key with valid values
            probe = param.choices if param.choices is not None else list(param.uniform or param.log_uniform or param.integer or ())
            for value in probe:
                try:
                    _trial_config(base, {key: value}, tcfg.seeds[0])  # exactly as a trial will build it
                except ConfigError as err:
                    raise ConfigError(f"{path}: study {study.name}: {key}={value!r}: {err}") from None
    return tcfg, studies, path


def study_dir(tcfg: TuneConfig, studies: list[Study]) -> Path:
    return Path(parse_run_config(studies[0].base).out_dir) / "tune" / tcfg.tune


def _trial_config(base: dict[str, Any], params: dict[str, Any], seed: int) -> RunConfig:
    data = copy.deepcopy(base)
    for key, value in params.items():
        data = deep_merge(data, nest(key.split("."), value))
    data["seed"] = seed
    return parse_run_config(data)


class _Inputs:
    """Prepared data, backbone and features, shared by the trials that agree on them."""

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}

    def get(self, cfg: RunConfig) -> Any:
        from cl.engine.loop import prepare_inputs
        from cl.registry import STRATEGIES

        wants = STRATEGIES.get(cfg.strategy.name).wants_features(cfg.strategy)
        key = config_hash({"benchmark": cfg.benchmark, "backbone": cfg.backbone, "seed": cfg.seed, "device": cfg.device,
                           "threads": cfg.num_threads, "features": wants, "precision": cfg.precision})
        if key not in self._cache:
            if len(self._cache) >= 4:  # bounded: a space over benchmark or backbone keys
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = prepare_inputs(cfg, want_features=wants)
        return self._cache[key]


def run_trial(base: dict[str, Any], params: dict[str, Any], seeds: list[int], first_k: int | None, objective: str,
              inputs: _Inputs, report: Any = None) -> tuple[float, list[float]]:
    """Mean of the validation ``objective`` over seeds, and the per-seed values, for one parameter set."""
    from cl.engine.loop import TrialLoop, prepare_trial

    values = []
    for s, seed in enumerate(seeds):
        cfg = _trial_config(base, params, seed)
        prep = prepare_trial(inputs.get(cfg), cfg, first_k)
        n = len(prep.bench.experiences)
        step_report = None if report is None else (lambda i, acc, s=s, n=n: report(s * n + i, acc))
        metrics = TrialLoop(prep, step_report).run(None)
        value = metrics.get(objective)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            raise ConfigError(f"objective '{objective}' is not a number in the trial's validation metrics (got {value!r})")
        values.append(float(value))
    return sum(values) / len(values), values


def definition(st: Study, tcfg: TuneConfig) -> str:
    """Hash of everything a study's trials depend on: resuming is only allowed when it is unchanged."""
    space = {k: p.model_dump(mode="json") for k, p in st.space.items()}
    return config_hash({"base": st.base, "space": space, "objective": tcfg.objective, "direction": tcfg.direction,
                        "protocol": tcfg.protocol.model_dump(mode="json"), "seeds": tcfg.seeds})


def tune(path: str | Path, cli_overrides: list[str] | None = None, out_dir: str | None = None, trials: int | None = None,
         progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) the studies of a tuning file; write the best config and the trial reports.

    A study resumes only if its definition (base config, space, objective, protocol, seeds) is the
    one it was started with; ``overwrite`` starts the whole search again. Everything the config and
    the data can show to be wrong is refused before anything is written; a point of the space that
    cannot run on the data (a memory larger than the stream, ...) fails its trial and the search
    goes on.
    """
    import optuna

    from cl.engine.rundir import RunLock, check_report_dir

    tcfg, studies, path = load_tune(path, cli_overrides, out_dir)
    budget = trials or tcfg.trials
    out = study_dir(tcfg, studies)
    check_report_dir(out, parse_run_config(studies[0].base).out_dir)
    db = out / "study.db"
    _check_study_file(db, overwrite)
    inputs = _Inputs()
    _check_on_data(studies, tcfg, inputs)
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    summary: dict[str, Any] = {"tune": tcfg.tune, "file": str(path), "objective": f"validation {tcfg.objective}",
                               "direction": tcfg.direction, "protocol": tcfg.protocol.model_dump(mode="json"), "seeds": tcfg.seeds,
                               "overrides": tcfg.overrides, "cli_overrides": list(cli_overrides or []),
                               "budget": budget, "test_data": "sealed: never read by any trial", "studies": {}}
    started = time.perf_counter()
    try:
        if overwrite:
            _clear(out, [st.name for st in studies])
        _check_study_file(db, overwrite=False)
        storage = f"sqlite:///{db}"
        try:
            existing = optuna.get_all_study_names(storage)
        except Exception as err:  # sqlalchemy / sqlite: a damaged or foreign file
            raise UserError(f"{db} is not a readable study database ({type(err).__name__}); pass --overwrite to start the search again") from None
        stale = sorted(set(existing) - {st.name for st in studies})
        if stale:
            print(f"warning: {db} also holds studies not in this file ({', '.join(stale)}); they are not reported "
                  f"(--overwrite starts the search again without them)", file=sys.stderr)
        for st in studies:  # every changed study is refused before any trial runs
            if st.name in existing:
                stored = optuna.load_study(study_name=st.name, storage=storage).user_attrs.get("definition")
                if stored is not None and stored != definition(st, tcfg):
                    raise UserError(f"{db}: study {st.name} was started with another config, space, objective, protocol "
                                    f"or seeds; pass --overwrite to start the search again")
        failures: dict[str, str] = {}
        for st in studies:
            # no pruning on the first experience alone: it shows how well a method learns, not how it forgets
            pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1) if tcfg.pruner == "median" else optuna.pruners.NopPruner()
            study = optuna.create_study(storage=storage, study_name=st.name, direction=tcfg.direction, pruner=pruner, load_if_exists=True)
            # seeded by the trials so far: a resumed search draws new points instead of replaying the first ones
            study.sampler = optuna.samplers.TPESampler(seed=tcfg.sampler_seed + len(study.trials), n_startup_trials=min(10, max(budget // 3, 1)))
            if study.user_attrs.get("definition") is None:
                study.set_user_attr("definition", definition(st, tcfg))
            t0 = time.perf_counter()
            for number in range(len(_counted(study)), budget):
                trial = study.ask()
                params = {key: param.suggest(trial, key) for key, param in st.space.items()}

                def report(step: int, value: float, trial: Any = trial) -> None:
                    trial.report(value, step)
                    if trial.should_prune():
                        raise optuna.TrialPruned()

                t1 = time.perf_counter()
                try:
                    value, per_seed = run_trial(st.base, params, tcfg.seeds, tcfg.protocol.first_k, tcfg.objective, inputs, report)
                except optuna.TrialPruned:
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    _say(progress, f"[{st.name} {number + 1}/{budget}] pruned {params}")
                    continue
                except (UserError, TrainingDiverged) as err:  # this point cannot run on this data (or diverges); the others may
                    text = f"training diverged: {str(err).split(';')[0]}" if isinstance(err, TrainingDiverged) else str(err)
                    trial.set_user_attr("error", text[:500])
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    _say(progress, f"[{st.name} {number + 1}/{budget}] failed {params}: {text}")
                    continue
                except BaseException:  # interrupted: not a result, and not counted against the budget
                    with contextlib.suppress(Exception):
                        study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    raise
                trial.set_user_attr("per_seed", per_seed)
                trial.set_user_attr("seconds", round(time.perf_counter() - t1, 3))
                study.tell(trial, value)
                _say(progress, f"[{st.name} {number + 1}/{budget}] {tcfg.objective}={value:.4f} {params}")
            try:
                summary["studies"][st.name] = _write_study(out, st, study, tcfg, time.perf_counter() - t0)
            except NoBestValue as err:  # the other studies still run and report
                failures[st.name] = str(err)
        summary["wall_time_s"] = round(time.perf_counter() - started, 3)
        summary["failed_studies"] = failures
        if failures:  # a best config missing a study's values would be a different suite: none is written
            for name in ("best.yaml", "suite.yaml"):
                (out / name).unlink(missing_ok=True)
        else:
            _write_best_config(out, tcfg, studies, summary, cli_overrides or [])
        write_json(out / "tune.json", {**summary, "environment": environment_info(_device(studies))})
    finally:
        lock.release()
    if failures:
        first = next(iter(failures.values()))
        raise UserError(f"{first}{f' (and {len(failures) - 1} more studies)' if len(failures) > 1 else ''}; the other studies' "
                        f"results are in {out}, no best config was written")
    return summary


class NoBestValue(UserError):
    """A study whose trials all failed or were pruned."""


def _counted(study: Any) -> list[Any]:
    """Trials that used up budget: finished, pruned, or failed on their own point (not interrupted)."""
    import optuna

    S = optuna.trial.TrialState
    return [t for t in study.trials if t.state in (S.COMPLETE, S.PRUNED) or (t.state == S.FAIL and "error" in t.user_attrs)]


SQLITE_HEADER = b"SQLite format 3\x00"
OUTPUTS = ("study.db", "study.db-journal", "study.db-wal", "study.db-shm", "tune.json", "best.yaml", "suite.yaml")


def _check_study_file(db: Path, overwrite: bool) -> None:
    """``study.db`` must be a regular file (never a link out of the folder) holding an Optuna study
    database; ``overwrite`` replaces a damaged one."""
    import sqlite3

    if db.is_symlink():
        raise UserError(f"{db} is a symlink; refusing to use it as the study database")
    if not db.exists():
        return
    if not db.is_file():
        raise UserError(f"{db} is not a regular file; remove it to start the search")
    if overwrite or db.stat().st_size == 0:
        return
    with open(db, "rb") as fh:
        ok = fh.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    if ok:
        try:
            with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as con:
                ok = con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='studies'").fetchone() is not None
        except sqlite3.Error:
            ok = False
    if not ok:
        raise UserError(f"{db} is not a study database of cl tune; pass --overwrite to start the search again")


def _clear(out: Path, names: list[str]) -> None:
    """``--overwrite``: remove the previous search (its database, the tables and plots of its studies
    and of ``names``, its best config) and nothing else."""
    import optuna

    try:  # the studies the old database holds, when it can be read
        names = names + optuna.get_all_study_names(f"sqlite:///{out / 'study.db'}") if (out / "study.db").is_file() else names
    except Exception:  # noqa: BLE001 - a damaged database is removed all the same
        pass
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)
    for prefix in [""] + [f"{n}_" for n in names]:
        for ext in ("csv", "md", "png"):
            path = out / f"{prefix}trials.{ext}"
            if path.is_file() or path.is_symlink():
                path.unlink()


def _check_on_data(studies: list[Study], tcfg: TuneConfig, inputs: _Inputs) -> None:
    """What only the data can show (validation split too large, first_k beyond the stream, a memory
    larger than the stream for the base config), refused before anything is written."""
    from cl.engine.loop import prepare_trial

    for st in studies:
        cfg = _trial_config(st.base, {}, tcfg.seeds[0])
        prepared = inputs.get(cfg)
        n = len(prepared.bench.experiences)
        if tcfg.protocol.first_k is not None and tcfg.protocol.first_k > n:
            raise ConfigError(f"protocol.first_k is {tcfg.protocol.first_k} but study {st.name}'s stream has {n} experiences")
        if tcfg.objective in ("forgetting", "bwt") and min(n, tcfg.protocol.first_k or n) < 2:
            raise ConfigError(f"objective '{tcfg.objective}' needs at least 2 experiences; the search sees 1 (protocol.first_k)")
        try:
            prepare_trial(prepared, cfg, tcfg.protocol.first_k)
        except UserError as err:
            raise ConfigError(f"study {st.name}: {err}") from None


def _device(studies: list[Study]) -> Any:
    from cl.utils import resolve_device

    return resolve_device(parse_run_config(studies[0].base).device)


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, flush=True)


def _write_study(out: Path, st: Study, study: Any, tcfg: TuneConfig, seconds: float) -> dict[str, Any]:
    """trials table (CSV and Markdown) and plot of one study; returns its summary."""
    import csv
    import io

    import optuna

    from cl.analysis.plots import tuning_trials

    trials = _counted(study)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    if not complete:
        first = f"; first failure: {failed[0].user_attrs['error']}" if failed else ""
        raise NoBestValue(f"study {st.name}: no trial completed, so there is no best value ({len(failed)} failed, "
                        f"{len(trials) - len(failed)} pruned{first})")
    keys = list(st.space)
    prefix = f"{st.name}_" if tcfg.suite is not None else ""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["trial", "state", *keys, f"val_{tcfg.objective}", "per_seed", "seconds"])
    rows = []
    for t in trials:
        row = [t.number, t.state.name.lower(), *[t.params.get(k) for k in keys], t.value, t.user_attrs.get("per_seed"), t.user_attrs.get("seconds")]
        writer.writerow(row)
        rows.append(row)
    atomic_write_text(out / f"{prefix}trials.csv", buf.getvalue())
    best = study.best_trial
    lines = [f"# {st.name}: validation {tcfg.objective} ({tcfg.direction}), {len(trials)} trials\n",
             "| trial | state | " + " | ".join(keys) + f" | val {tcfg.objective} |", "|" + "---|" * (len(keys) + 3)]
    for t in sorted(complete, key=lambda t: t.value, reverse=tcfg.direction == "maximize"):
        mark = " **best**" if t.number == best.number else ""
        lines.append(f"| {t.number}{mark} | complete | " + " | ".join(_fmt(t.params.get(k)) for k in keys) + f" | {t.value:.4f} |")
    for t in failed:
        lines.append(f"| {t.number} | failed: {t.user_attrs['error'][:120]} | " + " | ".join(_fmt(t.params.get(k)) for k in keys) + " | - |")
    atomic_write_text(out / f"{prefix}trials.md", "\n".join(lines) + "\n")
    tuning_trials([(r[0], r[-3], r[1]) for r in rows], {k: [(t.params.get(k), t.value) for t in complete] for k in keys},
                  out / f"{prefix}trials.png", f"{st.name}: validation {tcfg.objective}", tcfg.direction == "maximize")
    return {"best_params": best.params, "best_value": best.value, "best_per_seed": best.user_attrs.get("per_seed"),
            "trials": len(trials), "complete": len(complete),
            "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials), "wall_time_s": round(seconds, 3)}


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _relative(target: str, out: Path) -> str:
    """``target`` relative to the folder a file in ``out`` is loaded from (links resolved, as the loader does)."""
    return os.path.relpath(Path(target).resolve(), out.resolve())


def _write_best_config(out: Path, tcfg: TuneConfig, studies: list[Study], summary: dict[str, Any], cli_overrides: list[str]) -> None:
    """``best.yaml`` (a run config inheriting the tuned one) or ``suite.yaml`` (the suite with its
    tuned entries' overrides updated), both taken by ``cl run`` / ``cl sweep`` unchanged.

    The tuning file's ``overrides`` and the ``--set`` values ran in every trial, so the tuned config
    (suite mode: the tuned entries) carries them: selected values hold for the config they were
    selected on. Not carried: run placement (experiment, run_name, seed) and the validation split,
    since final runs train on all the training data."""
    counts = sorted({st["trials"] for st in summary["studies"].values()})
    header = (f"# Selected by `cl tune` on validation {tcfg.objective} ({tcfg.direction}); protocol {tcfg.protocol.model_dump(mode='json')}, "
              f"seeds {tcfg.seeds}, {'-'.join(map(str, counts[::max(len(counts) - 1, 1)]))} trials per study; the test set was never read.\n")
    extra = apply_overrides(copy.deepcopy(tcfg.overrides), cli_overrides)  # paths made absolute: this file lives elsewhere
    for key in PLACEMENT_KEYS:  # from the file's overrides or a --set: the tuned config names its own run
        extra.pop(key, None)
    if isinstance(extra.get("benchmark"), dict):
        extra["benchmark"].pop("validation", None)
    no_validation = {"benchmark": {"validation": None}}
    if tcfg.config is not None:
        best = summary["studies"][studies[0].name]["best_params"]
        base_cfg = parse_run_config(studies[0].base)
        # its own run folder: the tuned config never lands in the directory of the config it came from
        data: dict[str, Any] = {"base": _relative(tcfg.config, out), "run_name": f"{base_cfg.name},tuned={tcfg.tune}"[:120]}
        data = deep_merge(deep_merge(data, extra), no_validation)
        for key, value in best.items():
            data = deep_merge(data, nest(key.split("."), value))
        atomic_write_text(out / "best.yaml", header + yaml_text(data))
        return
    suite = load_yaml(tcfg.suite, run_config=False)  # type: ignore[arg-type]
    suite["config"] = _relative(suite["config"], out)
    # its own report and run folders: the tuned suite never lands in the directories of the suite as written
    suite["suite"] = f"{suite['suite']},tuned={tcfg.tune}"[:120]
    suite["overrides"] = deep_merge(suite.get("overrides") or {}, no_validation)
    untouched = []
    for entry in suite["strategies"]:
        best = summary["studies"].get(entry.get("name"), {}).get("best_params")
        if best is None:
            untouched.append(str(entry.get("name")))
            continue
        overrides = deep_merge(entry.get("overrides") or {}, extra)  # after the entry's own, as in the trials
        for key, value in best.items():
            overrides = deep_merge(overrides, nest(key.split("."), value))
        entry["overrides"] = overrides
    if extra and untouched:
        print(f"warning: suite.yaml carries the tuning overrides ({', '.join(flatten(extra))}) into the tuned entries only; "
              f"{', '.join(untouched)} run as the suite says", file=sys.stderr)
    atomic_write_text(out / "suite.yaml", header + yaml_text(suite))
