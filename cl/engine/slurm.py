"""SLURM execution of a suite through submitit: one array job, one task per run.

``cl sweep SUITE --executor slurm --slurm-partition gpu --slurm-time 240 --slurm-gpus 1`` submits
every planned run as a task of one job array (``--slurm-parallel`` caps how many run at once), waits
for them and writes the usual report. Job files and logs go to ``<out_dir>/<suite>/.submitit/``
(inside the output directory, nothing elsewhere). A task that SLURM preempts or times out is
requeued by submitit and resumes its run from the last per-experience checkpoint (never restarted
with ``--overwrite``). ``CL_SUBMITIT_CLUSTER=local`` runs the same tasks as local processes through
submitit's local executor, to try a setup without a cluster.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, Field

from cl.errors import UserError


class SlurmOptions(BaseModel):
    partition: str | None = None
    time_min: int = Field(240, ge=1, description="wall-time limit per run, minutes")
    gpus: int = Field(0, ge=0, description="GPUs per run")
    cpus: int = Field(4, ge=1, description="CPU cores per run (also its torch threads)")
    mem_gb: int | None = Field(None, ge=1)
    parallel: int | None = Field(None, ge=1, description="array tasks running at once (default: all)")


def _runner(execute: Callable[..., dict[str, Any]]):  # noqa: ANN202 - built lazily: submitit is imported only here
    import submitit

    class SlurmRun(submitit.helpers.Checkpointable):
        """One run (``execute(data, overwrite, threads)``); on preemption or timeout requeued as a
        resume of the same run."""

        def __call__(self, data: dict[str, Any], overwrite: bool, threads: int) -> dict[str, Any]:
            return execute(data, overwrite, threads, lines=True)  # one run per task log: per-epoch lines

        def checkpoint(self, data: dict[str, Any], overwrite: bool, threads: int):  # noqa: ANN201
            return submitit.helpers.DelayedSubmission(SlurmRun(), data, False, threads)

    return SlurmRun()


def check_slurm() -> str:
    """The submitit cluster to use ('slurm' or 'local'), or a one-line error."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise UserError("--executor slurm needs the submitit package (pip install submitit)") from None
    cluster = os.environ.get("CL_SUBMITIT_CLUSTER", "slurm")
    if cluster not in ("slurm", "local"):
        raise UserError(f"CL_SUBMITIT_CLUSTER: 'slurm' or 'local', got {cluster!r}")
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise UserError("--executor slurm: no SLURM here (sbatch not found); run on a login node, or set CL_SUBMITIT_CLUSTER=local to try it locally")
    return cluster


def run_slurm(
    planned: list, execute: Callable[..., dict[str, Any]], overwrite: bool, folder: Path, options: SlurmOptions,  # noqa: ANN001
    progress: Callable[[int, int, dict[str, Any]], None],
) -> list[dict[str, Any]]:
    """Submit ``planned`` as one array of ``execute`` calls and wait; returns the outcomes in plan order."""
    import submitit

    cluster = check_slurm()
    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=cluster)
    params: dict[str, Any] = {"timeout_min": options.time_min, "cpus_per_task": options.cpus, "nodes": 1, "tasks_per_node": 1}
    if options.gpus:
        params["gpus_per_node"] = options.gpus
    if options.mem_gb:
        params["mem_gb"] = options.mem_gb
    if cluster == "slurm":
        params["slurm_array_parallelism"] = options.parallel or len(planned)
        if options.partition:
            params["slurm_partition"] = options.partition
    executor.update_parameters(**params)
    runner = _runner(execute)
    n = len(planned)
    jobs = executor.map_array(runner, [run.data for run in planned], [overwrite] * n, [options.cpus] * n)
    results: dict[int, dict[str, Any]] = {}
    while len(results) < n:
        for k, job in enumerate(jobs):
            if k in results or not job.done():
                continue
            try:
                results[k] = job.result()
            except Exception as err:  # noqa: BLE001 - a task that died (node lost, out of memory, cancelled)
                run = planned[k]
                results[k] = {"run_dir": str(run.cfg.run_dir()), "experiment": run.cfg.experiment, "run": run.cfg.name, "seed": run.seed,
                              "ok": False, "error": f"slurm task {job.job_id} failed: {type(err).__name__}", "metrics": None}
            progress(len(results), n, results[k])
        if len(results) < n:
            time.sleep(1.0)
    return [results[k] for k in range(n)]
