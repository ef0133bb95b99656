"""Optional experiment loggers: TensorBoard, Weights & Biases, MLflow, mirroring the run's event log.

``log.jsonl`` stays the record; a logger is a view of it in a tool people already use. Every event
the loop writes goes through :class:`MirroredLog`, which turns it into scalars once (:func:`scalars_of`)
and hands them to each enabled backend through the same three calls (:class:`Backend`). Each backend
writes with its library's own writer, inside the configured directories only:

* TensorBoard: ``RUN_DIR/tensorboard/`` (``SummaryWriter``);
* W&B: ``OUT_DIR/.wandb/wandb/offline-run-*-ID/`` in offline mode by default (``wandb sync`` on that folder
  uploads later; ``RUN_DIR/wandb_run_id`` names ID); its config, cache and data directories default to
  ``OUT_DIR/.wandb/`` too, not the home directory;
* MLflow: ``sqlite:///OUT_DIR/mlflow.db`` by default, one database for every run under ``--out``
  (``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``).

A backend that fails (a locked database, a full disk) is closed with one warning and the run goes
on: its numbers are in ``metrics.json`` either way.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Protocol

from cl.config import RunConfig, config_to_dict, flatten

# Scalars of each event; the step is what the scalar is plotted against.
#   epoch:   train/<loss term> against the epoch counted over the whole run (experience * epochs + epoch)
#   eval:    eval/acc_seen_classes (and val/...) against the number of experiences learned
#   anytime: anytime/acc against samples seen (online)


def scalars_of(event: str, fields: dict[str, Any], epochs: int) -> tuple[dict[str, float], int] | None:
    """(scalars, step) that an event of ``log.jsonl`` contributes, or None."""

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if event == "epoch":
        skip = {"experience", "epoch", "steps"}
        values = {f"train/{k}": float(v) for k, v in fields.items() if k not in skip and number(v)}
        return (values, int(fields["experience"]) * epochs + int(fields["epoch"])) if values else None
    if event == "eval":
        values = {f"eval/{k}": float(fields[k]) for k in ("acc_seen_classes", "val_acc_seen_classes") if number(fields.get(k))}
        return values, int(fields["experience"]) + 1
    if event == "anytime":
        return {"anytime/acc": float(fields["acc"])}, int(fields["samples"])
    return None


class Backend(Protocol):
    name: str

    def scalars(self, values: dict[str, float], step: int) -> None: ...

    def summary(self, values: dict[str, Any]) -> None: ...

    def close(self, state: str) -> None: ...  # finished | stopped (resumable) | failed


class TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: Path, params: dict[str, Any], resume: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if not resume:
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()), 0)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def summary(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"final/{key}", value, 0)

    def close(self, state: str) -> None:
        self.writer.close()


class WandB:
    name = "wandb"

    def __init__(self, cfg: RunConfig, run_dir: Path, params: dict[str, Any], run_id: str) -> None:
        # OUT_DIR/.wandb/, not the run directory: W&B links its files with symlinks, which a run
        # directory refuses (it is never written through a link)
        home = Path(cfg.out_dir).absolute() / ".wandb"
        home.mkdir(parents=True, exist_ok=True)
        self.set_env = []  # not ~/.config/wandb, ~/.cache/wandb, unless the user chose
        for var, sub in (("WANDB_CONFIG_DIR", ".config"), ("WANDB_CACHE_DIR", ".cache"), ("WANDB_DATA_DIR", ".data")):
            if var not in os.environ:
                os.environ[var] = str(home / sub)
                self.set_env.append(var)
        import wandb

        opts = cfg.loggers.wandb
        assert opts is not None
        (run_dir / "wandb_run_id").write_text(run_id + "\n")
        self.run = wandb.init(
            project=opts.project, entity=opts.entity, mode=opts.mode, dir=str(home), id=run_id, resume="allow",
            name=f"{cfg.experiment}/{cfg.name}/seed{cfg.seed}", group=f"{cfg.experiment}/{cfg.name}", config=params,
            settings=wandb.Settings(console="off", silent=True, disable_git=True, save_code=False, x_disable_stats=True),
        )

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "step": step})  # W&B's own step counts calls; ours is a field, plot against it

    def summary(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def close(self, state: str) -> None:
        self.run.finish(exit_code=1 if state == "failed" else 0)
        for var in self.set_env:
            os.environ.pop(var, None)


class MLflow:
    name = "mlflow"

    def __init__(self, cfg: RunConfig, run_dir: Path, params: dict[str, Any], resume: bool) -> None:
        import logging

        _no_mlflow_telemetry()
        from mlflow.tracking import MlflowClient

        for name in ("mlflow.store.db.utils", "alembic"):  # "Creating initial MLflow database tables..." at INFO
            logging.getLogger(name).setLevel(logging.WARNING)
        opts = cfg.loggers.mlflow
        assert opts is not None
        out = Path(cfg.out_dir).absolute()
        uri = opts.tracking_uri or f"sqlite:///{out / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        name = opts.experiment or cfg.experiment
        found = self.client.get_experiment_by_name(name)
        experiment_id = found.experiment_id if found else self.client.create_experiment(name, artifact_location=str(out / "mlflow-artifacts"))
        id_file = run_dir / "mlflow_run_id"
        previous = id_file.read_text().strip() if resume and id_file.is_file() else None
        if previous:
            self.run_id = previous
            self.client.update_run(previous, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=f"{cfg.name}/seed{cfg.seed}",
                                                 tags={"run_dir": str(run_dir.absolute())}).info.run_id
            id_file.write_text(self.run_id + "\n")
            for key, value in params.items():
                self.client.log_param(self.run_id, key[:250], str(value)[:6000])

    def scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.client.log_metric(self.run_id, key, value, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.client.log_metric(self.run_id, f"final/{key}", float(value))

    def close(self, state: str) -> None:
        self.client.set_terminated(self.run_id, status={"finished": "FINISHED", "stopped": "KILLED"}.get(state, "FAILED"))


SUMMARY_KEYS = ("final_acc", "avg_incremental_acc", "forgetting", "bwt", "fwt", "final_old_acc", "final_new_acc", "wall_time_s")


class MirroredLog:
    """The run's JSON-lines log, with every event mirrored to the enabled backends."""

    def __init__(self, log: Any, backends: list[Backend], epochs: int) -> None:
        self.log, self.backends, self.epochs = log, backends, epochs

    # what the loop reads of its log
    @property
    def offset(self) -> int:
        return self.log.offset

    @property
    def lost_bytes(self) -> int:
        return self.log.lost_bytes

    @property
    def dropped_lines(self) -> int:
        return self.log.dropped_lines

    def _each(self, call: str, *args: Any) -> None:
        for backend in list(self.backends):
            try:
                getattr(backend, call)(*args)
            except Exception as err:  # noqa: BLE001 - a dashboard must not end a run
                self.backends.remove(backend)
                warnings.warn(f"logger {backend.name} failed ({type(err).__name__}: {str(err).splitlines()[0][:100] if str(err) else ''}); "
                              "it is off for the rest of this run (metrics.json and log.jsonl are complete)", stacklevel=2)
                self.log.write("logger_failed", logger=backend.name, error=type(err).__name__)
                try:
                    backend.close("failed")
                except Exception:  # noqa: BLE001
                    pass

    def write(self, event: str, **fields: Any) -> None:
        self.log.write(event, **fields)
        if not self.backends:
            return
        found = scalars_of(event, fields, self.epochs)
        if found is not None and found[0]:
            self._each("scalars", *found)

    def finish(self, metrics: dict[str, Any]) -> None:
        self._each("summary", {k: metrics[k] for k in SUMMARY_KEYS if metrics.get(k) is not None})

    def close(self, state: str = "finished") -> None:
        self.log.close()
        backends, self.backends = self.backends, []
        for backend in backends:
            try:
                backend.close(state)
            except Exception as err:  # noqa: BLE001
                warnings.warn(f"logger {backend.name} failed to close ({type(err).__name__})", stacklevel=2)


def open_loggers(cfg: RunConfig, run_dir: Path, log: Any, resume: bool, run_id: str) -> MirroredLog:
    """``log`` mirrored to every enabled logger (to none: ``log`` alone). ``run_id``: stable across
    resumes of this run directory (W&B resumes the same run)."""
    opts = cfg.loggers
    params = {k: v for k, v in flatten(config_to_dict(cfg)).items() if v is not None}
    factories: list[tuple[str, Any]] = []
    if opts.tensorboard:
        factories.append(("tensorboard", lambda: TensorBoard(run_dir, params, resume)))
    if opts.wandb is not None:
        factories.append(("wandb", lambda: WandB(cfg, run_dir, params, run_id)))
    if opts.mlflow is not None:
        factories.append(("mlflow", lambda: MLflow(cfg, run_dir, params, resume)))
    backends: list[Backend] = []
    for name, factory in factories:
        try:
            backends.append(factory())
        except Exception as err:  # noqa: BLE001 - the run goes on; its numbers do not depend on a dashboard
            warnings.warn(f"logger {name} could not start ({type(err).__name__}: {str(err).splitlines()[0][:100] if str(err) else ''}); "
                          "the run goes on without it", stacklevel=2)
            log.write("logger_failed", logger=name, error=type(err).__name__)
    return MirroredLog(log, backends, cfg.train.epochs)


def _no_mlflow_telemetry() -> None:
    """MLflow 3 writes ~/.config/mlflow/telemetry.json and reports usage unless told not to; a run
    writes only into its configured directories. (The user's own setting wins.)"""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def check_loggers(cfg: RunConfig) -> None:
    """Before anything is written: each enabled logger's library must be installed."""
    from cl.errors import ConfigError

    if cfg.loggers.mlflow is not None:
        _no_mlflow_telemetry()

    wanted = {"tensorboard": cfg.loggers.tensorboard, "wandb": cfg.loggers.wandb is not None, "mlflow": cfg.loggers.mlflow is not None}
    for name, on in wanted.items():
        if not on:
            continue
        module = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "mlflow": "mlflow.tracking"}[name]
        try:
            __import__(module)
        except ImportError as err:
            hint = {"mlflow": "pip install mlflow-skinny (the project's [loggers] extra)"}.get(name, f"pip install {name}")
            raise ConfigError(f"loggers.{name}: {err.name or module} is not installed ({hint})") from None
