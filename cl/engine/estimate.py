"""Cost before you pay: time a few batches of a run and extrapolate (``cl run/sweep --dry-run --estimate``).

What is timed is the real code on the real device, at the real input size and precision: the
backbone's forward pass on decoded images (feature extraction and evaluation of image strategies),
image decoding when the data are streamed, and the strategy's own ``observe`` and ``predict`` on
batches of the stream (after ``before_experience`` of the first experience). The weights are random
(same architecture and shapes: the cost does not depend on them), so nothing is downloaded or
pretrained, and the run directory is not touched. Sample counts come from the real stream.

It is an extrapolation, linear in the number of samples, from small batches (at most
:data:`PROBE_BATCH`): on a GPU large batches run faster per sample, so read it as an upper bound
there; on CPU it is usually within a factor of 1.5. Checkpoint size is measured by serialising the
strategy's state after the timed steps; the peak memory is this process's after them.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from cl.config import RunConfig
from cl.data import disk
from cl.data.disk import DiskImages
from cl.utils import peak_rss_mb, torch_threads

PROBE_BATCH = 8
REPEATS = 2  # timed repetitions after one warm-up


@dataclass
class Estimate:
    device: str
    precision: str
    probe_batch: int
    seconds: dict[str, float] = field(default_factory=dict)  # per phase, whole run
    per_sample_s: dict[str, float] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    peak_rss_gb: float = 0.0
    peak_gpu_gb: float | None = None
    disk_gb: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())

    def lines(self) -> list[str]:
        out = [f"estimate (timed on {self.device}, {self.precision}, on a few batches; extrapolated linearly):"]
        for phase, s in self.seconds.items():  # (per_sample_s also has "backbone forward", timed for reference)
            n = self.samples.get(phase, 0)
            out.append(f"  {phase:<20} {human_time(s):>9}  ({n:,} samples x {self.per_sample_s.get(phase, 0) * 1e3:.2f} ms)")
        out.append(f"  {'total':<20} {human_time(self.total_s):>9}")
        mem = f"  peak memory          {self.peak_rss_gb:.2f} GB RSS"
        if self.peak_gpu_gb is not None:
            mem += f", {self.peak_gpu_gb:.2f} GB GPU"
        out.append(mem)
        if self.disk_gb:
            out.append("  disk                 " + ", ".join(f"{k} {v:.3f} GB" for k, v in self.disk_gb.items()))
        out += [f"  note: {n}" for n in self.notes]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "precision": self.precision, "probe_batch": self.probe_batch, "seconds": self.seconds,
                "per_sample_s": self.per_sample_s, "samples": self.samples, "total_s": self.total_s, "peak_rss_gb": self.peak_rss_gb,
                "peak_gpu_gb": self.peak_gpu_gb, "disk_gb": self.disk_gb, "notes": self.notes}


def human_time(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _timed(fn: Any, device: torch.device) -> float:
    """Seconds per call of ``fn``: one warm-up call, then the mean of :data:`REPEATS`."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(REPEATS):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / REPEATS


def _per_sample(make: Any, full: int, n_max: int, device: torch.device, budget_s: float = 4.0) -> tuple[float, int]:
    """(seconds per sample, batch timed): ``make(b)`` returns a call processing ``b`` samples. Timed at
    :data:`PROBE_BATCH`, then at doubling batch sizes up to the run's ``full`` while the next timing is
    expected to fit in ``budget_s`` (small batches overstate the per-sample cost of cheap steps)."""
    top = max(1, min(full, n_max))
    b = min(PROBE_BATCH, top)
    per = _timed(make(b), device) / b
    spent = per * b * (REPEATS + 1)
    while b < top:
        nxt = min(2 * b, top)
        cost = per * nxt * (REPEATS + 1)
        if spent + cost > budget_s:
            break
        b, per = nxt, _timed(make(nxt), device) / nxt
        spent += cost
    return per, b


def _shrunk(exp: Any, n: int) -> Any:
    """The experience with only its first ``n`` training samples (strategies' end-of-experience passes stay short)."""
    from dataclasses import replace

    from cl.data.benchmark import Split

    rows = torch.arange(min(n, len(exp.train)))
    return replace(exp, train=Split(exp.train.x[rows], exp.train.y[rows]))


def estimate_run(cfg: RunConfig) -> Estimate:
    """Time a few batches of ``cfg`` and extrapolate to the whole run (see the module docstring)."""
    from cl.data.benchmark import build_benchmark
    from cl.engine.loop import Inputs, _training_data, _with_strategy
    from cl.models.backbone import check_input, create_backbone, hub_input_hint
    from cl.registry import STRATEGIES
    from cl.utils import DEFAULT_THREADS, autocast_forward, resolve_device, seed_everything

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    disk.configure_loader(cfg.loader.options(device.type))
    seed_everything(cfg.seed)
    images = build_benchmark(cfg.benchmark, cfg.resolved_data_root(), cfg.seed, hub_input_hint(cfg.backbone))
    random_cfg = cfg.backbone.model_copy(update={"weights": cfg.backbone.weights.model_copy(update={"source": "none", "pretrain": None})})
    with torch_threads(cfg.num_threads or DEFAULT_THREADS):
        backbone = create_backbone(random_cfg, images.transform, seed=cfg.seed)
        backbone.model.to(device)
        check_input(backbone, images.input_shape, device)
    if cfg.precision != "fp32":
        autocast_forward(backbone.model, device, cfg.precision)
    est = Estimate(device.type, cfg.precision, PROBE_BATCH)
    strategy_cls = STRATEGIES.get(cfg.strategy.name)
    features = strategy_cls.wants_features(cfg.strategy) and backbone.frozen and cfg.backbone.cache_features
    exps = images.experiences
    n_train, n_test = len(images.source.y_train), len(images.source.y_test)
    rss_before = peak_rss_mb()

    # decoding of streamed images (the loader's workers share it)
    x0 = exps[0].train.x
    decode_s = 0.0
    if isinstance(x0, DiskImages):
        rows = [torch.arange(min(PROBE_BATCH, len(x0)))]
        decode_s = _timed(lambda: list(x0.iterate(rows)), device) / len(rows[0]) / max(1, disk.LOADER.num_workers)
        est.notes.append(f"images streamed from disk; decoding {decode_s * 1e3:.2f} ms per image with {disk.LOADER.num_workers} worker(s)")

    # the backbone's forward pass on real images at the real size
    pool = exps[0].train
    backbone.set_train(False)

    def forward(b: int) -> Any:
        xb = next(pool.batches(b))[0]

        def call() -> None:
            with torch.no_grad():
                backbone.forward(backbone.transform(xb, device))
        return call

    fwd_s, _ = _per_sample(forward, cfg.train.eval_batch_size, len(pool), device)
    est.per_sample_s["backbone forward"] = fwd_s
    if features:
        est.samples["feature extraction"] = n_train + n_test
        est.per_sample_s["feature extraction"] = max(fwd_s, decode_s)
        est.seconds["feature extraction"] = (n_train + n_test) * est.per_sample_s["feature extraction"]
        dim = backbone.feature_dim
        est.disk_gb["feature cache"] = (n_train + n_test) * dim * (2 if cfg.backbone.cache_dtype == "float16" else 4) / 2**30
        g = torch.Generator().manual_seed(0)
        bench = images.with_inputs(torch.randn(n_train, dim, generator=g), torch.randn(n_test, dim, generator=g))
    else:
        bench = images
    inputs = Inputs(bench, images, backbone, {"feature_cache": "probe" if features else None})
    prep = _with_strategy(cfg, inputs, bench)
    strategy = prep.strategy

    # training: the strategy's own step on stream batches, per sample, x the samples it will see. Timed
    # on the second experience when there is one (replay, distillation, new heads at work), after a
    # one-step first experience on a few samples.
    online = cfg.benchmark.scenario == "online"
    batch = cfg.benchmark.online.batch_size if online else cfg.train.batch_size
    exp = bench.experiences[0]
    if len(bench.experiences) > 1 and not strategy.trains_itself:
        first = _shrunk(exp, min(batch, PROBE_BATCH))
        strategy.before_experience(first)
        for x, y in first.train.batches(len(first.train)):
            strategy.observe(x, y, first.task_id)
        strategy.after_experience(first)
        exp = bench.experiences[1]
    strategy.before_experience(exp)
    data = _training_data(bench, exp.index, strategy.data_policy)

    def step(b: int) -> Any:
        x, y = next(data.batches(b, torch.Generator().manual_seed(0)))
        return lambda: strategy.observe(x, y, exp.task_id)

    train_s = None if strategy.trains_itself else _per_sample(step, batch, len(data), device)[0]
    epochs = 1 if online else min(cfg.train.epochs, strategy.max_epochs or cfg.train.epochs)
    seen = sum(len(_training_data(bench, i, strategy.data_policy)) for i in range(len(bench.experiences)))
    if cfg.train.max_steps is not None:
        seen = min(seen, len(bench.experiences) * cfg.train.max_steps * batch)
    if train_s is None:
        est.notes.append(f"{cfg.strategy.name} trains itself (whole experiences): its training is not timed")
    else:
        est.samples["training"] = seen * epochs
        est.per_sample_s["training"] = train_s + (0.0 if features else decode_s)
        est.seconds["training"] = seen * epochs * est.per_sample_s["training"]

    # evaluation: predict on test batches; each experience's test set after every experience from its own on
    strategy.after_experience(_shrunk(exp, min(batch, PROBE_BATCH)))

    def predict(b: int) -> Any:
        tb = next(exp.test.batches(b))[0]
        return lambda: strategy.predict(tb, None)

    pred_s = _per_sample(predict, cfg.train.eval_batch_size, len(exp.test), device)[0] + (0.0 if features else decode_s)
    k = len(bench.experiences)
    per_exp = [len(e.test) for e in bench.experiences]
    evaluated = sum(per_exp) * (k + 1) if cfg.train.eval_future_tasks else sum(n * (k - j) for j, n in enumerate(per_exp))
    if bench.has_validation:
        evaluated += sum(len(e.val) for e in bench.experiences) * k  # type: ignore[arg-type]
    est.samples["evaluation"] = evaluated
    est.per_sample_s["evaluation"] = pred_s
    est.seconds["evaluation"] = evaluated * pred_s

    buffer = io.BytesIO()
    torch.save(strategy.state_dict(), buffer)
    if cfg.train.checkpoint and strategy.resumable:
        est.disk_gb["checkpoints (last + previous)"] = 2 * buffer.getbuffer().nbytes / 2**30
    est.peak_rss_gb = max(peak_rss_mb(), rss_before) / 1024
    if device.type == "cuda":
        est.peak_gpu_gb = torch.cuda.max_memory_allocated() / 2**30
    if device.type == "cuda":
        est.notes.append(f"steps too slow to time at the run's batch size were timed at {PROBE_BATCH}: an upper bound on a GPU")
    if cfg.backbone.weights.source == "pretrain":
        est.notes.append("pretraining the backbone (if not cached) is not included")
    return est
