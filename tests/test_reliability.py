"""Reliability: SIGKILL and resume in a real subprocess, corrupt checkpoints, hostile inputs."""

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

from cl.cli import main
from cl.config import parse_run_config
from cl.engine.loop import run
from tests.conftest import tiny_config, write_yaml

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("acc_matrix", "acc_matrix_task_aware", "initial_acc_task_aware", "stored_bytes")


def cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "cl", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def slow_config(tmp: Path, cache: Path, out: str) -> dict:
    """Three experiences, several epochs each, so a kill lands inside an experience."""
    return tiny_config(tmp, cache_dir=str(cache), out_dir=str(tmp / out), num_threads=2, strategy={"name": "er", "memory_size": 24, "lr": 0.05},
                       backbone={"name": "test_resnet", "trainable": "all", "cache_features": False,
                                 "weights": {"source": "pretrain", "pretrain": {"epochs": 2, "batch_size": 32}}},
                       train={"epochs": 6, "batch_size": 8})


def test_sigkill_inside_an_experience_then_resume_is_bit_identical(tmp: Path, shared_cache: Path):
    reference = run(parse_run_config(slow_config(tmp, shared_cache, "ref")))
    path = write_yaml(tmp / "cfg.yaml", slow_config(tmp, shared_cache, "killed"))
    run_dir = parse_run_config(slow_config(tmp, shared_cache, "killed")).run_dir()
    proc = cli("run", str(path))
    deadline = time.time() + 120
    while not (run_dir / "ckpt" / "last.pt").exists():  # the first experience is done
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    time.sleep(0.3)  # well inside the second experience
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "metrics.json").exists()
    done = cli("run", str(path), "--resume")
    assert done.wait(timeout=300) == 0, done.stderr.read() if done.stderr else ""
    resumed = json.loads((run_dir / "metrics.json").read_text())
    for key in KEYS:
        assert resumed[key] == reference[key], key


def test_corrupt_last_checkpoint_falls_back_to_the_previous_one(tmp: Path, shared_cache: Path):
    base = tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "er", "memory_size": 24})
    full = run(parse_run_config({**base, "out_dir": str(tmp / "a")}))
    cfg = parse_run_config({**base, "out_dir": str(tmp / "b")})
    assert run(cfg, stop_after=2) is None
    last = cfg.run_dir() / "ckpt" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated mid-write by a crash
    with pytest.warns(UserWarning, match="last.pt is unreadable"):
        resumed = run(cfg, resume=True)
    for key in KEYS:
        assert resumed[key] == full[key], key


def test_no_readable_checkpoint_is_a_one_line_error(tmp: Path, shared_cache: Path, capsys):
    config = tiny_config(tmp, cache_dir=str(shared_cache))
    path = write_yaml(tmp / "cfg.yaml", config)
    assert main(["run", str(path), "--stop-after", "1"]) == 0
    ckpt = parse_run_config(config).run_dir() / "ckpt"
    for f in ckpt.iterdir():
        f.write_bytes(b"garbage")
    capsys.readouterr()
    with pytest.warns(UserWarning):
        assert main(["run", str(path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no readable checkpoint in") and err.count("\n") == 1


# ---- hostile inputs: exit code 2, one line naming the problem, no traceback, no run directory ------


def _fmnist_dir(root: Path, truncate: bool) -> Path:
    from tests.test_data import make_fmnist_dir

    return make_fmnist_dir(root, truncate=100 if truncate else 0)


def _weights_of_another_arch(tmp: Path) -> Path:
    import timm
    from safetensors.torch import save_file

    path = tmp / "other.safetensors"
    save_file(timm.create_model("test_vit", num_classes=0).state_dict(), str(path))
    return path


BAD = [
    # (id, yaml text or None, override dict, --set list, expected message)
    ("yaml_syntax", "seed: [1\n", None, [], "YAML syntax error"),
    ("yaml_duplicate", "seed: 1\nseed: 2\n", None, [], "duplicate key 'seed'"),
    ("yaml_boolean_key", "benchmark:\n  on: 1\n", None, [], "read as a boolean"),
    ("yaml_top_level_list", "- 1\n", None, [], "top level must be a mapping"),
    ("suite_given_to_run", "suite: s\nconfig: x.yaml\nstrategies: []\n", None, [], "is a suite, not a run config: run it with `cl sweep"),
    ("unknown_top", None, {"trian": {}}, [], "unknown key 'trian'"),
    ("unknown_benchmark", None, {"benchmark": {"n_exp": 3}}, [], "unknown key 'benchmark.n_exp'"),
    ("unknown_dataset", None, {"benchmark": {"dataset": {"name": "synthetic", "n_class": 6}}}, [], "unknown key 'benchmark.dataset.n_class'"),
    ("unknown_backbone", None, {"backbone": {"freez": "all"}}, [], "unknown key 'backbone.freez'"),
    ("unknown_weights", None, {"backbone": {"weights": {"sauce": "hub"}}}, [], "unknown key 'backbone.weights.sauce'"),
    ("unknown_pretrain", None, {"backbone": {"weights": {"pretrain": {"epoch": 2}}}}, [], "unknown key 'backbone.weights.pretrain.epoch'"),
    ("unknown_train", None, {"train": {"epoch": 2}}, [], "unknown key 'train.epoch'"),
    ("unknown_strategy_key", None, {"strategy": {"name": "er", "memory": 5}}, [], "unknown key 'strategy.memory'"),
    ("unknown_peft_key", None, {"strategy": {"name": "peft_per_task", "peft": {"name": "lora", "rnk": 2}}}, [], "unknown key 'strategy.peft.rnk'"),
    ("unknown_shift", None, {"shift": {"enable": True}}, [], "unknown key 'shift.enable'"),
    ("unknown_strategy", None, {"strategy": {"name": "nope"}}, [], "unknown strategy 'nope'"),
    ("unknown_peft", None, {"strategy": {"name": "peft_per_task", "peft": {"name": "loraa"}}}, [], "unknown peft method 'loraa'"),
    ("unknown_dataset_name", None, {"benchmark": {"dataset": {"name": "mnist"}}}, [], "unknown benchmark 'mnist'"),
    ("unknown_backbone_name", None, {"backbone": {"name": "resnet_9000"}}, [], "unknown backbone 'resnet_9000'"),
    ("type_epochs", None, {"train": {"epochs": "3"}}, [], "'train.epochs': Input should be a valid integer"),
    ("type_lr", None, {"strategy": {"name": "er", "lr": "fast"}}, [], "'strategy.lr': Input should be a valid number"),
    ("type_seed", None, {"seed": 1.5}, [], "'seed': Input should be a valid integer"),
    ("negative_memory", None, {"strategy": {"name": "er", "memory_size": -1}}, [], "'strategy.memory_size': Input should be greater than or equal to 0"),
    ("zero_batch", None, {"train": {"batch_size": 0}}, [], "'train.batch_size': Input should be greater than or equal to 1"),
    ("negative_lr", None, {"strategy": {"name": "er", "lr": -0.1}}, [], "'strategy.lr': Input should be greater than 0"),
    ("class_order_not_permutation", None, {"benchmark": {"class_order": [0, 1, 2, 3, 4, 4]}}, [], "must be a permutation of 0..5"),
    ("class_order_too_short", None, {"benchmark": {"class_order": [0, 1, 2]}}, [], "must be a permutation of 0..5"),
    ("impossible_split", None, {"benchmark": {"n_experiences": 4}}, [], "4 does not divide 6 classes"),
    ("base_takes_all", None, {"benchmark": {"base_classes": 6}}, [], "6 leaves no classes"),
    ("bad_scenario", None, {"benchmark": {"scenario": "domain"}}, [], "'benchmark.scenario': Input should be"),
    ("online_epochs", None, {"benchmark": {"scenario": "online"}}, [], "train.epochs: must be 1 in the online scenario"),
    ("bad_set_syntax", None, {}, ["strategy"], "--set"),
    ("set_unknown_key", None, {}, ["strategy.memory_sise=3"], "unknown key 'strategy.memory_sise'"),
    ("missing_data_root", None, {"benchmark": {"dataset": {"name": "fashion_mnist", "root": "/nonexistent/fmnist"}, "n_experiences": 5}}, [], "not found"),
    ("weights_file_missing", None, {"backbone": {"name": "test_resnet", "weights": {"source": "file", "path": "/nonexistent/w.safetensors"}}}, [], "not found"),
    ("memory_larger_than_data", None, {"strategy": {"name": "er", "memory_size": 100000}}, [], "strategy.memory_size: 100000 exceeds the 180 training samples"),
    ("peft_on_resnet", None, {"strategy": {"name": "peft_per_task", "peft": {"name": "lora"}}}, [], "'lora' applies to vit backbones, not ResNet"),
    ("l2p_on_resnet", None, {"strategy": {"name": "l2p"}}, [], "'l2p' needs a timm ViT"),
    ("confit_frozen_backbone", None, {"strategy": {"name": "confit"}}, [], "backbone.trainable: confit fine-tunes the whole backbone"),
]


@pytest.mark.parametrize("case, text, override, sets, message", BAD, ids=[b[0] for b in BAD])
def test_hostile_input_is_exit_2_one_line_no_run_dir(tmp: Path, shared_cache: Path, capsys, case, text, override, sets, message):
    path = tmp / "cfg.yaml"
    if text is not None:
        path.write_text(text)
    else:
        write_yaml(path, tiny_config(tmp, cache_dir=str(shared_cache), **override))
    args = ["run", str(path)]
    for s in sets:
        args += ["--set", s]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    assert not (tmp / "runs").exists()


@pytest.mark.parametrize("case", ["truncated_dataset", "weights_of_another_arch"])
def test_hostile_files_are_exit_2_one_line_no_run_dir(tmp: Path, shared_cache: Path, capsys, case: str):
    if case == "truncated_dataset":
        override = {"benchmark": {"dataset": {"name": "fashion_mnist", "root": str(_fmnist_dir(tmp / "fm", truncate=True))}, "n_experiences": 5}}
        message = "truncated or corrupt IDX file"
    else:
        override = {"backbone": {"name": "test_resnet", "weights": {"source": "file", "path": str(_weights_of_another_arch(tmp))}}}
        message = "weights do not match backbone 'test_resnet'"
    path = write_yaml(tmp / "cfg.yaml", tiny_config(tmp, cache_dir=str(shared_cache), **override))
    code = main(["run", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp / "runs").exists()


def test_the_table_has_at_least_30_cases():
    assert len(BAD) + 2 >= 30


class _Exploit:
    def __reduce__(self):  # what a hostile pickle does: run code on load
        return (Path.touch, (Path(os.environ["CL_EXPLOIT_MARKER"]),))


def test_a_checkpoint_that_would_run_code_is_refused_not_executed(tmp: Path, monkeypatch):
    from cl.engine.checkpoint import load_checkpoint
    from cl.errors import RunDirError

    marker = tmp / "pwned"
    monkeypatch.setenv("CL_EXPLOIT_MARKER", str(marker))
    ckpt = tmp / "ckpt"
    ckpt.mkdir()
    for name in ("last.pt", "prev.pt"):
        torch.save({"format": 1, "payload": _Exploit()}, ckpt / name)
    with pytest.warns(UserWarning), pytest.raises(RunDirError, match="no readable checkpoint"):
        load_checkpoint(ckpt)
    assert not marker.exists()
