"""``--smoke`` rehearses every shipped config end to end, so none can rot unnoticed.

Each run config under experiments/ and one seed of every suite entry runs with ``--smoke`` (real
architecture and input size, a few samples, two steps per experience) into a temporary directory.
Datasets that cannot be downloaded here get tiny fake trees in their official layouts, and hub
weights are replaced by random ones (``backbone.weights.source=none``): the rehearsal covers shapes,
data pipeline, strategy and run directory, not the weights. The GPU-scale configs (ViT-B/16 and
ResNets at 224 px) are rehearsed on their first 2 experiences, the only other change, to keep this
file to a few minutes on 2 CPU cores; `cl run CONFIG --smoke` runs them whole (README, "Running at
scale").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cl.cli import load_cli_config, main
from cl.config import load_yaml, read_yaml
from cl.engine.loop import run
from cl.engine.sweep import plan_suite
from tests.fakes import write_cifar, write_cub, write_domainnet, write_image_folder, write_imagenet_variant

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
RUNS = sorted(p for p in EXPERIMENTS.rglob("*.yaml") if p.name != "base.yaml" and "tuning" not in p.parts and "suite" not in read_yaml(p))
SUITES = sorted(p for p in EXPERIMENTS.glob("*.yaml") if "suite" in read_yaml(p))
OFFLINE = {"fashion_mnist", "digits", "synthetic"}


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fake_data")
    write_cifar(root, 100, per_file=400)
    write_cub(root)
    write_image_folder(root / "image_folder", 200)
    write_imagenet_variant(root, "imagenet-r", "folders")
    write_domainnet(root, domains=("real", "quickdraw"))
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("smoke_cache")


def smoke_overrides(path: Path, fake: Path, cache: Path) -> list[str]:
    benchmark = load_yaml(path)["benchmark"]
    dataset = benchmark["dataset"]["name"]
    out = [f"cache_dir={cache}", "progress=false"]
    gpu_scale = dataset not in OFFLINE
    if gpu_scale:
        out += [f"data_root={fake}", "backbone.weights.source=none", "benchmark.n_experiences=2"]
        if benchmark["dataset"].get("image_size", 0) is None:  # the hub tag's size, without the hub
            out.append("benchmark.dataset.image_size=224")
        if benchmark.get("scenario") == "domain_incremental":  # one experience per domain: the first two
            out.append("benchmark.dataset.domains=[real,quickdraw]")
    if dataset == "image_folder":
        out.append(f"benchmark.dataset.root={fake / 'image_folder'}")
    return out


def check_run_dir(run_dir: Path) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["smoke"] is True and metrics["final_acc"] is not None
    assert (run_dir / "config.yaml").is_file() and (run_dir / "run.json").is_file()
    assert "/smoke/" in str(run_dir)  # never beside real results


def _marks(path: Path) -> pytest.param:
    """ViT-B/16 at 224 px costs ~0.25 s per image forward on 2 CPU cores: about 5 minutes per config
    even smoked, so those are marked slow (run with ``pytest -m slow``)."""
    slow = load_yaml(path)["backbone"]["name"].startswith("vit_base")
    return pytest.param(path, marks=[pytest.mark.slow] if slow else [], id=str(path.relative_to(EXPERIMENTS)))


@pytest.mark.parametrize("path", [_marks(p) for p in RUNS])
def test_every_run_config_smokes(path: Path, tmp_path: Path, fake_data: Path, cache: Path):
    cfg = load_cli_config(str(path), smoke_overrides(path, fake_data, cache), str(tmp_path / "runs"), smoke=True)
    assert cfg.smoke and cfg.train.max_steps == 2 and cfg.benchmark.test_per_class == 1
    run(cfg)
    check_run_dir(cfg.run_dir())


def _suite_base(path: Path) -> Path:
    return path.parent / read_yaml(path)["config"]


@pytest.mark.parametrize("path", [pytest.param(p, marks=_marks(_suite_base(p)).marks, id=p.name) for p in SUITES])
def test_every_suite_entry_smokes(path: Path, tmp_path: Path, fake_data: Path, cache: Path):
    overrides = smoke_overrides(_suite_base(path), fake_data, cache)
    suite, planned = plan_suite(path, overrides, str(tmp_path / "runs"), smoke=True)
    first = [p for p in planned if p.seed == suite.seeds[0]]
    for planned_run in first:
        run(planned_run.cfg)
        check_run_dir(planned_run.cfg.run_dir())


def test_smoke_from_the_command_line_writes_a_separate_complete_run(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture):
    config = EXPERIMENTS / "fmnist" / "b4inc2.yaml"
    assert main(["run", str(config), "--smoke", "--out", str(tmp_path), "--set", f"cache_dir={cache}", "--set", "progress=false"]) == 0
    run_dir = tmp_path / "smoke" / "fmnist_b4inc2" / "er" / "seed0"
    check_run_dir(run_dir)
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert all(e["steps"] <= 2 for e in log if e["event"] == "epoch")
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["smoke"] is True and resolved["benchmark"]["train_per_class"] == 4
    # a real run of the same config goes elsewhere: nothing to refuse, nothing mixed
    assert main(["run", str(config), "--dry-run", "--out", str(tmp_path), "--set", f"cache_dir={cache}"]) == 0
    assert str(tmp_path / "fmnist_b4inc2" / "er" / "seed0") in capsys.readouterr().out


def test_fetch_fills_nothing_offline_and_says_why_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture):
    config = EXPERIMENTS / "peft" / "cifar100_b0inc10.yaml"
    empty = tmp_path / "data"
    assert main(["fetch", str(config), "--set", f"data_root={empty}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CIFAR-100 not found" in err[0] and "download failed" in err[0]
    assert not any(empty.rglob("*")) if empty.exists() else True  # no half-downloaded files left behind


def test_fetch_reports_a_dataset_that_is_there(tmp_path: Path, fake_data: Path, capsys: pytest.CaptureFixture):
    config = EXPERIMENTS / "peft" / "cifar100_b0inc10.yaml"
    assert main(["fetch", str(config), "--set", f"data_root={fake_data}", "--set", "backbone.weights.source=none"]) == 0
    out = capsys.readouterr().out
    assert "dataset cifar100:" in out and "400 train, 400 test images" in out and "nothing to download" in out


def test_smoke_never_nests_and_hostile_slurm_options_are_one_line(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture):
    config = EXPERIMENTS / "fmnist" / "b4inc2.yaml"
    cfg = load_cli_config(str(config), [f"cache_dir={cache}"], str(tmp_path / "smoke"), smoke=True)
    assert Path(cfg.out_dir) == tmp_path / "smoke"  # --out already a smoke root: not smoke/smoke
    suite = EXPERIMENTS / "quickstart.yaml"
    for flag, value in (("--slurm-cpus", "0"), ("--slurm-mem", "0"), ("--slurm-parallel", "0")):
        assert main(["sweep", str(suite), "--executor", "slurm", flag, value, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag in err[0], err
    assert not (tmp_path / "x").exists()
