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


def test_fake_data_root_serves_smoke_runs_only(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture):
    """`cl fake-data` writes marked fake trees: a smoke run reads them, a real run refuses them in one
    line and leaves nothing behind; it never writes into a folder that is not its own."""
    root = tmp_path / "fake"
    assert main(["fake-data", str(root), "cifar10"]) == 0
    assert (root / "FAKE_DATA").is_file() and (root / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert not list(root.glob(".writing-*"))
    assert main(["fake-data", str(root), "cifar10", "cub200"]) == 0  # idempotent, adds what is missing
    assert "already there: cifar10" in capsys.readouterr().out and (root / "CUB_200_2011" / "images.txt").is_file()
    config = EXPERIMENTS / "fmnist" / "b4inc2.yaml"
    common = ["--set", "benchmark.dataset={name: cifar10}", "--set", "benchmark.n_experiences=2", "--set", "benchmark.base_classes=null",
              "--set", f"data_root={root}", "--set", f"cache_dir={cache}", "--set", "progress=false", "--out", str(tmp_path / "runs")]
    assert main(["run", str(config), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fake data written by `cl fake-data`" in err[0] and "--smoke" in err[0], err
    assert not any((tmp_path / "runs").rglob("metrics.json")) and not (tmp_path / "runs" / "fmnist_b4inc2").exists()
    linked = tmp_path / "data"  # an unmarked data root whose dataset folder links into the fake root
    linked.mkdir()
    (linked / "cifar-10-batches-py").symlink_to(root / "cifar-10-batches-py")
    one_by_one = tmp_path / "data2" / "cifar-10-batches-py"  # ... or whose files do, one by one
    one_by_one.mkdir(parents=True)
    for f in (root / "cifar-10-batches-py").iterdir():
        (one_by_one / f.name).symlink_to(f)
    for data_root in (linked, one_by_one.parent):
        assert main(["run", str(config), *common, "--set", f"data_root={data_root}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "fake data written by `cl fake-data`" in err[0], err
    # --set smoke=true is not --smoke: refused, not a way around the refusal
    assert main(["run", str(config), *common, "--set", "smoke=true"]) == 2
    assert "smoke: true is set by --smoke" in capsys.readouterr().err
    # a dry run says what the run would say; a sweep refuses once, before anything is written
    assert main(["run", str(config), *common, "--dry-run"]) == 2
    assert "fake data" in capsys.readouterr().err
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"suite": "s", "config": str(config), "seeds": [0], "strategies": [{"name": "er", "overrides": {}}]}))
    assert main(["sweep", str(suite), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fake data" in err[0], err
    assert not any((tmp_path / "runs").rglob("metrics.json")) and not (tmp_path / "runs" / "s").exists()
    # a path through the fake root with '..' that leaves it is not fake
    (tmp_path / "plain").mkdir()
    assert main(["run", str(config), *common, "--set", f"data_root={root}/../plain", "--dry-run"]) == 0
    assert "fake data" not in capsys.readouterr().err
    assert main(["run", str(config), "--smoke", *common]) == 0
    [metrics] = (tmp_path / "runs" / "smoke").rglob("metrics.json")
    check_run_dir(metrics.parent)
    # a folder that is not a fake root is never written into; unknown names are one line
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    victim = tmp_path / "victim.txt"  # a marker that is a link is never written through
    victim.write_text("mine")
    trap = tmp_path / "trap"
    trap.mkdir()
    (trap / "FAKE_DATA").symlink_to(victim)
    for argv in (["fake-data", str(other)], ["fake-data", str(root), "mnist"], ["fake-data", str(trap), "cifar10"]):
        assert main(argv) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"] and victim.read_text() == "mine"
    assert sorted(p.name for p in trap.iterdir()) == ["FAKE_DATA"]
    # smoke rehearsals never share a comparison table with real runs
    real = tmp_path / "real_run"
    [smoke_metrics] = (tmp_path / "runs" / "smoke").rglob("metrics.json")
    real.mkdir()
    (real / "metrics.json").write_text(smoke_metrics.read_text().replace('"smoke": true', '"smoke": false'))
    (real / "config.yaml").write_text((smoke_metrics.parent / "config.yaml").read_text().replace("smoke: true", "smoke: false"))
    assert main(["compare", str(tmp_path / "runs"), str(real), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--smoke rehearsals" in err[0] and not (tmp_path / "report").exists()


def test_each_file_kind_given_to_the_wrong_command_names_the_right_one(capsys: pytest.CaptureFixture):
    for argv, want in ((["sweep", str(EXPERIMENTS / "peft" / "cifar100_b0inc10.yaml"), "--smoke", "--dry-run"], "cl run"),
                       (["sweep", str(EXPERIMENTS / "base.yaml"), "--dry-run"], "cl run"),
                       (["sweep", str(EXPERIMENTS / "tuning" / "cil_fmnist.yaml"), "--dry-run"], "cl tune"),
                       (["run", str(EXPERIMENTS / "tuning" / "cil_fmnist.yaml"), "--dry-run"], "cl tune"),
                       (["run", str(EXPERIMENTS / "quickstart.yaml"), "--dry-run"], "cl sweep")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"`{want} " in err[0], (argv, err)


def test_smoke_shortens_a_compensator_distillation_but_not_a_given_file(tmp_path: Path):
    config = EXPERIMENTS / "peft" / "base_vit_fmnist.yaml"
    trained = load_cli_config(str(config), ["backbone.tome={r_eval: 4, compensator: {epochs: 10, batch_size: 64}}"], str(tmp_path), smoke=True)
    assert trained.backbone.tome.compensator.epochs == 1 and trained.backbone.tome.compensator.batch_size == 8
    assert trained.backbone.tome.r_eval == 4  # the rest of the section is the config's own
    given = load_cli_config(str(config), [f"backbone.tome={{r_eval: 4, compensator: {{path: {tmp_path / 'c.safetensors'}, epochs: 10}}}}"],
                            str(tmp_path), smoke=True)
    assert given.backbone.tome.compensator.epochs == 10  # a file is loaded, not trained: nothing to shorten
