"""Command line: ``cl run | sweep | tune | compare | pretrain | fetch | fake-data | shift | describe | list`` (also ``python -m cl``).

Input errors (bad config, missing data, unusable weights, run directory in the wrong state) are
printed as one line and exit with code 2; no traceback, no run directory left behind.
"""

from __future__ import annotations

import argparse
import fnmatch
import shlex
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, Sequence

from cl.errors import TrainingDiverged, UserError
from cl.registry import PluginError, UnknownNameError

if TYPE_CHECKING:
    from cl.config import RunConfig


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    parser.add_argument("--out", default=None, help="root directory of run outputs (config key out_dir)")
    _import_option(parser)


def _import_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE|FILE.py",
                        help="a module or .py file registering strategies, datasets or PEFT methods (repeatable; config key plugins)")


def _imports(args: argparse.Namespace) -> list[str]:
    """``--import`` values as config ``plugins`` entries (files made absolute), imported here already."""
    from cl.plugins import absolute_specs, import_plugins

    given = getattr(args, "imports", [])
    if any(not s.strip() for s in given):
        raise UserError("--import: an empty module name or path")
    specs = absolute_specs(given, Path.cwd())
    import_plugins(specs)
    return specs


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one line, exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(_one_line(f"error: {self.prog}: {message} (see {self.prog} --help)"), file=sys.stderr)
        raise SystemExit(2)


# `cl run --help` / `cl sweep --help`: the keys most runs change (tests check each exists)
COMMON_KEYS = """common --set keys (every option: cl describe NAME; the full schema: README "Configs"):
  seed=0                              the run's seed (its folder seedN)
  out_dir=runs  data_root=...  cache_dir=...
  device=cpu|cuda|mps|auto            precision=fp32|bf16|fp16
  benchmark.dataset.name=fashion_mnist|digits|cifar100|...   (cl list benchmarks)
  benchmark.n_experiences=5           benchmark.base_classes=...   benchmark.scenario=class_incremental|task_incremental|online|domain_incremental
  benchmark.train_per_class=...       benchmark.test_per_class=...
  backbone.name=resnet18|vit_base_patch16_224|...   backbone.trainable=none|batchnorm|last_blocks|all   backbone.weights.source=pretrain|file|hub|none
  strategy.name=er|finetune|simplecil|...           strategy.lr=0.01   strategy.memory_size=200   (cl list strategies; cl describe er)
  train.epochs=1  train.batch_size=64  train.lr_schedule=constant|cosine|step  train.warmup_steps=0  train.grad_clip_norm=...
  train.label_smoothing=0.1           train.augment={}   (images only)
  loggers.tensorboard=true            loggers.wandb={}   loggers.mlflow={}
  progress=false                      plugins=[./my_strategy.py]   (or --import)"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cl", description="Continual learning on pretrained timm backbones.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("run", help="run one experiment config", epilog=COMMON_KEYS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    _common(p)
    p.add_argument("--resume", action="store_true", help="continue an unfinished run of the same config (or report a finished one)")
    p.add_argument("--overwrite", action="store_true", help="replace the run in the run directory (only one this framework created)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N", help="stop after N experiences (resumable)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and what would happen to its run directory")
    p.add_argument("--estimate", action="store_true", help="with --dry-run: time a few batches and print the run's estimated time, memory and disk")
    p.add_argument("--smoke", action="store_true", help="rehearse: real architecture and input size, a few samples and steps, into OUT/smoke")

    p = sub.add_parser("sweep", help="run a suite (benchmarks x strategies x seeds) and compare", epilog=COMMON_KEYS,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite")
    _common(p)
    p.add_argument("--overwrite", action="store_true", help="re-run finished runs instead of reusing them")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (local processes or Ray tasks sharing the cores)")
    p.add_argument("--executor", choices=["local", "ray", "slurm"], default="local")
    p.add_argument("--format", dest="formats", action="append", default=[], choices=["svg", "pdf"],
                   help="also write the report's figures in this format beside the PNGs (repeatable)")
    p.add_argument("--slurm-partition", default=None)
    p.add_argument("--slurm-time", type=int, default=240, metavar="MIN", help="wall-time limit per run (minutes)")
    p.add_argument("--slurm-gpus", type=int, default=0, help="GPUs per run")
    p.add_argument("--slurm-cpus", type=int, default=4, help="CPU cores per run")
    p.add_argument("--slurm-mem", type=int, default=None, metavar="GB")
    p.add_argument("--slurm-parallel", type=int, default=None, help="array tasks running at once")
    p.add_argument("--ray-address", default=None, help="existing Ray cluster ('auto', 'ray://host:10001'); default: a local instance")
    p.add_argument("--dry-run", action="store_true", help="list every run directory and whether it would be run, resumed or reused")
    p.add_argument("--estimate", action="store_true", help="with --dry-run: estimate each entry's time, memory and disk (first seed, timed)")
    p.add_argument("--smoke", action="store_true", help="rehearse every run: real architectures, a few samples and steps, into OUT/smoke")

    p = sub.add_parser("tune", help="hyper-parameter search on validation data (the test set is sealed)")
    p.add_argument("tune_file")
    _common(p)
    p.add_argument("--trials", type=int, default=None, help="trials per study (default: the file's)")
    p.add_argument("--overwrite", action="store_true", help="start the studies again instead of resuming them")

    p = sub.add_parser("compare", help="compare finished runs: tables over seeds, plots, HTML report")
    p.add_argument("paths", nargs="+", help="run directories, or directories containing them")
    p.add_argument("--out", default="report", help="output directory (default: ./report)")
    p.add_argument("--title", default="Comparison")
    p.add_argument("--baseline", default=None, help="a row name: add every row's paired difference to it, with 95%% intervals")
    p.add_argument("--format", dest="formats", action="append", default=[], choices=["svg", "pdf"],
                   help="also write every figure in this format beside its PNG (repeatable)")

    p = sub.add_parser("pretrain", help="build and cache the pretrained backbone of a config")
    p.add_argument("config")
    _common(p)

    p = sub.add_parser("tocom", help="train (or find cached) the ToCom token compensator of a config's backbone.tome.compensator")
    p.add_argument("config")
    p.add_argument("--save", default=None, metavar="FILE.safetensors", help="also copy it here (for backbone.tome.compensator.path)")
    _common(p)

    p = sub.add_parser("fetch", help="download what a config needs (dataset, hub weights) into the caches, without running it")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value (repeatable)")
    _import_option(p)

    p = sub.add_parser("fake-data", help="write tiny fake datasets in their official layouts, for --smoke where the data are absent")
    p.add_argument("root", help="directory to write (new, empty, or an earlier fake-data root); then --set data_root=ROOT")
    p.add_argument("datasets", nargs="*", metavar="DATASET", help="default: all of cifar10 cifar100 cub200 imagenet_r imagenet_a domainnet")

    p = sub.add_parser("shift", help="representational-shift tables and plots of a run with saved probes")
    p.add_argument("run_dir")
    p.add_argument("--kernel", choices=["linear", "rbf"], default="linear")
    p.add_argument("--debiased", action="store_true", help="debiased HSIC (for small probe sets)")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/shift)")
    p.add_argument("--format", dest="formats", action="append", default=[], choices=["svg", "pdf"],
                   help="also write every figure in this format beside its PNG (repeatable)")

    p = sub.add_parser("describe", help="every option of a strategy, dataset or PEFT method (type, default, description)")
    p.add_argument("name", help="e.g. er, cifar100, lora (see cl list)")
    _import_option(p)

    p = sub.add_parser("list", help="list registered names")
    p.add_argument("family", choices=["benchmarks", "backbones", "strategies", "peft"])
    p.add_argument("pattern", nargs="?", default="*", help="glob filter, e.g. 'resnet*'")
    _import_option(p)
    return parser


def load_cli_config(path: str, overrides: list[str], out: str | None, smoke: bool = False, imports: list[str] | None = None) -> RunConfig:
    """A run config as ``cl run`` sees it: YAML, then ``--set`` (which names the run), then ``--out``,
    then ``--import``, then the smoke rewrite (``--smoke``)."""
    from cl.api import load_config

    return load_config(path, overrides, out_dir=out, smoke=smoke, plugins=imports or ())


def _cmd_run(args: argparse.Namespace) -> int:
    from cl.engine.loop import run

    if args.stop_after is not None and args.stop_after < 1:
        raise UserError(f"--stop-after must be >= 1, got {args.stop_after}")
    cfg = load_cli_config(args.config, args.overrides, args.out, args.smoke, _imports(args))
    if args.estimate and not args.dry_run:
        raise UserError("--estimate goes with --dry-run")
    if args.dry_run:
        return _dry_run(cfg, args)
    metrics = run(cfg, resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after)
    if metrics is None:
        print(f"stopped after {args.stop_after} experience(s); continue with --resume: {cfg.run_dir()}")
        return 0
    acc = metrics["task_aware"] if metrics["scenario"] == "task_incremental" else metrics
    forgetting = acc["forgetting"]
    print(
        f"{cfg.run_dir()}: final_acc={acc['final_acc']:.4f} avg_incremental_acc={acc['avg_incremental_acc']:.4f} "
        f"forgetting={'n/a' if forgetting is None else f'{forgetting:.4f}'} wall_time={metrics['wall_time_s']:.1f}s"
    )
    return 0


def _dry_run(cfg: RunConfig, args: argparse.Namespace) -> int:
    from cl.config import config_to_dict
    from cl.engine.rundir import check_before_run, planned_state
    from cl.yamlio import yaml_text

    print(yaml_text(config_to_dict(cfg)).rstrip())
    check_before_run(cfg, resume=args.resume, overwrite=args.overwrite)  # the same refusals as the real run
    if args.overwrite:
        action = "run (overwrite)"
    else:
        state, _ = planned_state(cfg)
        resumable = any((cfg.run_dir() / "ckpt").glob("*.pt"))
        action = {"new": "run", "finished": "report the finished run (if data and weights match)",
                  "unfinished": "resume" if resumable else "restart (it stopped before its first checkpoint)"}[state]
    print(f"# run directory: {cfg.run_dir()} -> {action}")
    if args.estimate:
        from cl.engine.estimate import estimate_run

        print("\n".join(f"# {line}" for line in estimate_run(cfg).lines()))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from cl.engine.rundir import check_report_dir
    from cl.engine.sweep import check_plan, check_ray_address, plan_states, plan_suite, report_dir, run_suite

    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    if args.estimate and not args.dry_run:
        raise UserError("--estimate goes with --dry-run")
    if args.dry_run:
        suite, planned = plan_suite(args.suite, args.overrides, args.out, args.smoke, _imports(args))
        for run, (state, why) in zip(planned, plan_states(planned, args.overwrite)):
            print(f"{state:<16} {run.cfg.run_dir()}" + (f"  ({why})" if why else ""))
        check_plan(planned, args.overwrite)
        check_report_dir(report_dir(suite, planned, args.overrides), planned[0].cfg.out_dir)
        if args.executor == "ray":
            check_ray_address(args.ray_address)
        if args.executor == "slurm":
            from cl.engine.slurm import check_slurm

            _slurm_options(args)
            check_slurm()
        if args.estimate:
            _estimate_suite(suite, planned)
        return 0
    text, outcomes = run_suite(args.suite, args.overrides, args.out, overwrite=args.overwrite,
                               jobs=args.jobs, executor=args.executor, ray_address=args.ray_address, smoke=args.smoke,
                               slurm=_slurm_options(args), imports=_imports(args), formats=args.formats)
    print(text)
    failed = [o for o in outcomes if not o["ok"]]
    if failed:
        print(f"{len(failed)} of {len(outcomes)} runs failed:\n" + "\n".join(f"  {o['run_dir']}: {o['error']}" for o in failed))
    return 1 if failed else 0


def _estimate_suite(suite, planned) -> None:  # noqa: ANN001
    from cl.engine.estimate import human_time, estimate_run

    total = 0.0
    seeds = len(suite.seeds)
    for planned_run in (p for p in planned if p.seed == suite.seeds[0]):
        est = estimate_run(planned_run.cfg)
        total += est.total_s * seeds
        label = "/".join(x for x in (planned_run.benchmark, planned_run.strategy) if x)
        print(f"# {label}: {human_time(est.total_s)} per seed x {seeds}, peak {est.peak_rss_gb:.2f} GB RSS, "
              + ", ".join(f"{k} {v:.3f} GB" for k, v in est.disk_gb.items()))
    print(f"# estimated total: {human_time(total)} run one after another (divide by --jobs for parallel runs on enough cores/GPUs)")


def _slurm_options(args: argparse.Namespace):  # noqa: ANN202
    if args.executor != "slurm":
        return None
    from pydantic import ValidationError

    from cl.engine.slurm import SlurmOptions

    try:
        return SlurmOptions(partition=args.slurm_partition, time_min=args.slurm_time, gpus=args.slurm_gpus, cpus=args.slurm_cpus,
                            mem_gb=args.slurm_mem, parallel=args.slurm_parallel)
    except ValidationError as err:
        first = err.errors()[0]
        flag = {"time_min": "time", "mem_gb": "mem"}.get(str(first["loc"][0]), str(first["loc"][0]))
        raise UserError(f"--slurm-{flag}: {first['msg']}") from None


def _cmd_tune(args: argparse.Namespace) -> int:
    from cl.engine.tune import tune

    if args.imports:  # trials are planned from the tuning file's config alone, in other processes too
        raise UserError("cl tune --import: list the plugin under `plugins:` in the run config the tuning file names")
    if args.trials is not None and args.trials < 1:
        raise UserError(f"--trials must be >= 1, got {args.trials}")
    summary = tune(args.tune_file, args.overrides, args.out, trials=args.trials, overwrite=args.overwrite)
    for name, st in summary["studies"].items():
        print(f"{name}: best validation {summary['objective'].split()[-1]} {st['best_value']:.4f} with {st['best_params']} "
              f"({st['complete']} complete, {st['pruned']} pruned, {st['wall_time_s']:.1f}s)")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from cl.analysis.report import discover_runs, write_report

    if not args.out.strip():
        raise UserError("--out: give a directory for the report")
    records = discover_runs(args.paths)
    if not records:
        raise UserError(f"no run directories found under {', '.join(args.paths)}")
    smoke = [r for r in records if _is_smoke(r)]
    if smoke and len(smoke) < len(records):  # a rehearsal's numbers are not measurements: never in one table
        raise UserError(f"{len(smoke)} of {len(records)} runs are --smoke rehearsals (e.g. {smoke[0].path}): compare them apart from real runs")
    title = f"{args.title} (smoke rehearsals: not measurements)" if smoke else args.title
    print(write_report(records, args.out, title, args.baseline, args.formats))
    return 0


def _is_smoke(record: object) -> bool:
    metrics = getattr(record, "metrics", None) or {}
    if metrics.get("smoke") is True:
        return True
    if getattr(record, "path", None) is None:
        return False
    config = Path(record.path) / "config.yaml"
    try:
        import yaml

        return config.is_file() and (yaml.safe_load(config.read_text()) or {}).get("smoke") is True
    except (OSError, yaml.YAMLError, AttributeError):
        return False


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from cl.engine.loop import prepare_inputs

    cfg = load_cli_config(args.config, args.overrides, args.out, imports=_imports(args))
    if cfg.backbone.weights.source != "pretrain":
        raise UserError(f"backbone.weights.source is '{cfg.backbone.weights.source}'; nothing to pretrain")
    w = prepare_inputs(cfg, want_features=False).backbone.weights  # the same threads and cache entry as a run
    print(f"{w.get('path')} sha256={w['sha256']} ({w.get('cache')}, pretrained on {w.get('pretrained_on')})")
    return 0


def _cmd_tocom(args: argparse.Namespace) -> int:
    from cl.engine.loop import prepare_inputs

    cfg = load_cli_config(args.config, args.overrides, args.out, imports=_imports(args))
    tome = cfg.backbone.tome
    if tome is None or tome.compensator is None:
        raise UserError("backbone.tome.compensator is not set; nothing to train (e.g. --set backbone.tome.compensator={})")
    backbone = prepare_inputs(cfg, want_features=False).backbone  # the same threads and cache entry as a run
    info = backbone.weights["tome"]["compensator"]
    if args.save:  # also when the cache could not be written (no path): the compensator itself is saved
        from cl.models.tocom import export_compensator

        export_compensator(backbone.tome, Path(args.save))
    curve = ", ".join(f"{h['loss']:.4g}" for h in info.get("history") or [])
    print(f"{args.save or info.get('path')} sha256={info['sha256']} ({info.get('cache') or 'file'}; backbone sha256={info['backbone_sha256']}"
          f"{'; loss per epoch: ' + curve if curve else ''})")
    return 0


def _cmd_shift(args: argparse.Namespace) -> int:
    from cl.analysis.shift import analyse_run

    from cl.analysis.plots import also_save_as

    with also_save_as(args.formats):
        summary = analyse_run(args.run_dir, debiased=args.debiased, kernel=args.kernel, out=args.out)
    print(f"after experience {summary['last_experience'] + 1}, mean over old tasks:")
    for layer, v in summary["layers"].items():
        cka = "-" if v["cka"] is None else f"{v['cka']:.3f}"
        drift = "-" if v["prototype_rel_l2"] is None else f"{v['prototype_rel_l2']:.3f}"
        print(f"  {layer:<24} CKA {cka}  prototype drift {drift}")
    print(f"tables and plots in {args.out or Path(args.run_dir) / 'shift'}")
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    """For login nodes with internet: fill the data root and the Hugging Face cache for a config,
    so that compute nodes without internet find everything there."""
    from cl.data.benchmark import build_benchmark
    from cl.models.backbone import create_backbone, hub_input_hint

    cfg = load_cli_config(args.config, args.overrides, None, imports=_imports(args))
    bench = build_benchmark(cfg.benchmark, cfg.resolved_data_root(), cfg.seed, hub_input_hint(cfg.backbone))
    src = bench.source
    print(f"dataset {cfg.benchmark.dataset.name}: {src.origin} ({len(src.y_train)} train, {len(src.y_test)} test images)")
    if cfg.backbone.weights.source == "hub":
        backbone = create_backbone(cfg.backbone, bench.transform, seed=cfg.seed)
        print(f"weights {cfg.backbone.name}: {backbone.weights.get('hf_hub_id') or backbone.weights.get('url')} cached (sha256 {backbone.weights['sha256'][:16]}...)")
    else:
        print(f"weights: source '{cfg.backbone.weights.source}', nothing to download")
    return 0


def _cmd_fake_data(args: argparse.Namespace) -> int:
    """Fake trees for smoke rehearsals without the data (e.g. `cl sweep SUITE --smoke --set data_root=ROOT`)."""
    from cl.data.fakes import FAKE_DATASETS, write_fake_root

    root = Path(args.root).expanduser()
    written = write_fake_root(root, args.datasets or FAKE_DATASETS)
    kept = sorted(set(args.datasets or FAKE_DATASETS) - set(written))
    print(f"fake data in {root}: wrote {', '.join(written) or 'nothing'}" + (f"; already there: {', '.join(kept)}" if kept else "")
          + f". Only --smoke runs read it: --smoke --set data_root={shlex.quote(str(root))}")
    return 0


def _cmd_describe(args: argparse.Namespace) -> int:
    from cl.describe import describe

    _imports(args)
    print("\n".join(describe(args.name)))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from cl.plugins import listing
    from cl.registry import BACKBONES, BENCHMARKS, PEFT, STRATEGIES

    _imports(args)
    if args.family == "backbones":  # every architecture timm knows: this one imports timm (and torch)
        rows = BACKBONES.describe()
    else:  # names and help from entry points and source text: nothing is imported
        rows = listing({"benchmarks": BENCHMARKS, "strategies": STRATEGIES, "peft": PEFT}[args.family])
    rows = [(n, h) for n, h in rows if fnmatch.fnmatch(n, args.pattern)]
    width = max((len(n) for n, _ in rows), default=0)
    for name, text in rows:
        print(f"{name:<{width}}  {text}".rstrip())
    if not rows:
        print(f"(no {args.family} match '{args.pattern}')")
    return 0


COMMANDS = {
    "run": _cmd_run, "sweep": _cmd_sweep, "tune": _cmd_tune, "compare": _cmd_compare, "pretrain": _cmd_pretrain, "tocom": _cmd_tocom, "fetch": _cmd_fetch, "fake-data": _cmd_fake_data, "shift": _cmd_shift, "describe": _cmd_describe, "list": _cmd_list,
}


def _one_line(text: str) -> str:
    """Control characters (a newline in a path or key) shown escaped, so a message stays one line."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def _one_line_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> str:
    return _one_line(f"warning: {message}") + "\n"


class Terminated(BaseException):
    """SIGTERM: unwind like Ctrl-C (locks released, temporary files removed, atexit handlers run)."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def _is_out_of_memory(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and ("allocate" in text and "memory" in text))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message="no QP solver found")
    warnings.formatwarning = _one_line_warning
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() else None
    try:
        return _dispatch(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _dispatch(args: argparse.Namespace) -> int:

    def fail(message: str, code: int = 2) -> int:
        print(_one_line(f"error: {message}"), file=sys.stderr)
        return code

    try:
        return COMMANDS[args.command](args)
    except (UserError, UnknownNameError, PluginError) as err:
        return fail(str(err))
    except TrainingDiverged as err:
        return fail(str(err), 1)
    except OSError as err:  # a full disk, a read-only or missing directory: the environment, not a bug
        where = f": {err.filename}" if err.filename else ""
        return fail(f"{err.strerror or type(err).__name__}{where}")
    except (MemoryError, RuntimeError) as err:
        if not _is_out_of_memory(err):
            raise
        return fail("out of memory: a size in the config (samples, image size, dimensions) is too large for this machine")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143


if __name__ == "__main__":
    raise SystemExit(main())
