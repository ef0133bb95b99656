"""Trustworthy results: every case of the trust review, through the CLI, with its exact outcome.

A run directory belongs to exactly one resolved config (with its data and weights); nothing outside
``out_dir`` is created or deleted; bad input is one line with exit code 2 and no run directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cl.cli import main
from cl.config import parse_run_config
from cl.engine.loop import run
from cl.errors import RunDirError
from tests.conftest import tiny_config, write_yaml

ROOT = Path(__file__).resolve().parent.parent


def cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, message: str, expected_code: int = 2) -> None:
    lines = [ln for ln in err.splitlines() if not ln.startswith("warning: ")]
    assert code == expected_code, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert message in lines[0], err


def tree(root: Path) -> set[str]:
    """Every path below ``root`` (to prove nothing was created or deleted)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def er_config(tmp: Path, cache: Path, **overrides) -> dict:
    return tiny_config(tmp, cache_dir=str(cache), strategy={"name": "er", "memory_size": 24, "lr": 0.01}, **overrides)


# ---- 1. an edited suite is never reused as the new config's result ------------------------------


def _suite(tmp: Path, cache: Path, lr: float, memory: int, seeds=(0,)) -> Path:
    write_yaml(tmp / "base.yaml", tiny_config(tmp, cache_dir=str(cache), strategy={"name": "finetune"}))
    strategies = [{"name": "er", "overrides": {"strategy": {"name": "er", "lr": lr, "memory_size": memory}}},
                  {"name": "ncm", "overrides": {"strategy": {"name": "simplecil"}}}]
    return write_yaml(tmp / "suite.yaml", {"suite": "s", "config": "base.yaml", "seeds": list(seeds), "strategies": strategies})


def test_an_edited_suite_is_refused_not_reused_then_overwrite_reruns(tmp: Path, shared_cache: Path, capsys):
    path = _suite(tmp, shared_cache, 0.01, 20)
    assert cli(capsys, "sweep", str(path))[0] == 0
    metrics = tmp / "runs" / "s" / "er" / "seed0" / "metrics.json"
    before = metrics.read_bytes()
    _suite(tmp, shared_cache, 5.0, 100)
    code, _, err = cli(capsys, "sweep", str(path))
    one_line_error(code, err, "holds a finished run of another config (strategy.lr: 0.01 -> 5.0; strategy.memory_size: 20 -> 100); pass --overwrite to replace it")
    assert metrics.read_bytes() == before
    code, out, _ = cli(capsys, "sweep", str(path), "--dry-run")
    assert code == 2 and "refuse" in out and "reuse" in out  # ncm is unchanged: it would be reused
    assert cli(capsys, "sweep", str(path), "--overwrite")[0] == 0
    saved = yaml.safe_load((metrics.parent / "config.yaml").read_text())
    assert saved["strategy"]["lr"] == 5.0 and saved["strategy"]["memory_size"] == 100
    assert json.loads(metrics.read_text())["memory_size"] == 100


def test_a_sweep_with_set_overrides_runs_in_its_own_directories(tmp: Path, shared_cache: Path, capsys):
    path = _suite(tmp, shared_cache, 0.01, 20)
    code, out, _ = cli(capsys, "sweep", str(path), "--dry-run", "--set", "train.epochs=1", "--set", "progress=false")
    assert code == 0
    assert f"run              {tmp / 'runs' / 's' / 'er,train.epochs=1' / 'seed0'}" in out
    assert "ncm,train.epochs=1" in out and "progress" not in out  # volatile keys do not rename
    assert not (tmp / "runs").exists()  # a dry run writes nothing
    assert cli(capsys, "sweep", str(path), "--set", "train.epochs=1")[0] == 0
    assert cli(capsys, "sweep", str(path))[0] == 0  # the suite as written: its own runs and report
    root = tmp / "runs" / "s"
    assert (root / "summary.md").is_file() and (root / "report,train.epochs=1" / "summary.md").is_file()
    assert "er,train.epochs=1" in (root / "report,train.epochs=1" / "summary.md").read_text()
    assert "er,train.epochs=1" not in (root / "summary.md").read_text()


# ---- 2. --resume never mixes configs, data or weights ---------------------------------------------


def test_resume_with_other_set_values_on_a_finished_run_runs_the_new_config(tmp: Path, shared_cache: Path, capsys):
    path = write_yaml(tmp / "cfg.yaml", er_config(tmp, shared_cache))
    assert cli(capsys, "run", str(path))[0] == 0
    old = json.loads((tmp / "runs" / "tiny" / "er" / "seed0" / "metrics.json").read_text())
    code, out, _ = cli(capsys, "run", str(path), "--resume", "--set", "strategy.lr=0.5")
    assert code == 0 and "tiny/er,strategy.lr=0.5/seed0" in out
    new_dir = tmp / "runs" / "tiny" / "er,strategy.lr=0.5" / "seed0"
    assert yaml.safe_load((new_dir / "config.yaml").read_text())["strategy"]["lr"] == 0.5
    assert json.loads((new_dir / "metrics.json").read_text())["acc_matrix"] != old["acc_matrix"]
    # the same directory named explicitly: refused, naming the key
    code, _, err = cli(capsys, "run", str(path), "--resume", "--set", "strategy.lr=0.5", "--set", "run_name=er")
    one_line_error(code, err, "holds a finished run of another config (strategy.lr: 0.01 -> 0.5); pass --overwrite")


def test_resume_of_an_unfinished_run_whose_config_yaml_was_deleted_is_still_checked(tmp: Path, shared_cache: Path, capsys):
    path = write_yaml(tmp / "cfg.yaml", er_config(tmp, shared_cache))
    assert cli(capsys, "run", str(path), "--stop-after", "1")[0] == 0
    run_dir = tmp / "runs" / "tiny" / "er" / "seed0"
    (run_dir / "config.yaml").unlink()
    code, _, err = cli(capsys, "run", str(path), "--resume", "--set", "train.epochs=3", "--set", "run_name=er")
    one_line_error(code, err, "holds an unfinished run of another config (train.epochs: 2 -> 3); pass --overwrite")
    # run.json gone too: the directory is no longer known to be ours, so nothing is written or deleted
    (run_dir / "run.json").unlink()
    files = tree(run_dir)
    code, _, err = cli(capsys, "run", str(path), "--resume", "--overwrite")
    one_line_error(code, err, "has no run.json, so it was not created by this version of cl")
    assert tree(run_dir) == files


def test_the_checkpoint_identity_is_verified(tmp: Path, shared_cache: Path, capsys):
    config = er_config(tmp, shared_cache)
    path = write_yaml(tmp / "cfg.yaml", config)
    assert cli(capsys, "run", str(path), "--stop-after", "1")[0] == 0
    run_dir = tmp / "runs" / "tiny" / "er" / "seed0"
    # forge run.json to match another config: the checkpoint still knows better
    other = parse_run_config({**config, "train": {**config["train"], "epochs": 3}})
    from cl.engine.loop import prepare
    from cl.engine.rundir import result_config, run_identity

    prep = prepare(other)
    marker = json.loads((run_dir / "run.json").read_text())
    marker["identity"] = run_identity(other, prep.images.content_sha256(), prep.backbone.weights["sha256"])
    marker["config"] = result_config(other)
    (run_dir / "run.json").write_text(json.dumps(marker))
    write_yaml(path, {**config, "train": {**config["train"], "epochs": 3}})
    code, _, err = cli(capsys, "run", str(path), "--resume")
    one_line_error(code, err, "the checkpoint belongs to another config, data or backbone")


def test_resume_on_other_data_is_refused(tmp: Path, shared_cache: Path, capsys):
    from tests.test_data import make_fmnist_dir

    make_fmnist_dir(tmp / "a" / "fashion-mnist", n_train=60)
    make_fmnist_dir(tmp / "b" / "fashion-mnist", n_train=70)
    config = tiny_config(tmp, cache_dir=str(shared_cache), data_root=str(tmp / "a"), strategy={"name": "simplecil"},
                         benchmark={"dataset": {"name": "fashion_mnist", "download": False}, "n_experiences": 5})
    path = write_yaml(tmp / "cfg.yaml", config)
    assert cli(capsys, "run", str(path), "--stop-after", "1")[0] == 0
    code, _, err = cli(capsys, "run", str(path), "--resume", "--set", f"data_root={tmp / 'b'}")
    one_line_error(code, err, "holds an unfinished run of another config (data fingerprint")
    assert cli(capsys, "run", str(path), "--resume")[0] == 0  # the same data: continues


def test_resume_with_changed_weights_file_is_refused(tmp: Path, shared_cache: Path, capsys):
    import timm
    from safetensors.torch import save_file

    def weights(seed: int) -> None:
        torch.manual_seed(seed)
        model = timm.create_model("test_resnet", num_classes=0, in_chans=1)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "w.safetensors"))

    weights(1)
    config = tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "simplecil"},
                         backbone={"name": "test_resnet", "weights": {"source": "file", "path": str(tmp / "w.safetensors")}})
    path = write_yaml(tmp / "cfg.yaml", config)
    assert cli(capsys, "run", str(path), "--stop-after", "1")[0] == 0
    weights(2)
    code, _, err = cli(capsys, "run", str(path), "--resume")
    one_line_error(code, err, "(backbone weights sha256); pass --overwrite")


# ---- 3. runs that would share a directory are refused at planning ---------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--set", "seed=7"], "would write the same run directory"),
    (["--set", "run_name=x"], "would write the same run directory"),
    (["--set", "seed=7", "--jobs", "2"], "would write the same run directory"),
])
def test_set_seed_or_run_name_on_a_sweep_is_refused(tmp: Path, shared_cache: Path, capsys, extra, message):
    path = _suite(tmp, shared_cache, 0.01, 20, seeds=(0, 1, 2))
    code, _, err = cli(capsys, "sweep", str(path), *extra)
    one_line_error(code, err, message)
    assert not (tmp / "runs").exists()


@pytest.mark.parametrize("seeds, message", [([0, 0], "seeds must be distinct (repeated: 0)"),
                                            ([2**64], "less than or equal to 4294967295"), ([-1], "greater than or equal to 0")])
def test_suite_seeds_are_distinct_and_bounded(tmp: Path, shared_cache: Path, capsys, seeds, message):
    path = _suite(tmp, shared_cache, 0.01, 20)
    data = yaml.safe_load(path.read_text())
    write_yaml(path, {**data, "seeds": seeds})
    code, _, err = cli(capsys, "sweep", str(path))
    one_line_error(code, err, message)


# ---- 4. compare pools runs by resolved config ------------------------------------------------------


def test_compare_separates_configs_that_share_a_name_and_counts_a_directory_once(tmp: Path, shared_cache: Path, capsys):
    for out, lr in (("A", 0.01), ("B", 0.5)):
        config = tiny_config(tmp, cache_dir=str(shared_cache), out_dir=str(tmp / out), strategy={"name": "er", "memory_size": 24, "lr": lr})
        path = write_yaml(tmp / f"{out}.yaml", config)
        assert cli(capsys, "run", str(path))[0] == 0
    code, out, _ = cli(capsys, "compare", str(tmp / "A"), str(tmp / "B"), str(tmp / "A"), "--out", str(tmp / "rep"))
    assert code == 0
    rows = [ln for ln in out.splitlines() if ln.startswith("er")]
    assert len(rows) == 2 and any("er [lr=0.01]" in r for r in rows) and any("er [lr=0.5]" in r for r in rows), out
    assert all(r.split()[2] == "1" for r in rows), rows  # one seed each, never "2 seeds ± ..."
    # a copy of the same run (same config and seed) in another place counts once, with a warning
    import shutil

    shutil.copytree(tmp / "A", tmp / "C")
    with pytest.warns(UserWarning, match="duplicates"):
        code, out, _ = cli(capsys, "compare", str(tmp / "A"), str(tmp / "C"), "--out", str(tmp / "rep2"))
    assert code == 0 and [ln.split()[1] for ln in out.splitlines() if ln.startswith("er ")] == ["1"]


@pytest.mark.parametrize("content", ["", "{trunc", "[1, 2]", '"a string"', '{"acc_matrix": "x", "n_test_per_task": [1]}',
                                     '{"acc_matrix": [["a"]], "n_test_per_task": [1]}'])
def test_compare_skips_unreadable_runs_with_one_warning_each(tmp: Path, shared_cache: Path, capsys, content: str):
    from tests.test_report import fake_run

    fake_run(tmp / "runs", "good", 0, 0.6)
    bad = fake_run(tmp / "runs", "bad", 0, 0.5)
    (bad / "metrics.json").write_text(content)
    (tmp / "runs" / "outcomes.json").write_text("[{trunc")
    with pytest.warns(UserWarning) as caught:
        code, out, err = cli(capsys, "compare", str(tmp / "runs"), "--out", str(tmp / "rep"))
    assert code == 0 and "good" in out and "bad" not in out, out
    messages = [str(w.message) for w in caught]
    assert any(str(bad) in m and "unreadable" in m for m in messages) and any("outcomes.json" in m for m in messages)


# ---- 5. overrides never reset siblings silently -----------------------------------------------------


def test_set_backbone_name_keeps_the_weights_source_through_the_cli(tmp: Path, shared_cache: Path, capsys):
    path = write_yaml(tmp / "cfg.yaml", er_config(tmp, shared_cache))
    code, out, _ = cli(capsys, "run", str(path), "--dry-run", "--set", "backbone.name=resnet10t")
    dumped = yaml.safe_load("\n".join(ln for ln in out.splitlines() if not ln.startswith("#")))
    assert code == 0 and dumped["backbone"]["name"] == "resnet10t" and dumped["backbone"]["weights"]["source"] == "pretrain"
    assert dumped["backbone"]["weights"]["pretrain"]["epochs"] == 2 and dumped["run_name"] == "er,backbone.name=resnet10t"
    code, _, err = cli(capsys, "run", str(path), "--set", "strategy.name=simplecil")
    one_line_error(code, err, "unknown keys 'strategy.memory_size', 'strategy.lr' for strategy 'simplecil'")


def test_suite_overrides_keep_backbone_siblings(tmp: Path, shared_cache: Path):
    from cl.engine.sweep import plan_suite

    write_yaml(tmp / "base.yaml", tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "finetune"}))
    write_yaml(tmp / "suite.yaml", {"suite": "s", "config": "base.yaml", "strategies": [
        {"name": "r10", "overrides": {"backbone": {"name": "resnet10t"}}}]})
    _, planned = plan_suite(tmp / "suite.yaml")
    assert planned[0].cfg.backbone.weights.source == "pretrain" and planned[0].cfg.backbone.weights.pretrain.epochs == 2


# ---- 6. verified caches and weights -----------------------------------------------------------------


def _feature_cache(cache: Path) -> Path:
    entries = [p for p in (cache / "features").iterdir() if p.is_dir()]
    assert len(entries) == 1, entries
    return entries[0]


@pytest.mark.parametrize(("damage", "warning"), [
    ("zeroed", "chunk.* damaged"), ("truncated", "is unusable"), ("state_of_another_entry", "is unusable")])
def test_a_damaged_feature_cache_is_rebuilt_with_a_warning(tmp: Path, capsys, damage: str, warning: str):
    cache = tmp / "cache"
    config = tiny_config(tmp, cache_dir=str(cache), strategy={"name": "simplecil"}, out_dir=str(tmp / "ref"))
    reference = run(parse_run_config(config))
    entry = _feature_cache(cache)
    data = entry / "train.bin"
    if damage == "zeroed":  # same size, wrong bytes (the old checksums kept)
        data.write_bytes(bytes(data.stat().st_size))
    elif damage == "truncated":
        data.write_bytes(data.read_bytes()[:200])
    else:
        state = json.loads((entry / "state.json").read_text())
        state["meta"]["dim"] += 1
        (entry / "state.json").write_text(json.dumps(state))
    write_yaml(tmp / "cfg.yaml", {**config, "out_dir": str(tmp / "runs")})
    with pytest.warns(UserWarning, match=f"feature cache .* {warning}"):
        code, _, _ = cli(capsys, "run", str(tmp / "cfg.yaml"))
    metrics = json.loads((tmp / "runs" / "tiny" / "simplecil" / "seed0" / "metrics.json").read_text())
    assert code == 0 and metrics["feature_cache"] == "miss" and metrics["acc_matrix"] == reference["acc_matrix"]


@pytest.mark.parametrize("damage", ["truncated", "no_provenance", "other_bytes"])
def test_a_damaged_backbone_cache_is_rebuilt_with_a_warning(tmp: Path, damage: str):
    from safetensors.torch import load_file, save_file

    cache = tmp / "cache"
    config = tiny_config(tmp, cache_dir=str(cache), strategy={"name": "simplecil"}, backbone={"cache_features": False})
    first = run(parse_run_config({**config, "out_dir": str(tmp / "a")}))
    weights = next((cache / "backbones").glob("*.safetensors"))
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "no_provenance":
        weights.with_suffix(".json").unlink()
    else:
        save_file({k: v + 1 if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}, str(weights))
    with pytest.warns(UserWarning, match="cached backbone .* is unusable"):
        again = run(parse_run_config({**config, "out_dir": str(tmp / "b")}))
    assert again["backbone"]["sha256"] == first["backbone"]["sha256"] and again["acc_matrix"] == first["acc_matrix"]


def test_diverged_pretraining_is_an_error_and_never_cached(tmp: Path, capsys):
    config = tiny_config(tmp, strategy={"name": "simplecil"},
                         backbone={"name": "test_resnet", "weights": {"source": "pretrain", "pretrain": {"epochs": 2, "lr": 1e8}}})
    code, _, err = cli(capsys, "run", str(write_yaml(tmp / "cfg.yaml", config)))
    one_line_error(code, err, "pretraining diverged", expected_code=1)
    assert not list((tmp / "cache").rglob("*.safetensors")) and not (tmp / "runs").exists()


def _resnet_state(in_chans: int = 1) -> dict:
    import timm

    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in timm.create_model("test_resnet", num_classes=0, in_chans=in_chans).state_dict().items()}


@pytest.mark.parametrize("case, message", [
    ("nan", "weight tensors hold NaN or infinite values"),
    ("stem_shape", "1 tensors of another shape, e.g. conv1.0.weight (16, 1, 5, 5) vs (16, 1, 3, 3)"),
    ("rgb_weights", "tensors of another shape, e.g. conv1.0.weight (16, 3, 3, 3) vs (16, 1, 3, 3)); check benchmark.channels"),
    ("vit_into_resnet", "weights do not match backbone 'test_resnet'"),
    ("missing_tensor", "1 missing keys"),
])
def test_a_weights_file_must_fit_exactly(tmp: Path, capsys, case: str, message: str):
    import timm
    from safetensors.torch import save_file

    state = _resnet_state(3 if case == "rgb_weights" else 1)
    if case == "nan":
        state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    elif case == "stem_shape":
        state["conv1.0.weight"] = torch.zeros(16, 1, 5, 5)
    elif case == "vit_into_resnet":
        state = {k: v.contiguous() for k, v in timm.create_model("test_vit", num_classes=0).state_dict().items()}
    elif case == "missing_tensor":
        state.pop("layer1.0.bn1.weight")
    save_file(state, str(tmp / "w.safetensors"))
    config = tiny_config(tmp, strategy={"name": "simplecil"}, backbone={"name": "test_resnet", "weights": {"source": "file", "path": str(tmp / "w.safetensors")}})
    code, _, err = cli(capsys, "run", str(write_yaml(tmp / "cfg.yaml", config)))
    one_line_error(code, err, message)
    assert not (tmp / "runs").exists()


def test_classifier_keys_in_a_weights_file_are_ignored_and_recorded(tmp: Path):
    from safetensors.torch import save_file

    from cl.config import BackboneConfig
    from cl.data.transforms import BatchTransform
    from cl.models.backbone import create_backbone

    state = _resnet_state()
    state.pop("conv1.bias", None)
    save_file({**state, "fc.weight": torch.zeros(5, 32), "fc.bias": torch.zeros(5)}, str(tmp / "w.safetensors"))
    cfg = BackboneConfig.model_validate({"name": "test_resnet", "weights": {"source": "file", "path": str(tmp / "w.safetensors")}})
    bb = create_backbone(cfg, BatchTransform(1, 1, None, (0.5,), (0.5,)), seed=3)
    assert bb.weights["ignored_keys"] == ["fc.bias", "fc.weight"]
    assert all(torch.equal(bb.model.state_dict()[k], v) for k, v in state.items())


# ---- 7. logs ----------------------------------------------------------------------------------------


def _events(run_dir: Path) -> list[dict]:
    raw = (run_dir / "log.jsonl").read_bytes()
    assert b"\x00" not in raw
    return [json.loads(line) for line in raw.decode().splitlines()]


def test_a_fresh_restart_truncates_a_stale_log(tmp: Path, shared_cache: Path, capsys):
    path = write_yaml(tmp / "cfg.yaml", er_config(tmp, shared_cache))
    assert cli(capsys, "run", str(path))[0] == 0
    run_dir = tmp / "runs" / "tiny" / "er" / "seed0"
    # what a run that died before its first checkpoint leaves: its marker and a log
    import shutil

    shutil.rmtree(run_dir / "ckpt")
    (run_dir / "metrics.json").unlink()
    with open(run_dir / "log.jsonl", "a") as fh:
        fh.write('{"event": "STALE"}\n{"trunc')
    assert cli(capsys, "run", str(path))[0] == 0
    events = [e["event"] for e in _events(run_dir)]
    assert events[0] == "run_start" and events.count("run_start") == 1 and "STALE" not in events


def test_resume_with_a_log_shorter_than_the_checkpoint_stays_valid_jsonl(tmp: Path, shared_cache: Path, capsys):
    path = write_yaml(tmp / "cfg.yaml", er_config(tmp, shared_cache))
    assert cli(capsys, "run", str(path), "--stop-after", "1")[0] == 0
    log = tmp / "runs" / "tiny" / "er" / "seed0" / "log.jsonl"
    first = log.read_bytes().split(b"\n")[0]
    log.write_bytes(first + b"\n" + first[:10])  # cut inside the second line
    assert cli(capsys, "run", str(path), "--resume")[0] == 0
    events = _events(log.parent)
    resume = next(e for e in events if e["event"] == "resume")
    assert resume["log_bytes_lost"] > 0 and events[-1]["event"] == "run_end"


# ---- 8. paths: nothing outside out_dir --------------------------------------------------------------


@pytest.mark.parametrize("sets, message", [
    (["experiment=../../x"], "'experiment': '../../x' is not a safe folder name"),
    (["experiment=/tmp/x"], "'experiment': '/tmp/x' is not a safe folder name"),
    (["run_name=.."], "'run_name': '..' is not a safe folder name"),
    (["run_name=a/b"], "'run_name': 'a/b' is not a safe folder name"),
    (["run_name=seed3"], "looks like a seed folder"),
])
def test_experiment_and_run_name_cannot_escape_out_dir(tmp: Path, shared_cache: Path, capsys, sets, message):
    path = write_yaml(tmp / "cfg.yaml", er_config(tmp, shared_cache))
    before = tree(tmp.parent)
    code, _, err = cli(capsys, "run", str(path), *[a for s in sets for a in ("--set", s)])
    one_line_error(code, err, message)
    assert tree(tmp.parent) == before


def test_overwrite_never_deletes_outside_out_dir_or_what_is_not_ours(tmp: Path, shared_cache: Path, capsys):
    outside = tmp / "precious" / "er" / "seed0"
    outside.mkdir(parents=True)
    (outside / "thesis.tex").write_text("years of work")
    (tmp / "runs").mkdir()
    (tmp / "runs" / "tiny").symlink_to(tmp / "precious")  # out_dir/tiny leads outside
    path = write_yaml(tmp / "cfg.yaml", er_config(tmp, shared_cache))
    code, _, err = cli(capsys, "run", str(path), "--overwrite")
    one_line_error(code, err, "outside out_dir")
    assert (outside / "thesis.tex").read_text() == "years of work"
    # inside out_dir, a directory without run.json is not ours either
    (tmp / "runs" / "tiny").unlink()
    mine = tmp / "runs" / "tiny" / "er" / "seed0"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    code, _, err = cli(capsys, "run", str(path), "--overwrite")
    one_line_error(code, err, "has no run.json")
    assert (mine / "notes.txt").read_text() == "mine"


def test_home_is_expanded_and_yaml_paths_are_relative_to_the_yaml(tmp: Path, shared_cache: Path, capsys, monkeypatch):
    from tests.test_data import make_fmnist_dir

    monkeypatch.setenv("HOME", str(tmp / "home"))
    make_fmnist_dir(tmp / "data" / "fm")
    (tmp / "configs").mkdir()
    config = tiny_config(tmp, cache_dir=str(shared_cache), out_dir="~/results", strategy={"name": "simplecil"},
                         benchmark={"dataset": {"name": "fashion_mnist", "root": "../data/fm"}, "n_experiences": 5})
    path = write_yaml(tmp / "configs" / "cfg.yaml", config)
    monkeypatch.chdir(tmp.parent)  # somewhere else: the root is found relative to the YAML, not here
    assert cli(capsys, "run", str(path))[0] == 0
    run_dir = tmp / "home" / "results" / "tiny" / "simplecil" / "seed0"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["benchmark"]["dataset"]["root"] == str(tmp / "data" / "fm") and not (tmp.parent / "~").exists()


def test_out_that_is_a_file_is_one_line(tmp: Path, shared_cache: Path, capsys):
    (tmp / "afile").write_text("x")
    path = write_yaml(tmp / "cfg.yaml", er_config(tmp, shared_cache))
    code, _, err = cli(capsys, "run", str(path), "--out", str(tmp / "afile"))
    one_line_error(code, err, "is a file; out_dir must be a directory")


def test_unwritable_out_dir_is_one_line_before_any_work(tmp: Path, shared_cache: Path, capsys, monkeypatch):
    # tests run as root, for whom permission bits do not bind: simulate what os.access reports
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p).startswith(str(tmp / "ro")) else real(p, mode, **kw))
    (tmp / "ro").mkdir()
    path = write_yaml(tmp / "cfg.yaml", er_config(tmp, shared_cache))
    code, _, err = cli(capsys, "run", str(path), "--out", str(tmp / "ro"))
    one_line_error(code, err, "is not writable")


def test_an_unwritable_cache_costs_only_the_reuse(tmp: Path, capsys):
    (tmp / "cache").write_text("not a directory")  # every cache write fails
    config = tiny_config(tmp, cache_dir=str(tmp / "cache"), strategy={"name": "simplecil"})
    with pytest.warns(UserWarning, match="could not"):
        code, out, _ = cli(capsys, "run", str(write_yaml(tmp / "cfg.yaml", config)))
    assert code == 0 and "final_acc=" in out


def test_a_full_disk_while_plotting_leaves_no_partial_image_and_resumes(tmp: Path, shared_cache: Path, capsys, monkeypatch):
    import errno

    from matplotlib.figure import Figure

    real = Figure.savefig

    def full_disk(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(fname))

    path = write_yaml(tmp / "cfg.yaml", er_config(tmp, shared_cache))
    monkeypatch.setattr(Figure, "savefig", full_disk)
    code, _, err = cli(capsys, "run", str(path))
    one_line_error(code, err, "No space left on device")
    run_dir = tmp / "runs" / "tiny" / "er" / "seed0"
    assert not (run_dir / "metrics.json").exists()
    assert not [p for p in run_dir.rglob("*") if p.is_file() and (p.suffix in (".png", ".tmp") or p.name.endswith(".tmp"))]
    monkeypatch.setattr(Figure, "savefig", real)
    assert cli(capsys, "run", str(path), "--resume")[0] == 0
    assert all(p.stat().st_size > 1000 for p in (run_dir / "plots").glob("*.png"))


# ---- 9. locks and process hygiene -------------------------------------------------------------------


def _cli_proc(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "cl", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _slow_config(tmp: Path, cache: Path) -> dict:
    return tiny_config(tmp, cache_dir=str(cache), num_threads=1, strategy={"name": "er", "memory_size": 24, "lr": 0.05},
                       backbone={"name": "test_resnet", "trainable": "all", "cache_features": False,
                                 "weights": {"source": "pretrain", "pretrain": {"epochs": 2, "batch_size": 32}}},
                       train={"epochs": 40, "batch_size": 8})


def test_a_second_process_on_a_running_run_is_one_line(tmp: Path, shared_cache: Path):
    path = write_yaml(tmp / "cfg.yaml", _slow_config(tmp, shared_cache))
    first = _cli_proc("run", str(path))
    marker = tmp / "runs" / "tiny" / "er" / "seed0" / "run.json"
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.05)
        second = _cli_proc("run", str(path), "--resume")
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2 and err.count("\n") == 1 and "is in use by another cl process (pid " in err, err
    finally:
        first.kill()
        first.wait()


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sweep_workers_die_with_their_parent(tmp: Path, shared_cache: Path):
    write_yaml(tmp / "base.yaml", _slow_config(tmp, shared_cache))
    strategies = [{"name": n, "overrides": {"strategy": {"name": "er", "memory_size": m, "lr": 0.05}}} for n, m in (("a", 24), ("b", 30))]
    path = write_yaml(tmp / "suite.yaml", {"suite": "s", "config": "base.yaml", "strategies": strategies})
    parent = _cli_proc("sweep", str(path), "--jobs", "2")
    workers: list[int] = []
    try:
        deadline = time.time() + 180
        while len(workers) < 2:
            assert parent.poll() is None and time.time() < deadline, parent.communicate()
            time.sleep(0.2)
            workers = _children(parent.pid)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 15
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers)
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


# ---- tracebacks and hangs: one line, exit 2, no run directory, within seconds --------------------------


def _bomb() -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    return "\n".join(lines) + "\nseed: *a9\n"


YAML_CASES = [
    ("billion_laughs", _bomb(), "expands to more than 100000 values"),
    ("deep_flow_nesting", "seed: " + "[" * 20000 + "]" * 20000 + "\n", "nested deeper than 64 levels"),
    ("deep_block_nesting", "".join("  " * i + f"k{i}:\n" for i in range(200)) + "  " * 200 + "v: 1\n", "nested deeper than 64 levels"),
    ("huge_file", "x-pad: '" + "a" * 1_200_000 + "'\n", "characters; a config is at most 1,000,000"),
    ("control_character", "experiment: x\x01\n", "YAML syntax error: unacceptable character #x0001"),
    ("merged_integer_key", "<<: {1: 2}\n", "key '1' must be a string"),
    ("merged_duplicate_key", "strategy: {<<: {lr: 0.5, lr: 0.7}, name: er}\n", "duplicate key 'lr'"),
    ("merge_of_a_scalar", "strategy: {<<: 3}\n", "'<<' merges mappings only"),
    ("recursive_alias", "a: &a [*a]\n", "recursive YAML alias"),
    ("complex_key", "? [a, b]\n: 1\n", "a key must be a plain name, not a sequence"),
    ("integer_key", "1: x\n", "key '1' must be a string"),
    ("null_key", "~: x\n", "must be a string"),
]


@pytest.mark.parametrize("case, text, message", YAML_CASES, ids=[c[0] for c in YAML_CASES])
def test_hostile_yaml_is_one_line_within_seconds(tmp: Path, capsys, case, text, message):
    path = tmp / "cfg.yaml"
    path.write_text(text)
    start = time.perf_counter()
    code, _, err = cli(capsys, "run", str(path))
    assert time.perf_counter() - start < 5
    one_line_error(code, err, message)
    assert not (tmp / "runs").exists()


def test_yaml_12_floats_are_accepted():
    from cl.config import apply_overrides
    from cl.yamlio import parse_yaml_text

    assert apply_overrides({}, ["strategy.lr=1e-3", "a.b=-2E+4", "a.c=5"]) == {"strategy": {"lr": 0.001}, "a": {"b": -20000.0, "c": 5}}
    assert parse_yaml_text("x: 1e-3\ny: '1e-3'\n", "t") == {"x": 0.001, "y": "1e-3"}


SEED_KEYS = [
    ("seed", {"seed": 2**64}),
    ("benchmark.class_order_seed", {"benchmark": {"class_order_seed": 2**64}}),
    ("benchmark.subsample_seed", {"benchmark": {"subsample_seed": 2**70}}),
    ("backbone.weights.pretrain.seed", {"backbone": {"weights": {"pretrain": {"seed": 2**64}}}}),
    ("shift.seed", {"shift": {"enabled": True, "seed": 2**64}}),
    ("benchmark.dataset.seed", {"benchmark": {"dataset": {"name": "synthetic", "n_classes": 6, "image_size": 16, "seed": 2**64}}}),
]


@pytest.mark.parametrize("key, override", SEED_KEYS, ids=[k for k, _ in SEED_KEYS])
def test_seeds_are_bounded_everywhere(tmp: Path, shared_cache: Path, capsys, key, override):
    code, _, err = cli(capsys, "run", str(write_yaml(tmp / "cfg.yaml", er_config(tmp, shared_cache, **override))))
    one_line_error(code, err, f"'{key}': Input should be less than or equal to 4294967295")
    assert not (tmp / "runs").exists()


RUN_CASES = [
    ("kwargs_typo_with_pretraining", {"backbone": {"kwargs": {"drop_rat": 0.1}}}, "backbone.kwargs: test_resnet rejects these arguments"),
    ("shift_layer_out_of_range", {"shift": {"enabled": True, "layers": [99]}}, "shift.layers: [99] is not a list of block indices of test_resnet"),
    ("online_batch_of_one_trains_bn", {"benchmark": {"scenario": "online", "online": {"batch_size": 1}}, "train": {"epochs": 1},
                                       "backbone": {"trainable": "all", "cache_features": False}},
     "benchmark.online.batch_size: 1 sample per step cannot train the BatchNorm layers of test_resnet"),
    ("offline_batch_of_one_trains_bn", {"train": {"batch_size": 1}, "backbone": {"trainable": "all", "cache_features": False}},
     "train.batch_size: 1 sample per step cannot train the BatchNorm layers"),
    ("sha256_without_file", {"backbone": {"weights": {"sha256": "0" * 64}}}, "'sha256' is only checked when source is 'file'"),
    ("sha256_not_hex", {"backbone": {"weights": {"source": "none", "pretrain": None, "sha256": "xyz"}}}, "'sha256' is only checked"),
]


@pytest.mark.parametrize("case, override, message", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_late_failures_are_caught_before_the_run_directory(tmp: Path, shared_cache: Path, capsys, case, override, message):
    code, _, err = cli(capsys, "run", str(write_yaml(tmp / "cfg.yaml", er_config(tmp, shared_cache, **override))))
    one_line_error(code, err, message)
    assert not (tmp / "runs").exists()


def test_a_trailing_single_sample_batch_in_pretraining_is_folded(tmp: Path, capsys):
    # 2 base classes x 30 = 60 images in batches of 59: the last batch would hold one sample
    config = tiny_config(tmp, strategy={"name": "simplecil"},
                         backbone={"name": "test_resnet", "weights": {"source": "pretrain", "pretrain": {"epochs": 1, "batch_size": 59}}})
    assert cli(capsys, "run", str(write_yaml(tmp / "cfg.yaml", config)))[0] == 0


@pytest.mark.parametrize("flag, message", [("0", "--stop-after must be >= 1, got 0"), ("-3", "--stop-after must be >= 1, got -3")])
def test_stop_after_must_be_positive(tmp: Path, shared_cache: Path, capsys, flag, message):
    code, _, err = cli(capsys, "run", str(write_yaml(tmp / "cfg.yaml", er_config(tmp, shared_cache))), "--stop-after", flag)
    one_line_error(code, err, message)
    assert not (tmp / "runs").exists()


def test_stop_after_without_checkpoints_is_refused(tmp: Path, shared_cache: Path, capsys):
    path = write_yaml(tmp / "cfg.yaml", er_config(tmp, shared_cache, train={"checkpoint": False}))
    code, _, err = cli(capsys, "run", str(path), "--stop-after", "1")
    one_line_error(code, err, "--stop-after needs train.checkpoint: true")


@pytest.mark.parametrize("damage", ["run_json", "config_yaml"])
def test_damaged_run_files_on_resume(tmp: Path, shared_cache: Path, capsys, damage: str):
    path = write_yaml(tmp / "cfg.yaml", er_config(tmp, shared_cache))
    assert cli(capsys, "run", str(path), "--stop-after", "1")[0] == 0
    run_dir = tmp / "runs" / "tiny" / "er" / "seed0"
    if damage == "run_json":
        (run_dir / "run.json").write_text("{trunc")
        code, _, err = cli(capsys, "run", str(path), "--resume")
        one_line_error(code, err, "run.json is unreadable")
    else:  # not needed to resume; written again from the resolved config
        (run_dir / "config.yaml").write_text("a: [\n")
        assert cli(capsys, "run", str(path), "--resume")[0] == 0
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["strategy"]["name"] == "er"


def test_shift_on_a_truncated_probe_file_is_one_line(tmp: Path, shared_cache: Path, capsys):
    path = write_yaml(tmp / "cfg.yaml", er_config(tmp, shared_cache, shift={"enabled": True, "per_class": 4}))
    assert cli(capsys, "run", str(path))[0] == 0
    run_dir = tmp / "runs" / "tiny" / "er" / "seed0"
    probe = run_dir / "probes" / "exp1.safetensors"
    probe.write_bytes(probe.read_bytes()[:300])
    code, _, err = cli(capsys, "shift", str(run_dir))
    one_line_error(code, err, "exp1.safetensors: unreadable probe file")


def test_an_image_folder_whose_test_split_lacks_a_class(tmp: Path, capsys):
    from PIL import Image

    for split, classes in (("train", "abc"), ("test", "ab")):
        for c in classes:
            (tmp / "imgs" / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("L", (8, 8), color=40 * i).save(tmp / "imgs" / split / c / f"{i}.png")
    (tmp / "imgs" / "test" / "c").mkdir()  # present but empty
    config = tiny_config(tmp, strategy={"name": "simplecil"},
                         benchmark={"dataset": {"name": "image_folder", "root": str(tmp / "imgs"), "image_size": 8, "channels": 1}, "n_experiences": 3})
    code, _, err = cli(capsys, "run", str(write_yaml(tmp / "cfg.yaml", config)))
    one_line_error(code, err, "class 'c' has no images in test/")


def test_a_refused_pickle_says_so_in_one_complete_clause(tmp: Path, monkeypatch):
    from cl.engine.checkpoint import load_checkpoint
    from tests.test_reliability import _Exploit

    monkeypatch.setenv("CL_EXPLOIT_MARKER", str(tmp / "pwned"))
    (tmp / "ckpt").mkdir()
    torch.save({"format": 2, "x": _Exploit()}, tmp / "ckpt" / "last.pt")
    with pytest.warns(UserWarning), pytest.raises(RunDirError) as err:
        load_checkpoint(tmp / "ckpt")
    text = str(err.value)
    assert "refused: loading it would run code" in text and "weights_only=False" not in text and "\x1b" not in text
    assert not (tmp / "pwned").exists()


def test_keys_added_later_keep_older_runs_recognised_at_their_old_default(tmp: Path):
    """A run made before ``backbone.cache_dtype`` existed hashed its config without it: at the default
    (the old behaviour) the key stays out of the identity; any other value is part of it."""
    from cl.config import IDENTITY_DEFAULTS, config_hash
    from cl.engine.rundir import result_config, result_hash

    from cl.config import config_to_dict, flatten

    cfg = parse_run_config(tiny_config(tmp))
    flat_defaults = flatten(config_to_dict(cfg))
    assert {"backbone.cache_dtype", "train.lr_schedule", "train.grad_clip_norm"} <= set(IDENTITY_DEFAULTS)
    for key, value in IDENTITY_DEFAULTS.items():  # each is the key's real default, and left out of the identity
        assert flat_defaults[key] == value, key
        assert key not in flatten(result_config(cfg)), key
    old = result_config(cfg)
    assert "cache_dtype" not in old["backbone"] and result_hash(cfg) == config_hash(old)
    half = parse_run_config(tiny_config(tmp, backbone={"cache_dtype": "float16"}))
    assert result_config(half)["backbone"]["cache_dtype"] == "float16" and result_hash(half) != result_hash(cfg)
