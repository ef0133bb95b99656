"""The training loop: one explicit pass over the experiences of a stream.

::

    prepare(cfg)                       # all input checks, data, backbone, feature cache, strategy
    for each experience i:
        strategy.before_experience(exp)
        for batch in (epochs x batches | one online pass):
            strategy.observe(x, y, task_id)
            (online: every k samples, anytime accuracy on the classes seen so far)
        strategy.after_experience(exp)
        evaluate every test task -> row i of the accuracy matrices
        checkpoint
    metrics.json + plots

Everything that can fail because of the user's input happens in :func:`prepare`, before the run
directory is touched, so bad input never leaves a half-written run behind.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from cl.analysis import metrics as M
from cl.analysis.plots import accuracy_heatmap, anytime_curve, forgetting_curves
from cl.config import RunConfig
from cl.data.benchmark import Benchmark, Experience, Split, build_benchmark
from cl.data import disk
from cl.data.disk import cat_images, configure_loader
from cl.data.transforms import AugmentedTransform
from cl.data.fakes import refuse_fake_data
from cl.engine.checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint
from cl.engine.loggers import check_loggers, open_loggers
from cl.engine.evaluate import EvalRow, accuracy_on_classes, evaluate
from cl.engine.probes import ProbeRecorder
from cl.engine.progress import Progress
from cl.engine.rundir import JsonlLog, check_before_run, open_run_dir, run_identity, write_config
from cl.models.backbone import Backbone, check_input, create_backbone, hub_input_hint
from cl.models.features import cached_features
from cl.models.pretrain import get_pretrained
from cl.plugins import provenance as plugin_provenance
from cl.registry import STRATEGIES
from cl.errors import ConfigError, RunDirError, TrainingDiverged, UserError
from cl.utils import DEFAULT_THREADS, autocast_forward, environment_info, remove_stale_temps, peak_rss_mb, resolve_device, seed_everything, torch_threads, write_json
from cl.strategies.base import Strategy, StrategyContext, create_strategy


# backbone provenance repeated in metrics.json (env.json has all of it)
BACKBONE_SUMMARY = ("source", "sha256", "path", "file_sha256", "pretrained_on", "key", "cache", "hf_hub_id", "url", "tag")


@dataclass
class Prepared:
    cfg: RunConfig
    bench: Benchmark  # inputs as the strategy receives them (features when cached)
    images: Benchmark  # the same stream with uint8 images (for probes)
    backbone: Backbone
    strategy: Strategy
    device: torch.device
    setup: dict[str, Any] = field(default_factory=dict)


def build_backbone(cfg: RunConfig, bench: Benchmark, device: torch.device) -> Backbone:
    state, info = None, None
    if cfg.backbone.weights.source == "pretrain":
        state, info = get_pretrained(
            cfg.backbone, bench, data_root=cfg.resolved_data_root(), cache_dir=cfg.resolved_cache_dir(),
            seed=cfg.seed, device=device, progress=cfg.progress,
        )
    backbone = create_backbone(cfg.backbone, bench.transform, seed=cfg.seed, pretrained_state=state, pretrain_info=info)
    backbone.model.to(device)
    check_input(backbone, bench.input_shape, device)
    if cfg.backbone.tome is not None:  # token merging (+ its compensator, trained and cached on first use)
        from cl.models.tocom import install_tome

        install_tome(backbone, cfg.backbone, bench, data_root=cfg.resolved_data_root(), cache_dir=cfg.resolved_cache_dir(),
                     seed=cfg.seed, device=device, progress=cfg.progress)
    return backbone


@dataclass
class Inputs:
    """What a run trains on: the stream as the strategy sees it, the same stream as images, the backbone."""

    bench: Benchmark  # features in place of images when they are cached
    images: Benchmark
    backbone: Backbone
    setup: dict[str, Any]  # timings and cache states


def prepare_inputs(cfg: RunConfig, want_features: bool) -> Inputs:
    """Benchmark and backbone of a run, with cached features in place of images when possible."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    configure_loader(cfg.loader.options(device.type))
    refuse_fake_data(cfg)
    images = build_benchmark(cfg.benchmark, cfg.resolved_data_root(), cfg.seed, hub_input_hint(cfg.backbone))
    refuse_fake_data(cfg, images.source)
    t1 = time.perf_counter()
    # Pretraining and feature extraction run with a fixed thread count (CPU results depend on it):
    # the run's num_threads, else the machine default, however many threads a sweep worker trains
    # with. The caches are keyed by it, so whichever process builds an entry, it is the same.
    build_threads = cfg.num_threads or DEFAULT_THREADS
    with torch_threads(build_threads):
        backbone = build_backbone(cfg, images, device)
    if cfg.precision != "fp32":
        autocast_forward(backbone.model, device, cfg.precision)
    t2 = time.perf_counter()
    setup: dict[str, Any] = {"data_time_s": t1 - t0, "backbone_time_s": t2 - t1, "feature_cache": None, "feature_time_s": 0.0,
                             "build_threads": build_threads}
    bench = images
    if want_features and backbone.frozen and cfg.backbone.cache_features:
        with torch_threads(build_threads):
            train_x, test_x, hit = cached_features(
                backbone, images, cache_dir=cfg.resolved_cache_dir(), batch_size=cfg.train.eval_batch_size,
                device=device, progress=cfg.progress, precision=cfg.precision, dtype=cfg.backbone.cache_dtype,
            )
        bench = images.with_inputs(train_x, test_x)
        if backbone.tome is not None and backbone.tome.phases_differ and images.has_validation:
            # validation is evaluation: its rows (of the train pool) are seen as test data is
            with torch_threads(build_threads):
                val_x, _, _ = cached_features(
                    backbone, images, cache_dir=cfg.resolved_cache_dir(), batch_size=cfg.train.eval_batch_size, device=device,
                    progress=cfg.progress, precision=cfg.precision, dtype=cfg.backbone.cache_dtype, phases={"train": "eval", "test": "eval"},
                )
            bench = replace(bench, experiences=[replace(e, val=Split(val_x[e.val_ids], e.val.y)) for e in bench.experiences])  # type: ignore[index,union-attr]
        setup.update(feature_cache="hit" if hit else "miss", feature_time_s=time.perf_counter() - t2)
    return Inputs(bench, images, backbone, setup)


def prepare(cfg: RunConfig) -> Prepared:
    """Build everything a run needs; raises UserError subclasses on bad input."""
    start = time.perf_counter()
    strategy_cls = STRATEGIES.get(cfg.strategy.name)
    inputs = prepare_inputs(cfg, want_features=strategy_cls.wants_features(cfg.strategy))
    prep = _with_strategy(cfg, inputs, inputs.bench)
    if cfg.shift.enabled:
        _check_probe_layers(cfg, inputs)
    prep.setup["setup_time_s"] = time.perf_counter() - start
    return prep


def _with_strategy(cfg: RunConfig, inputs: Inputs, bench: Benchmark) -> Prepared:
    """The strategy of ``cfg`` built on prepared inputs, after the checks that need them."""
    memory = getattr(cfg.strategy, "memory_size", None)
    n_train = sum(len(e.train) for e in bench.experiences)
    if memory is not None and memory > n_train:
        raise ConfigError(f"strategy.memory_size: {memory} exceeds the {n_train} training samples of the stream")
    _check_batchnorm_batches(cfg, inputs)
    augment = cfg.train.augment
    side = min(inputs.images.input_shape[1:])
    if augment is not None and augment.crop_padding * 2 > side:
        raise ConfigError(f"train.augment.crop_padding: {augment.crop_padding} pixels would shift most of each {side}-pixel input out of view (at most {side // 2})")
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)  # strategy initialisation does not depend on what setup consumed
    ctx = StrategyContext(
        n_classes=bench.n_classes, scenario=cfg.benchmark.scenario, backbone=inputs.backbone,
        feature_dim=inputs.backbone.feature_dim, input_shape=inputs.images.input_shape,
        cached_features=inputs.setup["feature_cache"] is not None,
        device=device, seed=cfg.seed, train=cfg.train, precision=cfg.precision,
    )
    strategy = create_strategy(cfg.strategy, ctx)
    return Prepared(cfg, bench, inputs.images, inputs.backbone, strategy, device, {**inputs.setup, "setup_time_s": 0.0})


def _check_batchnorm_batches(cfg: RunConfig, inputs: Inputs) -> None:
    """A BatchNorm layer cannot train on one sample: refuse settings that would feed it one."""
    trains_bn = any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and any(p.requires_grad for p in m.parameters())
        for m in inputs.backbone.model.modules()
    )
    if not trains_bn:
        return
    name = inputs.backbone.name
    if cfg.benchmark.scenario == "online" and cfg.benchmark.online.batch_size < 2:
        raise ConfigError(f"benchmark.online.batch_size: 1 sample per step cannot train the BatchNorm layers of {name} (use >= 2 or freeze them)")
    if cfg.benchmark.scenario != "online" and cfg.train.batch_size < 2:
        raise ConfigError(f"train.batch_size: 1 sample per step cannot train the BatchNorm layers of {name} (use >= 2 or freeze them)")
    small = [e.index for e in inputs.bench.experiences if len(e.train) < 2]
    if small:
        raise ConfigError(f"benchmark: experience {small[0]} has fewer than 2 training samples, too few to train the BatchNorm layers of {name}")


def _check_probe_layers(cfg: RunConfig, inputs: Inputs) -> None:
    """``shift.layers`` must name blocks of the backbone: checked on one dummy sample, before training."""
    model = inputs.backbone.model
    if not hasattr(model, "forward_intermediates"):
        raise ConfigError(f"shift: {inputs.backbone.name} has no forward_intermediates; per-layer probes need it")
    if cfg.shift.layers is None:
        return
    n = len(getattr(model, "feature_info", []) or [])
    x = torch.zeros((1, *inputs.images.input_shape), device=next(model.parameters()).device)
    try:
        with torch.no_grad():
            model.forward_intermediates(x, indices=cfg.shift.layers, intermediates_only=True)
    except (AssertionError, IndexError, ValueError, RuntimeError, TypeError):
        raise ConfigError(f"shift.layers: {cfg.shift.layers} is not a list of block indices of {inputs.backbone.name} "
                          f"(it has {n} blocks: 0..{n - 1}, or negative from the end)") from None


def _anytime_eval_set(bench: Benchmark, per_class: int | None, seed: int, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    g = torch.Generator().manual_seed(seed + 7919)
    for exp in bench.experiences:
        data = exp.val if split == "val" else exp.test
        for c in exp.classes:
            idx = torch.nonzero(data.y == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)][:per_class] if per_class else idx
            xs.append(data.x[idx])
            ys.append(data.y[idx])
    return cat_images(xs), torch.cat(ys)


def _training_data(bench: Benchmark, i: int, policy: str) -> Split:
    if policy == "current":
        return bench.experiences[i].train
    parts = [e.train for e in bench.experiences[: i + 1]]
    return Split(cat_images([p.x for p in parts]), torch.cat([p.y for p in parts]))


class _LossMeter:
    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0

    def add(self, terms: dict[str, float], where: str) -> None:
        for k, v in terms.items():
            if not math.isfinite(v):
                raise TrainingDiverged(f"loss term '{k}' became {v} ({where}); the last good checkpoint is kept")
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def means(self) -> dict[str, float]:
        return {k: v / max(self.steps, 1) for k, v in self.sums.items()}


def run(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, stop_after: int | None = None) -> dict[str, Any] | None:
    """Run one configured experiment end to end.

    Args:
        cfg: validated run config.
        resume: continue an unfinished run from its last checkpoint (a finished run of the same
            config, data and weights is returned as is).
        overwrite: replace the run the directory holds (only a directory this framework created).
        stop_after: stop (checkpointed, unfinished) after this many experiences; used to test resume.

    Returns:
        The metrics dict (also written to ``metrics.json``), or None if stopped early.
    """
    if stop_after is not None and stop_after < 1:
        raise UserError(f"--stop-after must be >= 1, got {stop_after}")
    if stop_after is not None and not cfg.train.checkpoint:
        raise ConfigError("--stop-after needs train.checkpoint: true (there would be nothing to resume from)")
    if stop_after is not None and not STRATEGIES.get(cfg.strategy.name).resumable:
        raise ConfigError(f"--stop-after: strategy '{cfg.strategy.name}' cannot be checkpointed, so there would be nothing to resume from")
    check_before_run(cfg, resume=resume, overwrite=overwrite)
    check_loggers(cfg)
    prep = prepare(cfg)  # every input error surfaces here, before the run directory exists
    weights = prep.backbone.weights.get("sha256")
    tocom = (prep.backbone.weights.get("tome") or {}).get("compensator")
    if tocom:  # a compensator file is identified by its content, like the backbone weights
        weights = f"{weights}+tocom:{tocom['sha256']}"
    identity = run_identity(cfg, prep.images.content_sha256(), weights)
    opened = open_run_dir(cfg, identity, resume=resume, overwrite=overwrite)
    loop = None
    try:
        if opened.mode == "finished":
            return read_metrics(opened.path, identity)
        loop = _Loop(prep, opened.path, identity, resume=opened.mode == "resume")
        return loop.run(stop_after)
    except BaseException as err:
        if loop is not None and loop.log.backends:
            # an error: failed; Ctrl-C or SIGTERM: stopped (resumable); log.jsonl ends where it ended
            loop.log.close("failed" if isinstance(err, Exception) else "stopped")
        raise
    finally:
        opened.lock.release()


def read_metrics(run_dir: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """A finished run's metrics, checked to be this run's: same identity, the shapes reports use."""
    from cl.analysis.report import check_metrics

    path = run_dir / "metrics.json"
    try:
        metrics = check_metrics(json.loads(path.read_text(encoding="utf-8")))
        if metrics.get("identity") != identity:
            raise ValueError("it belongs to another run (identity differs)")
        for key in ("scenario", "final_acc", "avg_incremental_acc", "wall_time_s"):
            if key not in metrics:
                raise ValueError(f"no {key}")
    except (OSError, ValueError) as err:
        raise RunDirError(f"{path} is not this run's metrics ({str(err)[:80]}); pass --overwrite to re-run") from None
    return metrics


class _Loop:
    """One run: train on each experience, evaluate after it, checkpoint, write the run directory.

    The accuracy matrices are measured on the test splits; with ``benchmark.validation`` the
    validation splits are evaluated too (``*_val`` matrices). :class:`TrialLoop` is the same loop
    in memory, measuring on validation only, for hyper-parameter search.
    """

    split = "test"  # what the main accuracy matrices are measured on

    def __init__(self, prep: Prepared, run_dir: Path, identity: dict[str, Any], resume: bool) -> None:
        self._init_state(prep)
        self.run_dir, self.identity = run_dir, identity
        self.probes = ProbeRecorder(self.cfg.shift, self.bench, prep.images, run_dir) if self.cfg.shift.enabled else None
        if resume:  # temporary files of atomic writes that a kill interrupted (we hold the lock)
            for sub in (run_dir, run_dir / "ckpt", run_dir / "plots", run_dir / "probes"):
                remove_stale_temps(sub)
        ckpt = load_checkpoint(run_dir / "ckpt") if resume else None
        if ckpt is not None:
            if ckpt.get("identity") != identity:
                raise RunDirError(f"{run_dir}: the checkpoint belongs to another config, data or backbone; pass --overwrite to start again")
            self._restore(ckpt)
            write_config(run_dir, self.cfg)  # the same result config; volatile keys as resumed
            self._record_resume()
        else:
            write_config(run_dir, self.cfg)
            write_json(run_dir / "env.json", self._env())
        log = JsonlLog(run_dir / "log.jsonl", resume_offset=ckpt["log_offset"] if ckpt else None)
        run_id = hashlib.sha256(f"{run_dir.absolute()}|{json.dumps(identity, sort_keys=True)}".encode()).hexdigest()[:16]
        self.log = open_loggers(self.cfg, run_dir, log, resume=ckpt is not None, run_id=run_id)
        if ckpt is None:
            self.log.write("run_start", run_dir=str(run_dir), **prep.setup)
        else:
            self.log.write("resume", next_experience=self.next_exp, log_bytes_lost=self.log.lost_bytes, log_lines_dropped=self.log.dropped_lines)

    def _init_state(self, prep: Prepared) -> None:
        self.prep, self.cfg = prep, prep.cfg
        self.strategy, self.bench = prep.strategy, prep.bench
        self.exps = self.bench.experiences
        self.generator = torch.Generator().manual_seed(self.cfg.seed)
        self.rows_cil: list[list[float | None]] = []
        self.rows_til: list[list[float | None]] = []
        self.rows_tinf: list[list[float | None]] = []
        self.val_cil: list[list[float | None]] = []  # validation splits, when the main split is test
        self.val_til: list[list[float | None]] = []
        self.initial_til: list[float | None] | None = None
        self.anytime: list[list[float]] = []  # [samples seen, accuracy, experience]
        self.stored_bytes: list[int] = []
        self.samples_seen = 0
        self.train_time = self.eval_time = 0.0
        self.elapsed_before = 0.0
        self.next_exp = 0
        self.also_val = self.split == "test" and self.bench.has_validation

    # ---- provenance and checkpoints -------------------------------------------------------

    def _env(self) -> dict[str, Any]:
        return {
            **environment_info(self.prep.device),
            "seed": self.cfg.seed,
            "identity": self.identity,
            "backbone": {"name": self.prep.backbone.name, "trainable": self.prep.backbone.trainable, **self.prep.backbone.weights},
            "benchmark": self.bench.describe(),
            "input_transform": self.prep.backbone.transform.to_dict(),
            "cached_features": self.strategy.ctx.cached_features,
            "loader": asdict(disk.LOADER),  # how streamed images were decoded (speed only)
            **({"plugins": plugin_provenance(self.cfg.plugins)} if self.cfg.plugins else {}),
        }

    def _record_resume(self) -> None:
        """env.json keeps the environment of the start and adds each resume's (code and packages may differ)."""
        path = self.run_dir / "env.json"
        try:
            env = json.loads(path.read_text())
            if not isinstance(env, dict):
                raise ValueError("not an object")
        except (OSError, ValueError):
            env = {**self._env(), "note": "env.json was unreadable at resume and was written again"}
        env.setdefault("resumes", []).append({"experience": self.next_exp, **environment_info(self.prep.device)})
        write_json(path, env)

    def _checkpoint(self) -> None:
        if not self.cfg.train.checkpoint or not self.strategy.resumable:
            return
        save_checkpoint(
            self.run_dir / "ckpt",
            {
                "identity": self.identity,
                "next_experience": self.next_exp,
                "strategy": self.strategy.state_dict(),
                "rows_cil": self.rows_cil,
                "rows_til": self.rows_til,
                "rows_tinf": self.rows_tinf,
                "val_cil": self.val_cil,
                "val_til": self.val_til,
                "initial_til": self.initial_til,
                "anytime": self.anytime,
                "stored_bytes": self.stored_bytes,
                "samples_seen": self.samples_seen,
                "train_time": self.train_time,
                "eval_time": self.eval_time,
                "elapsed": self.elapsed_before + time.perf_counter() - self.started,
                "generator": self.generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "log_offset": self.log.offset,
            },
        )

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.strategy.load_state_dict(ckpt["strategy"])
        self.next_exp = ckpt["next_experience"]
        self.rows_cil, self.rows_til, self.rows_tinf = ckpt["rows_cil"], ckpt["rows_til"], ckpt["rows_tinf"]
        self.val_cil, self.val_til = ckpt["val_cil"], ckpt["val_til"]
        self.initial_til, self.anytime = ckpt["initial_til"], ckpt["anytime"]
        self.stored_bytes, self.samples_seen = ckpt["stored_bytes"], ckpt["samples_seen"]
        self.train_time, self.eval_time = ckpt["train_time"], ckpt["eval_time"]
        self.elapsed_before = ckpt["elapsed"]
        self.generator.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])

    # ---- the loop ---------------------------------------------------------------------------

    def run(self, stop_after: int | None) -> dict[str, Any] | None:
        self.started = time.perf_counter()
        cfg = self.cfg
        online = cfg.benchmark.scenario == "online"
        if online:
            self.anytime_x, self.anytime_y = _anytime_eval_set(self.bench, cfg.benchmark.online.eval_test_per_class, cfg.seed, self.split)
            self.observed = torch.zeros(self.bench.n_classes, dtype=torch.bool)
            for e in self.exps[: self.next_exp]:  # classes observed before a resume
                self.observed[e.classes] = True
        if self.next_exp == 0 and self.initial_til is None and cfg.train.eval_future_tasks:
            self.initial_til = self._evaluate(0).til
        self.progress = Progress(f"{cfg.experiment}/{cfg.name}/seed{cfg.seed}", len(self.exps), cfg.progress, start=self.next_exp)
        try:
            return self._run_experiences(stop_after)
        finally:
            self.progress.close()

    def _run_experiences(self, stop_after: int | None) -> dict[str, Any] | None:
        online = self.cfg.benchmark.scenario == "online"
        for i in range(self.next_exp, len(self.exps)):
            exp = self.exps[i]
            self.strategy.before_experience(exp)
            t0 = time.perf_counter()
            if online:
                self._train_online(exp)
            else:
                self._train_offline(exp, i)
            self.strategy.after_experience(exp)
            self.train_time += time.perf_counter() - t0
            row = self._evaluate(i + 1)
            cil, til = row.cil, row.til
            self.rows_cil.append(cil)
            self.rows_til.append(til)
            if row.task_inference is not None:
                self.rows_tinf.append(row.task_inference)
            self.stored_bytes.append(int(self.strategy.storage_bytes()))
            extra: dict[str, Any] = {}
            if self.also_val:
                val = self._evaluate(i + 1, "val")
                self.val_cil.append(val.cil)
                self.val_til.append(val.til)
                extra = {"val_acc_cil": val.cil, "val_acc_seen_classes": M.seen_classes_acc(val.cil, self._n_eval("val"), i)}
            if self.probes is not None:
                self.probes.record(self.strategy, i)
            seen_acc = M.seen_classes_acc(cil, self._n_eval(self.split), i)
            self.log.write("eval", experience=i, split=self.split, acc_cil=cil, acc_task_aware=til, acc_seen_classes=seen_acc,
                           task_inference=row.task_inference, **extra)
            self.progress.end_experience(i, seen_acc)
            self._after_experience(i, seen_acc)
            self.next_exp = i + 1
            self._checkpoint()
            if stop_after is not None and self.next_exp >= stop_after and self.next_exp < len(self.exps):
                self.log.write("stopped", next_experience=self.next_exp)
                self.log.close("stopped")
                return None
        return self._finish()

    def _train_offline(self, exp: Experience, i: int) -> None:
        data = _training_data(self.bench, i, self.strategy.data_policy)
        epochs = min(self.cfg.train.epochs, self.strategy.max_epochs or self.cfg.train.epochs)
        if self.strategy.trains_itself:
            self.strategy.train_experience(exp, data, epochs, self.cfg.train.batch_size)
            self.samples_seen += len(data) * epochs
            self.log.write("epoch", experience=i, epoch=epochs - 1, steps=None)
            return
        budget = self.cfg.train.max_steps
        steps = math.ceil(len(data) / self.cfg.train.batch_size)
        total = steps * epochs if budget is None else min(steps * epochs, budget)  # optimiser steps of the experience
        done = 0
        for epoch in range(epochs):
            self.strategy.before_epoch(epoch)
            meter = _LossMeter()
            self.progress.start_epoch(i, epoch, epochs, steps if budget is None else min(steps, budget))
            for xb, yb in itertools.islice(data.batches(self.cfg.train.batch_size, self.generator), budget):
                self.strategy.lr_position = (done, total, epoch)
                done += 1
                with self._augmenting():
                    terms = self.strategy.observe(xb, yb, exp.task_id)
                meter.add(terms, f"experience {i}, epoch {epoch}")
                self.samples_seen += len(yb)
                self.progress.step(len(yb), terms)
            self.progress.end_epoch()
            self.log.write("epoch", experience=i, epoch=epoch, steps=meter.steps, **meter.means())
            if budget is not None:
                budget -= meter.steps
                if budget <= 0:
                    break

    def _train_online(self, exp: Experience) -> None:
        online = self.cfg.benchmark.online
        meter = _LossMeter()
        self.strategy.before_epoch(0)
        next_eval = (self.samples_seen // online.eval_every + 1) * online.eval_every
        steps = math.ceil(len(exp.train) / online.batch_size)
        total = steps if self.cfg.train.max_steps is None else min(steps, self.cfg.train.max_steps)
        self.progress.start_epoch(exp.index, 0, 1, total)
        for done, (xb, yb) in enumerate(itertools.islice(exp.train.batches(online.batch_size, self.generator), self.cfg.train.max_steps)):  # single pass
            self.strategy.lr_position = (done, total, 0)
            with self._augmenting():
                terms = self.strategy.observe(xb, yb, exp.task_id)
            meter.add(terms, f"experience {exp.index}, sample {self.samples_seen}")
            self.samples_seen += len(yb)
            self.progress.step(len(yb), terms)
            self.observed[yb] = True
            if self.samples_seen >= next_eval:
                t0 = time.perf_counter()
                with self.prep.backbone.phase("eval"):
                    acc = accuracy_on_classes(self.strategy, self.anytime_x, self.anytime_y, self.observed, self.cfg.train.eval_batch_size)
                self.eval_time += time.perf_counter() - t0
                if acc is not None:
                    self.anytime.append([self.samples_seen, acc, exp.index])
                    self.log.write("anytime", samples=self.samples_seen, acc=acc, experience=exp.index)
                next_eval += online.eval_every
        self.progress.end_epoch()
        self.log.write("epoch", experience=exp.index, epoch=0, steps=meter.steps, **meter.means())

    @contextmanager
    def _augmenting(self) -> Iterator[None]:
        """With ``train.augment``, every image batch the strategy sends through the backbone during
        one ``observe`` (its replay samples included) is augmented, with the loop's checkpointed
        generator (so a resumed run draws what an uninterrupted one would); never in evaluation."""
        augment = self.cfg.train.augment
        if augment is None:
            yield
            return
        backbone = self.prep.backbone
        plain = backbone.transform
        backbone.transform = AugmentedTransform(plain, self.generator, augment.crop_padding, augment.hflip)  # type: ignore[assignment]
        try:
            yield
        finally:
            backbone.transform = plain

    def _evaluate(self, trained: int, split: str | None = None) -> EvalRow:
        t0 = time.perf_counter()
        with self.prep.backbone.phase("eval"):  # with backbone.tome: r_eval (+ compensator)
            rows = evaluate(self.strategy, self.exps, trained, self.cfg.train.eval_batch_size, self.cfg.train.eval_future_tasks, split or self.split)
        self.eval_time += time.perf_counter() - t0
        return rows

    def _after_experience(self, i: int, seen_acc: float) -> None:
        """After experience ``i`` is trained and evaluated (seen-class accuracy on the main split)."""

    # ---- results ----------------------------------------------------------------------------

    def _task_inference(self, n_test: list[int]) -> dict[str, Any]:
        """Task-inference accuracy matrix and its last row's sample-weighted mean (None if not inferred)."""
        if not self.rows_tinf:
            return {"task_inference_matrix": None, "task_inference_acc": None}
        return {"task_inference_matrix": M.to_json_matrix(self.rows_tinf), "task_inference_acc": M.final_acc(self.rows_tinf, n_test)}

    def _n_eval(self, split: str) -> list[int]:
        return [len(e.val if split == "val" else e.test) for e in self.exps]  # type: ignore[arg-type]

    def _validation(self) -> dict[str, Any]:
        """The validation matrices and their summary, measured beside the test ones."""
        if not self.also_val:
            return {}
        n_val = self._n_eval("val")
        return {
            "acc_matrix_val": M.to_json_matrix(self.val_cil),
            "acc_matrix_task_aware_val": M.to_json_matrix(self.val_til),
            "n_val_per_task": n_val,
            "validation": {**M.summarize(self.val_cil, n_val), "task_aware": M.summarize(self.val_til, n_val)},
        }

    def _result(self) -> dict[str, Any]:
        cfg, strategy = self.cfg, self.strategy
        n_test = self._n_eval(self.split)
        wall = self.elapsed_before + time.perf_counter() - self.started + self.prep.setup["setup_time_s"]
        memory_size, memory_bytes = strategy.memory_stats()
        result: dict[str, Any] = {
            "identity": self.identity,
            # which data every number was measured on: the accuracy matrices and their summaries on
            # `split`; *_val matrices and `validation` on the validation splits (carved from training data)
            "split": self.split,
            "smoke": cfg.smoke,
            "experiment": cfg.experiment,
            "run": cfg.name,
            "strategy": cfg.strategy.name,
            "seed": cfg.seed,
            "scenario": cfg.benchmark.scenario,
            "n_experiences": len(self.exps),
            "classes_per_experience": [len(e.classes) for e in self.exps],
            "n_test_per_task": n_test,
            "n_train_per_task": [len(e.train) for e in self.exps],  # stream samples per experience (anytime boundaries)
            "acc_matrix": M.to_json_matrix(self.rows_cil),
            "acc_matrix_task_aware": M.to_json_matrix(self.rows_til),
            "initial_acc_task_aware": self.initial_til,
            # FWT stays None here: class-incremental accuracy on unseen classes is not evaluated.
            **M.summarize(self.rows_cil, n_test),
            "task_aware": M.summarize(self.rows_til, n_test, self.initial_til),
            "trainable_params": sum(p.numel() for p in strategy.trainable_parameters()),
            **self._task_inference(n_test),
            "stored_bytes": self.stored_bytes,
            "stored_bytes_per_task": [b - a for a, b in zip([0] + self.stored_bytes[:-1], self.stored_bytes)],
            "memory_size": memory_size,
            "memory_bytes": memory_bytes,
            "wall_time_s": wall,
            **{k: v for k, v in self.prep.setup.items() if k.endswith("_time_s")},
            "train_time_s": self.train_time,
            "eval_time_s": self.eval_time,
            "train_samples_per_s": self.samples_seen / self.train_time if self.train_time > 0 else None,
            "peak_rss_mb": peak_rss_mb(),
            "cached_features": strategy.ctx.cached_features,
            "feature_cache": self.prep.setup.get("feature_cache"),
            "backbone": {"name": self.prep.backbone.name, **{k: v for k, v in self.prep.backbone.weights.items() if k in BACKBONE_SUMMARY}},
        }
        if cfg.benchmark.scenario == "online":
            accs = [a[1] for a in self.anytime]
            result["anytime"] = {"samples": [int(a[0]) for a in self.anytime], "acc": accs, "experience": [int(a[2]) for a in self.anytime]}
            result["avg_anytime_acc"] = M.avg_anytime_acc(accs)
        result.update(self._validation())
        return result

    def _finish(self) -> dict[str, Any]:
        result = self._result()
        wall = result["wall_time_s"]
        self._plots(result)
        export = getattr(self.strategy, "export", None)
        if export is not None:  # e.g. the per-task PEFT bank
            export(self.run_dir)
        write_json(self.run_dir / "metrics.json", result)  # last: its presence marks the run finished
        self.log.write("run_end", wall_time_s=wall, final_acc=result["final_acc"])
        self.log.finish(result)
        self.log.close("finished")
        prune_checkpoints(self.run_dir / "ckpt", self.cfg.train.keep_checkpoints)
        return result

    def _plots(self, result: dict[str, Any]) -> None:
        plots = self.run_dir / "plots"
        title = f"{self.cfg.experiment} / {self.cfg.name} / seed {self.cfg.seed}"
        names = self.bench.class_names
        labels = [",".join(names[c] for c in e.classes) if len(e.classes) <= 2 else f"{len(e.classes)} classes" for e in self.exps]
        forgetting_curves(self.rows_cil, result["n_test_per_task"], plots / "forgetting_curves.png", title, labels)
        accuracy_heatmap(self.rows_cil, plots / "acc_matrix.png", f"{title}: class-incremental accuracy (%)")
        accuracy_heatmap(self.rows_til, plots / "acc_matrix_task_aware.png", f"{title}: task-aware accuracy (%)")
        if "anytime" in result and result["anytime"]["samples"]:
            bounds = []
            total = 0
            for e in self.exps[:-1]:
                total += len(e.train)
                bounds.append(total)
            anytime_curve(result["anytime"]["samples"], result["anytime"]["acc"], plots / "anytime.png", bounds, title)


class _NullLog:
    """The event log of a run that writes nothing (hyper-parameter trials)."""

    offset = 0
    lost_bytes = dropped_lines = 0
    backends: list[Any] = []

    def write(self, event: str, **fields: Any) -> None:
        pass

    def finish(self, metrics: dict[str, Any]) -> None:
        pass

    def close(self, state: str = "finished") -> None:
        pass


class TrialLoop(_Loop):
    """The run loop in memory, measured on the validation splits only: a hyper-parameter trial.

    Nothing is written; test splits are sealed by :meth:`Benchmark.for_tuning`, so a read of test
    data anywhere (strategy, loop, evaluation) fails the trial. ``report(i, acc)`` is called with the
    seen-class validation accuracy after each experience (pruning raises from there).
    """

    split = "val"

    def __init__(self, prep: Prepared, report: Any = None) -> None:
        self._init_state(prep)
        self.run_dir, self.identity, self.probes = None, None, None  # type: ignore[assignment]
        self.log = _NullLog()  # type: ignore[assignment]
        self.report = report

    def _after_experience(self, i: int, seen_acc: float) -> None:
        if self.report is not None:
            self.report(i, seen_acc)

    def _checkpoint(self) -> None:
        pass

    def _finish(self) -> dict[str, Any]:
        return self._result()


def prepare_trial(inputs: Inputs, cfg: RunConfig, first_k: int | None) -> Prepared:
    """A strategy built for ``cfg`` on already prepared inputs (shared by the trials of a study),
    with the stream cut to its first ``first_k`` experiences and every test split sealed."""
    return _with_strategy(cfg, inputs, inputs.bench.for_tuning(first_k))
