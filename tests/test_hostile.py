"""What attacking the framework found: each case reproduced through the CLI, then made impossible.

Relabelled data that hashes the same, symlinks planted inside run and report folders, runs nested in
runs, a foreign run.json, partial datasets, non-finite numbers, exponential ``base:`` fan-out, YAML
1.1 integers, suites inheriting suites, reserved names, argparse's multi-line errors.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from cl.cli import main
from tests.conftest import tiny_config, write_yaml
from tests.test_trust import cli, one_line_error, tree


def _images(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    from PIL import Image

    for split, classes in layout.items():
        for c, n in classes.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("L", (8, 8), color=(37 * i + 11 * ord(c[-1])) % 256).save(root / split / c / f"img{i:02d}.png")
    return root


def test_relabelled_images_that_hash_the_same_are_another_dataset(tmp: Path, capsys):
    root = _images(tmp / "imgs", {"train": {"c0": 6, "c1": 6, "c2": 6, "c3": 6}, "test": {"c0": 3, "c1": 3, "c2": 3, "c3": 3}})
    config = tiny_config(tmp, strategy={"name": "simplecil"}, backbone={"name": "test_resnet", "weights": {"source": "none"}},
                         benchmark={"dataset": {"name": "image_folder", "root": str(root), "image_size": 8, "channels": 1}, "n_experiences": 2})
    path = write_yaml(tmp / "cfg.yaml", config)
    assert cli(capsys, "run", str(path), "--stop-after", "1")[0] == 0
    for i in range(3):  # same bytes in the same order, other labels
        (root / "train" / "c0" / f"img{i:02d}.png").rename(root / "train" / "c1" / f"aa{i:02d}.png")
    code, _, err = cli(capsys, "run", str(path), "--resume")
    one_line_error(code, err, "holds an unfinished run of another config (data fingerprint)")


def test_symlinks_planted_in_a_run_directory_are_never_written_through(tmp: Path, shared_cache: Path, capsys):
    victim = tmp / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("x" * 1000)
    path = write_yaml(tmp / "cfg.yaml", tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "er", "memory_size": 24}))
    assert cli(capsys, "run", str(path), "--stop-after", "1")[0] == 0
    run_dir = tmp / "runs" / "tiny" / "er" / "seed0"
    (run_dir / "log.jsonl").unlink()
    (run_dir / "log.jsonl").symlink_to(victim / "precious.txt")
    code, _, err = cli(capsys, "run", str(path), "--resume")
    one_line_error(code, err, "log.jsonl is a symlink inside a run directory; refusing to write through it")
    assert (victim / "precious.txt").read_text() == "x" * 1000
    # --overwrite removes the link, never its target
    assert cli(capsys, "run", str(path), "--overwrite")[0] == 0
    assert (victim / "precious.txt").read_text() == "x" * 1000 and not (run_dir / "log.jsonl").is_symlink()


def test_symlinks_planted_in_a_report_folder_are_replaced_not_followed(tmp: Path, shared_cache: Path, capsys):
    victim = tmp / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("USER NOTES")
    write_yaml(tmp / "base.yaml", tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "simplecil"}))
    suite = write_yaml(tmp / "suite.yaml", {"suite": "s", "config": "base.yaml", "strategies": [{"name": "ncm"}]})
    (tmp / "runs" / "s").mkdir(parents=True)
    (tmp / "runs" / "s" / "report.html").symlink_to(victim / "notes.txt")
    assert cli(capsys, "sweep", str(suite))[0] == 0
    assert (victim / "notes.txt").read_text() == "USER NOTES"
    assert not (tmp / "runs" / "s" / "report.html").is_symlink()
    shutil.rmtree(tmp / "runs" / "s" / "plots")
    (tmp / "runs" / "s" / "plots").symlink_to(victim)
    code, _, err = cli(capsys, "sweep", str(suite))
    one_line_error(code, err, "plots is a symlink; refusing to write the report through it")
    assert sorted(p.name for p in victim.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("how", ["experiment", "out"])
def test_a_run_inside_another_run_directory_is_refused(tmp: Path, shared_cache: Path, capsys, how: str):
    path = write_yaml(tmp / "cfg.yaml", tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "simplecil"}))
    assert cli(capsys, "run", str(path))[0] == 0
    outer = tmp / "runs" / "tiny" / "simplecil" / "seed0"
    before = tree(outer)
    args = ["--set", "experiment=tiny/simplecil/seed0"] if how == "experiment" else ["--out", str(outer)]
    code, _, err = cli(capsys, "run", str(path), *args)
    one_line_error(code, err, f"would lie inside the run directory {outer}")
    assert tree(outer) == before


@pytest.mark.parametrize("marker", ['{"tool": "other"}', '{"identity": "not-a-dict"}', "{trunc"])
def test_overwrite_never_deletes_a_directory_with_a_foreign_run_json(tmp: Path, shared_cache: Path, capsys, marker: str):
    foreign = tmp / "runs" / "tiny" / "simplecil" / "seed0"
    foreign.mkdir(parents=True)
    (foreign / "run.json").write_text(marker)
    (foreign / "data.csv").write_text("important")
    path = write_yaml(tmp / "cfg.yaml", tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "simplecil"}))
    for extra in ([], ["--overwrite"], ["--resume"]):
        code, _, err = cli(capsys, "run", str(path), *extra)
        one_line_error(code, err, "so " + str(foreign) + " may not be ours; refusing to write into or delete it")
    assert (foreign / "data.csv").read_text() == "important"


@pytest.mark.parametrize("sets, message", [
    ([f"backbone.kwargs.{'.'.join(['a'] * 300)}=1"], "a key path is up to 16 names"),
    (["foo\nbar=1"], "a key path is up to 16 names"),
    (["strategy.lr=.inf"], "'strategy.lr': Input should be a finite number"),
    (["strategy.lr=.nan"], "'strategy.lr': Input should be a finite number"),
    (["backbone.weights.pretrain.lr=.inf"], "Input should be a finite number"),
])
def test_bad_set_values_are_one_line(tmp: Path, shared_cache: Path, capsys, sets, message):
    path = write_yaml(tmp / "cfg.yaml", tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "er", "memory_size": 24}))
    code, _, err = cli(capsys, "run", str(path), *[a for s in sets for a in ("--set", s)])
    one_line_error(code, err, message)
    assert not (tmp / "runs").exists()


@pytest.mark.parametrize("strategy, message", [
    ({"name": "ranpac", "projection_dim": 50, "ridge_grid": [-1.0]}, "'strategy.ridge_grid.0': Input should be greater than 0"),
    ({"name": "generative_classifier", "memory_size": 20, "hidden_dims": [-5]}, "'strategy.hidden_dims.0': Input should be greater than or equal to 1"),
    ({"name": "confit", "stage_fractions": [0.2, 1.5]}, "'strategy.stage_fractions.1': Input should be less than or equal to 1"),
])
def test_list_options_are_validated_before_the_run(tmp: Path, shared_cache: Path, capsys, strategy, message):
    path = write_yaml(tmp / "cfg.yaml", tiny_config(tmp, cache_dir=str(shared_cache), strategy=strategy))
    code, _, err = cli(capsys, "run", str(path))
    one_line_error(code, err, message)
    assert not (tmp / "runs").exists()


def test_an_allocation_too_large_for_the_machine_is_one_line(tmp: Path, shared_cache: Path, capsys):
    config = tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "simplecil"},
                         benchmark={"dataset": {"name": "synthetic", "n_classes": 6, "image_size": 2_000_000}})
    code, _, err = cli(capsys, "run", str(write_yaml(tmp / "cfg.yaml", config)))
    one_line_error(code, err, "out of memory: a size in the config")
    assert not (tmp / "runs").exists()


@pytest.mark.parametrize("damage, message", [
    ("missing_classes", "no train samples of classes 'Sandal', 'Shirt', 'Sneaker' and 2 more; every class needs train and test samples"),
    ("test_labels_subset", "no test samples of classes"),
])
def test_a_dataset_without_every_class_is_one_line(tmp: Path, shared_cache: Path, capsys, damage, message):
    import numpy as np

    from tests.test_data import write_idx

    root = tmp / "fm"
    root.mkdir()
    rng = np.random.default_rng(0)
    train_labels = np.arange(50) % (5 if damage == "missing_classes" else 10)
    test_labels = np.arange(30) % (10 if damage == "missing_classes" else 5)
    write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (50, 28, 28)))
    write_idx(root / "train-labels-idx1-ubyte.gz", train_labels)
    write_idx(root / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (30, 28, 28)))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", test_labels)
    config = tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "simplecil"},
                         benchmark={"dataset": {"name": "fashion_mnist", "root": str(root)}, "n_experiences": 5})
    code, _, err = cli(capsys, "run", str(write_yaml(tmp / "cfg.yaml", config)))
    one_line_error(code, err, message)


@pytest.mark.parametrize("damage, message", [
    ("no_space", "images.txt:2: expected '<id> <value>'"),
    ("missing_label", "image id '2' is missing from a metadata file"),
    ("label_not_int", "malformed metadata"),
    ("bad_split", "malformed metadata (image 1: split '7'"),
])
def test_malformed_cub_metadata_is_one_line(tmp: Path, capsys, damage, message):
    base = _images(tmp / "cub" / "CUB_200_2011" / "images", {"a": {"c1": 2}})
    lines = {"images.txt": ["1 a/c1/img00.png", "2 a/c1/img01.png"], "image_class_labels.txt": ["1 1", "2 1"], "train_test_split.txt": ["1 1", "2 0"]}
    if damage == "no_space":
        lines["images.txt"][1] = "2a/c1/img01.png"
    elif damage == "missing_label":
        lines["image_class_labels.txt"] = ["1 1"]
    elif damage == "label_not_int":
        lines["image_class_labels.txt"][0] = "1 one"
    else:
        lines["train_test_split.txt"][0] = "1 7"
    for name, rows in lines.items():
        (base.parent / name).write_text("\n".join(rows) + "\n")
    config = tiny_config(tmp, strategy={"name": "simplecil"},
                         benchmark={"dataset": {"name": "cub200", "root": str(tmp / "cub"), "image_size": 8, "download": False},
                                    "n_experiences": 2, "channels": 1})
    code, _, err = cli(capsys, "run", str(write_yaml(tmp / "cfg.yaml", config)))
    one_line_error(code, err, message)


def test_base_fan_out_is_read_once_per_file(tmp: Path, shared_cache: Path, capsys):
    write_yaml(tmp / "f0.yaml", tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "simplecil"}))
    for i in range(1, 30):
        write_yaml(tmp / f"f{i}.yaml", {"base": [f"f{i - 1}.yaml", f"f{i - 1}.yaml"]})
    start = time.perf_counter()
    assert cli(capsys, "run", str(tmp / "f29.yaml"), "--dry-run")[0] == 0
    assert time.perf_counter() - start < 5
    for i in range(30, 70):
        write_yaml(tmp / f"f{i}.yaml", {"base": f"f{i - 1}.yaml"})
    code, _, err = cli(capsys, "run", str(tmp / "f69.yaml"))
    one_line_error(code, err, "'base' inheritance reaches more than 64 files")


def test_yaml_12_integers(tmp: Path):
    from cl.yamlio import parse_yaml_text

    assert parse_yaml_text("a: 010\nb: 0o10\nc: 0x14\nd: 1:30\ne: -7\n", "t") == {"a": 10, "b": 8, "c": 20, "d": "1:30", "e": -7}


def test_joint_in_the_task_incremental_scenario_masks_each_sample_to_its_own_task(tmp: Path, shared_cache: Path, capsys):
    import torch

    from cl.config import parse_run_config
    from cl.engine.loop import prepare
    from cl.strategies.base import masked_cross_entropy

    config = tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "joint", "lr": 0.05}, benchmark={"scenario": "task_incremental"})
    prep = prepare(parse_run_config(config))
    joint, exps = prep.strategy, prep.bench.experiences
    joint.before_experience(exps[0])
    joint.before_experience(exps[1])  # cumulative data of tasks 0 and 1, observed with task id 1
    x = torch.cat([exps[0].train.x[:4], exps[1].train.x[:4]])
    y = torch.cat([exps[0].train.y[:4], exps[1].train.y[:4]])
    with torch.no_grad():
        logits = joint.head(joint.encode(x))
    lo = torch.tensor([0] * 4 + [2] * 4)
    expected = masked_cross_entropy(logits, y, lo, lo + 2)  # by hand: task 0 -> classes 0,1; task 1 -> 2,3
    assert joint.observe(x, y, 1)["loss"] == pytest.approx(float(expected), rel=1e-6)
    code, _, err = cli(capsys, "run", str(write_yaml(tmp / "cfg.yaml", config)))
    assert code == 0, err  # it used to stop: "loss term 'loss' became inf"


def test_a_suite_inheriting_a_suite_finds_its_config_beside_the_file_that_names_it(tmp: Path, shared_cache: Path):
    from cl.engine.sweep import plan_suite

    write_yaml(tmp / "base.yaml", tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "simplecil"}))
    write_yaml(tmp / "suite.yaml", {"suite": "s", "config": "base.yaml", "strategies": [{"name": "ncm"}]})
    (tmp / "sub").mkdir()
    write_yaml(tmp / "sub" / "base.yaml", tiny_config(tmp, train={"epochs": 7}))  # a decoy beside the child
    write_yaml(tmp / "sub" / "child.yaml", {"base": "../suite.yaml", "suite": "child"})
    suite, planned = plan_suite(tmp / "sub" / "child.yaml")
    assert suite.config == str(tmp / "base.yaml") and planned[0].cfg.train.epochs == 2


@pytest.mark.parametrize("change, message", [
    ({"config": "suite.yaml"}, "is a suite, not a run config"),
    ({"strategies": [{"name": "report.html"}]}, "'report.html' is the name of a report file in the suite folder"),
    ({"strategies": [{"name": "plots"}]}, "'plots' is the name of a report file"),
])
def test_suites_refused_at_planning(tmp: Path, shared_cache: Path, capsys, change, message):
    write_yaml(tmp / "base.yaml", tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "simplecil"}))
    suite = write_yaml(tmp / "suite.yaml", {"suite": "s", "config": "base.yaml", "strategies": [{"name": "ncm"}], **change})
    code, _, err = cli(capsys, "sweep", str(suite))
    one_line_error(code, err, message)
    assert not (tmp / "runs").exists()


@pytest.mark.parametrize("dry", [True, False])
def test_a_sweep_into_a_file_or_over_a_foreign_directory_is_refused_at_planning(tmp: Path, shared_cache: Path, capsys, dry: bool):
    write_yaml(tmp / "base.yaml", tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "simplecil"}))
    suite = write_yaml(tmp / "suite.yaml", {"suite": "s", "config": "base.yaml", "strategies": [{"name": "ncm"}, {"name": "ft", "overrides": {"strategy": {"name": "finetune"}}}]})
    (tmp / "afile").write_text("x")
    extra = ["--dry-run"] if dry else []
    code, _, err = cli(capsys, "sweep", str(suite), "--out", str(tmp / "afile"), *extra)
    one_line_error(code, err, "is a file; out_dir must be a directory")
    foreign = tmp / "runs" / "s" / "ft" / "seed0"
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("mine")
    code, _, err = cli(capsys, "sweep", str(suite), "--overwrite", *extra)
    one_line_error(code, err, "has no run.json")
    assert (foreign / "mine.txt").read_text() == "mine" and not (tmp / "runs" / "s" / "ncm").exists()


def test_an_unreachable_ray_address_fails_in_seconds(tmp: Path, shared_cache: Path, capsys):
    write_yaml(tmp / "base.yaml", tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "simplecil"}))
    suite = write_yaml(tmp / "suite.yaml", {"suite": "s", "config": "base.yaml", "strategies": [{"name": "ncm"}]})
    start = time.perf_counter()
    code, _, err = cli(capsys, "sweep", str(suite), "--executor", "ray", "--ray-address", "127.0.0.1:1")
    assert time.perf_counter() - start < 10
    one_line_error(code, err, "--ray-address: cannot reach 127.0.0.1:1")
    assert not (tmp / "runs").exists()


@pytest.mark.parametrize("argv, message", [
    (["run", "x.yaml", "--stop-after", "x"], "error: cl run: argument --stop-after: invalid int value: 'x'"),
    (["bogus"], "error: cl: argument command: invalid choice: 'bogus'"),
    (["run"], "error: cl run: the following arguments are required: config"),
    (["compare", "runs", "--out", ""], "error: --out: give a directory for the report"),
    (["run", "new\nline.yaml"], "new\\nline.yaml"),
])
def test_command_line_errors_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        code = main(argv)
        raise SystemExit(code)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_a_failed_download_leaves_no_directories(tmp: Path, capsys, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        Path(args[0], "cifar-10-batches-py", "partial").mkdir(parents=True)  # what a download creates before failing
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    config = tiny_config(tmp, strategy={"name": "simplecil"}, data_root=str(tmp / "data" / "x"),
                         benchmark={"dataset": {"name": "cifar10"}, "n_experiences": 5})
    code, _, err = cli(capsys, "run", str(write_yaml(tmp / "cfg.yaml", config)))
    one_line_error(code, err, "download failed")
    assert not (tmp / "data").exists()


def test_dry_run_of_an_unfinished_run_says_what_the_run_would_say(tmp: Path, shared_cache: Path, capsys):
    path = write_yaml(tmp / "cfg.yaml", tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "er", "memory_size": 24}))
    assert cli(capsys, "run", str(path), "--stop-after", "1")[0] == 0
    code, _, err = cli(capsys, "run", str(path), "--dry-run")
    one_line_error(code, err, "holds an unfinished run; pass --resume to continue it")
    code, out, _ = cli(capsys, "run", str(path), "--dry-run", "--resume")
    assert code == 0 and out.rstrip().endswith("-> resume")


def test_a_long_run_name_with_overrides_still_fits_a_folder_name(tmp: Path, shared_cache: Path, capsys):
    long = "r" * 110
    path = write_yaml(tmp / "cfg.yaml", tiny_config(tmp, cache_dir=str(shared_cache), run_name=long, strategy={"name": "er", "memory_size": 24}))
    code, out, _ = cli(capsys, "run", str(path), "--dry-run", "--set", "strategy.lr=0.5")
    name = yaml.safe_load("\n".join(ln for ln in out.splitlines() if not ln.startswith("#")))["run_name"]
    assert code == 0 and name.startswith(long[:109] + ",") and len(name) <= 120 and "+h" in name


# ---- second round: caches, finished runs, compare and shift on damaged runs, full disks -----------------


def test_backbone_kwargs_that_add_no_weights_still_key_the_feature_cache(tmp: Path, capsys):
    base = tiny_config(tmp, strategy={"name": "simplecil"}, backbone={"name": "test_resnet", "weights": {"source": "none", "pretrain": None}})
    results = {}
    for name, pool, cache in (("avg", "avg", "c1"), ("max", "max", "c1"), ("max_cold", "max", "c2")):
        config = {**base, "run_name": name, "cache_dir": str(tmp / cache), "backbone": {**base["backbone"], "kwargs": {"global_pool": pool}}}
        assert cli(capsys, "run", str(write_yaml(tmp / f"{name}.yaml", config)))[0] == 0
        results[name] = json.loads((tmp / "runs" / "tiny" / name / "seed0" / "metrics.json").read_text())
    assert results["max"]["feature_cache"] == "miss"  # not the avg-pool features of the shared cache
    assert results["max"]["acc_matrix"] == results["max_cold"]["acc_matrix"]


@pytest.mark.parametrize("damage", ["swapped", "empty_object", "string_number"])
def test_a_finished_run_reports_only_its_own_metrics(tmp: Path, shared_cache: Path, capsys, damage: str):
    for name, lr in (("a", 0.01), ("b", 0.1)):
        config = tiny_config(tmp, cache_dir=str(shared_cache), run_name=name, strategy={"name": "er", "memory_size": 24, "lr": lr})
        assert cli(capsys, "run", str(write_yaml(tmp / f"{name}.yaml", config)))[0] == 0
    a = tmp / "runs" / "tiny" / "a" / "seed0" / "metrics.json"
    if damage == "swapped":
        shutil.copy(tmp / "runs" / "tiny" / "b" / "seed0" / "metrics.json", a)
    elif damage == "empty_object":
        a.write_text("{}")
    else:
        a.write_text(json.dumps({**json.loads(a.read_text()), "final_acc": "0.99"}))
    code, _, err = cli(capsys, "run", str(tmp / "a.yaml"), "--resume")
    expected = "is unreadable or belongs to another run" if damage != "string_number" else "is not this run's metrics (final_acc is not a number)"
    one_line_error(code, err, expected)


def test_pretraining_is_keyed_by_its_thread_count(tmp: Path, capsys):
    config = tiny_config(tmp, strategy={"name": "simplecil"}, num_threads=1)
    path = write_yaml(tmp / "cfg.yaml", config)
    code, out, _ = cli(capsys, "pretrain", str(path))
    assert code == 0 and "(miss," in out
    assert cli(capsys, "run", str(path))[0] == 0
    env = json.loads((tmp / "runs" / "tiny" / "simplecil" / "seed0" / "env.json").read_text())
    assert env["backbone"]["cache"] == "hit" and env["backbone"]["threads"] == 1
    code, out, _ = cli(capsys, "pretrain", str(path), "--set", "num_threads=2")
    assert code == 0 and "(miss," in out  # another thread count is another cache entry


def test_a_diverged_pretraining_below_the_explosion_bound_is_still_refused(tmp: Path, capsys):
    config = tiny_config(tmp, strategy={"name": "simplecil"},
                         backbone={"name": "test_resnet", "weights": {"source": "pretrain", "pretrain": {"epochs": 2, "lr": 30.0}}})
    code, _, err = cli(capsys, "run", str(write_yaml(tmp / "cfg.yaml", config)))
    assert code in (1, 2) and err.startswith("error: ") and ("pretraining diverged" in err or "non-finite features" in err), err
    assert not list((tmp / "cache").rglob("*.safetensors")) and not (tmp / "runs").exists()


def test_compare_reports_each_row_in_its_own_scenario(tmp: Path, shared_cache: Path, capsys):
    for name, scenario in (("b_cil", "class_incremental"), ("a_til", "task_incremental")):
        config = tiny_config(tmp, cache_dir=str(shared_cache), run_name=name, strategy={"name": "finetune", "lr": 0.05},
                             benchmark={"scenario": scenario})
        assert cli(capsys, "run", str(write_yaml(tmp / f"{name}.yaml", config)))[0] == 0
    code, out, _ = cli(capsys, "compare", str(tmp / "runs"), "--out", str(tmp / "rep"))
    metrics = {n: json.loads((tmp / "runs" / "tiny" / n / "seed0" / "metrics.json").read_text()) for n in ("a_til", "b_cil")}
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.startswith(("a_til", "b_cil"))}
    assert code == 0 and rows["a_til"][2] == "task-aware" and rows["b_cil"][2] == "class-incremental"
    assert float(rows["a_til"][3]) == pytest.approx(100 * metrics["a_til"]["task_aware"]["final_acc"], abs=0.05)
    assert float(rows["b_cil"][3]) == pytest.approx(100 * metrics["b_cil"]["final_acc"], abs=0.05)


def test_compare_never_pools_runs_on_different_weight_files(tmp: Path, capsys):
    import timm
    import torch
    from safetensors.torch import save_file

    for seed, name in ((0, "w0"), (1, "w1")):
        torch.manual_seed(seed)
        save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet", num_classes=0, in_chans=1).state_dict().items()}, str(tmp / f"{name}.safetensors"))
        config = tiny_config(tmp, seed=seed, out_dir=str(tmp / f"out{seed}"), strategy={"name": "simplecil"},
                             backbone={"name": "test_resnet", "weights": {"source": "file", "path": str(tmp / f"{name}.safetensors")}})
        assert cli(capsys, "run", str(write_yaml(tmp / f"{name}.yaml", config)))[0] == 0
    code, out, _ = cli(capsys, "compare", str(tmp / "out0"), str(tmp / "out1"), "--out", str(tmp / "rep"))
    rows = [ln for ln in out.splitlines() if ln.startswith("simplecil")]
    assert code == 0 and len(rows) == 2 and all("weights_sha256=" in r for r in rows), out


DAMAGED_METRICS = [
    ("stored_bytes_strings", {"stored_bytes": ["a"]}),
    ("memory_bytes_string", {"memory_bytes": "x"}),
    ("matrix_missing_a_row", "drop_row"),
    ("anytime_not_lists", {"anytime": 5}),
    ("zero_test_samples", {"n_test_per_task": [0, 0, 0]}),
]


@pytest.mark.parametrize("case, change", DAMAGED_METRICS, ids=[c for c, _ in DAMAGED_METRICS])
def test_compare_skips_runs_with_damaged_fields(tmp: Path, shared_cache: Path, capsys, case, change):
    for name in ("good", "bad"):
        config = tiny_config(tmp, cache_dir=str(shared_cache), run_name=name, strategy={"name": "simplecil"})
        assert cli(capsys, "run", str(write_yaml(tmp / f"{name}.yaml", config)))[0] == 0
    path = tmp / "runs" / "tiny" / "bad" / "seed0" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics = {**metrics, "acc_matrix": metrics["acc_matrix"][:-1]} if change == "drop_row" else {**metrics, **change}
    path.write_text(json.dumps(metrics))
    with pytest.warns(UserWarning, match="skipping .*bad/seed0: unreadable"):
        code, out, err = cli(capsys, "compare", str(tmp / "runs"), "--out", str(tmp / "rep"))
    assert code == 0 and "good" in out and "bad" not in out and "Traceback" not in err


@pytest.mark.parametrize("damage, message", [
    ("other_examples", "probes other examples of task0 than exp0"),
    ("swapped", "holds tasks [0, 1], expected 0..0"),
    ("badly_named", "not named exp<k>.safetensors"),
    ("cut_features", "has shape"),
])
def test_shift_refuses_probe_files_that_do_not_belong_together(tmp: Path, shared_cache: Path, capsys, damage, message):
    from safetensors.torch import load_file, save_file

    runs = {}
    for per_class in (3, 5):
        config = tiny_config(tmp, cache_dir=str(shared_cache), run_name=f"p{per_class}", strategy={"name": "simplecil"},
                             shift={"enabled": True, "per_class": per_class})
        assert cli(capsys, "run", str(write_yaml(tmp / f"p{per_class}.yaml", config)))[0] == 0
        runs[per_class] = tmp / "runs" / "tiny" / f"p{per_class}" / "seed0"
    probes = runs[5] / "probes"
    if damage == "other_examples":
        shutil.copy(runs[3] / "probes" / "exp1.safetensors", probes / "exp1.safetensors")
    elif damage == "swapped":
        (probes / "exp0.safetensors").rename(probes / "tmp.safetensors")
        (probes / "exp1.safetensors").rename(probes / "exp0.safetensors")
        (probes / "tmp.safetensors").rename(probes / "exp1.safetensors")
    elif damage == "badly_named":
        (probes / "exp2.safetensors").rename(probes / "exp-1.safetensors")
    else:
        tensors = load_file(str(probes / "exp1.safetensors"))
        key = next(k for k in tensors if k.startswith("task0/feat/"))
        save_file({**tensors, key: tensors[key][:-1].contiguous()}, str(probes / "exp1.safetensors"))
    code, _, err = cli(capsys, "shift", str(runs[5]))
    one_line_error(code, err, message)


@pytest.fixture
def tiny_disk(tmp: Path):
    """A real 300 KB filesystem (tmpfs), to fill up; skipped where mounting is not allowed."""
    import subprocess

    mount = tmp / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.parametrize("where", ["out_dir", "cache"])
def test_a_real_full_disk_is_one_line_or_costs_only_the_cache(tmp: Path, shared_cache: Path, capsys, tiny_disk: Path, where: str):
    (tiny_disk / "filler").write_bytes(b"\0" * 200_000)
    if where == "out_dir":
        config = tiny_config(tmp, cache_dir=str(shared_cache), out_dir=str(tiny_disk / "runs"), strategy={"name": "er", "memory_size": 24},
                             backbone={"name": "test_resnet", "trainable": "all", "cache_features": False,
                                       "weights": {"source": "pretrain", "pretrain": {"epochs": 2, "batch_size": 32}}})
        code, _, err = cli(capsys, "run", str(write_yaml(tmp / "cfg.yaml", config)))
        one_line_error(code, err, "No space left on device")
        assert not [p for p in tiny_disk.rglob("*") if p.name.endswith(".tmp")]
    else:
        config = tiny_config(tmp, cache_dir=str(tiny_disk / "cache"), strategy={"name": "simplecil"})
        with pytest.warns(UserWarning, match="could not"):
            code, out, err = cli(capsys, "run", str(write_yaml(tmp / "cfg.yaml", config)))
        assert code == 0 and "final_acc=" in out, err


def test_clearing_a_run_keeps_its_marker_until_it_is_replaced(tmp: Path):
    from cl.engine.rundir import MARKER, _clear

    run_dir = tmp / "r"
    (run_dir / "ckpt").mkdir(parents=True)
    for name in (MARKER, "metrics.json", "log.jsonl", "ckpt/last.pt"):
        (run_dir / name).write_text("x")
    _clear(run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == [MARKER]


def test_outcomes_hold_absolute_paths_so_compare_works_from_anywhere(tmp: Path, shared_cache: Path, capsys, monkeypatch):
    write_yaml(tmp / "base.yaml", tiny_config(tmp, cache_dir=str(shared_cache), out_dir="rel", strategy={"name": "simplecil"}))
    bad = {"name": "bad", "overrides": {"backbone": {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1},
                                                     "weights": {"source": "none", "pretrain": None}}, "strategy": {"name": "finetune"}}}
    suite = write_yaml(tmp / "suite.yaml", {"suite": "s", "config": "base.yaml", "strategies": [{"name": "ncm"}, bad]})
    monkeypatch.chdir(tmp)
    assert cli(capsys, "sweep", str(suite))[0] == 1
    outcomes = json.loads((tmp / "rel" / "s" / "outcomes.json").read_text())
    assert all(Path(o["run_dir"]).is_absolute() for o in outcomes)
    monkeypatch.chdir("/")
    code, out, _ = cli(capsys, "compare", str(tmp / "rel"), "--out", str(tmp / "rep"))
    assert code == 0 and out.count("bad seed 0: failed") == 1 and "unfinished" not in out, out


def test_provenance_never_writes_into_the_repository(monkeypatch):
    import subprocess

    from cl import utils

    seen = []
    real = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: (seen.append(args), real(args, **kw))[1])
    utils.git_info()
    assert seen and all(a[:2] == ["git", "--no-optional-locks"] for a in seen)


def test_resume_removes_temp_files_of_interrupted_writes_and_invalid_log_lines(tmp: Path, shared_cache: Path, capsys):
    path = write_yaml(tmp / "cfg.yaml", tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "er", "memory_size": 24}))
    assert cli(capsys, "run", str(path), "--stop-after", "1")[0] == 0
    run_dir = tmp / "runs" / "tiny" / "er" / "seed0"
    (run_dir / "ckpt" / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    log = run_dir / "log.jsonl"
    log.write_bytes(b"garbage\n" + log.read_bytes())
    assert cli(capsys, "run", str(path), "--resume")[0] == 0
    assert not list(run_dir.rglob("*.tmp"))
    events = [json.loads(line) for line in log.read_text().splitlines()]  # every line is JSON again
    assert next(e for e in events if e["event"] == "resume")["log_lines_dropped"] == 1


@pytest.mark.parametrize("case, message", [
    ("int_weights", "is torch.int64, the model holds torch.float32"),
    ("negative_variance", "running_var has negative variances"),
])
def test_weights_of_the_wrong_kind_are_refused(tmp: Path, capsys, case, message):
    import torch
    from safetensors.torch import save_file

    from tests.test_trust import _resnet_state

    state = _resnet_state()
    if case == "int_weights":
        state["layer1.0.conv1.weight"] = state["layer1.0.conv1.weight"].round().long()
    else:
        state["layer1.0.bn1.running_var"] = -torch.ones_like(state["layer1.0.bn1.running_var"])
    save_file(state, str(tmp / "w.safetensors"))
    config = tiny_config(tmp, strategy={"name": "simplecil"}, backbone={"name": "test_resnet", "weights": {"source": "file", "path": str(tmp / "w.safetensors")}})
    code, _, err = cli(capsys, "run", str(write_yaml(tmp / "cfg.yaml", config)))
    one_line_error(code, err, message)


def test_stop_after_with_a_strategy_that_cannot_checkpoint(tmp: Path, shared_cache: Path, capsys):
    config = tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "avalanche", "method": "naive"})
    code, _, err = cli(capsys, "run", str(write_yaml(tmp / "cfg.yaml", config)), "--stop-after", "1")
    one_line_error(code, err, "strategy 'avalanche' cannot be checkpointed")


def test_a_run_file_that_is_a_directory_is_refused_before_any_work(tmp: Path, shared_cache: Path, capsys):
    path = write_yaml(tmp / "cfg.yaml", tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "er", "memory_size": 24}))
    assert cli(capsys, "run", str(path), "--stop-after", "1")[0] == 0
    (tmp / "runs" / "tiny" / "er" / "seed0" / "metrics.json").mkdir()
    code, _, err = cli(capsys, "run", str(path), "--resume")
    one_line_error(code, err, "metrics.json is not a regular file")


def test_a_dry_run_writes_nothing_even_in_an_existing_run(tmp: Path, shared_cache: Path, capsys):
    path = write_yaml(tmp / "cfg.yaml", tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "er", "memory_size": 24}))
    assert cli(capsys, "run", str(path), "--stop-after", "1")[0] == 0

    def snapshot() -> dict:
        return {str(p): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in sorted(tmp.rglob("*"))}

    before = snapshot()
    assert cli(capsys, "run", str(path), "--dry-run", "--resume")[0] == 0
    assert cli(capsys, "run", str(path), "--dry-run", "--set", "strategy.lr=0.3")[0] == 0
    assert snapshot() == before
