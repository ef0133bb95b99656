"""Config loading: inheritance, overrides, and one-line errors (exit code 2, nothing written)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cl.cli import main
from cl.config import (
    ConfigError, apply_overrides, deep_merge, load_run_config, load_yaml, parse_run_config, split_sizes,
)
from tests.conftest import tiny_config, write_yaml


def test_base_inheritance_deep_merges(tmp: Path):
    write_yaml(tmp / "base.yaml", {"seed": 3, "train": {"epochs": 4, "batch_size": 8}, "benchmark": {"n_experiences": 2}})
    (tmp / "sub").mkdir()
    write_yaml(tmp / "sub" / "exp.yaml", {"base": "../base.yaml", "train": {"epochs": 1}, "benchmark": {"n_experiences": 3}})
    data = load_yaml(tmp / "sub" / "exp.yaml")
    assert data == {"seed": 3, "train": {"epochs": 1, "batch_size": 8}, "benchmark": {"n_experiences": 3}}


def test_base_cycle_is_an_error(tmp: Path):
    write_yaml(tmp / "a.yaml", {"base": "b.yaml"})
    write_yaml(tmp / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_yaml(tmp / "a.yaml")


def test_set_overrides_parse_yaml_values():
    data = apply_overrides({"train": {"epochs": 1}}, ["train.epochs=3", "strategy.name=er", "benchmark.class_order=[1,0]", "x.flag=true"])
    assert data == {"train": {"epochs": 3}, "strategy": {"name": "er"}, "benchmark": {"class_order": [1, 0]}, "x": {"flag": True}}
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["nonsense"])
    switched = apply_overrides({"strategy": {"name": "er", "memory_size": 5}}, ["strategy.name=finetune", "strategy.lr=0.5"])
    assert switched == {"strategy": {"name": "finetune", "memory_size": 5, "lr": 0.5}}  # kept; validation rejects it


def test_deep_merge_never_resets_a_section_whose_name_changes():
    base = {"strategy": {"name": "er", "memory_size": 5, "lr": 0.1}}
    assert deep_merge(base, {"strategy": {"name": "finetune"}}) == {"strategy": {"name": "finetune", "memory_size": 5, "lr": 0.1}}
    assert deep_merge(base, {"strategy": {"name": "er", "lr": 0.2}}) == {"strategy": {"name": "er", "memory_size": 5, "lr": 0.2}}
    assert deep_merge(base, {"strategy": {"lr": 0.2}})["strategy"]["memory_size"] == 5


@pytest.mark.parametrize("order", [0, 1])
def test_set_backbone_name_keeps_weights_trainable_and_kwargs_in_any_order(tmp: Path, order: int):
    config = tiny_config(tmp, backbone={"name": "test_resnet", "trainable": "batchnorm", "kwargs": {"drop_rate": 0.1},
                                        "weights": {"source": "pretrain", "pretrain": {"epochs": 1}}})
    sets = ["backbone.name=resnet10t", "backbone.trainable=last_blocks", "backbone.trainable_blocks=1"]
    sets = sets if order == 0 else sets[1:] + sets[:1]
    cfg = parse_run_config(apply_overrides(config, sets))
    assert cfg.backbone.name == "resnet10t" and cfg.backbone.weights.source == "pretrain"
    assert cfg.backbone.weights.pretrain.epochs == 1 and cfg.backbone.kwargs == {"drop_rate": 0.1}
    assert cfg.backbone.trainable == "last_blocks"


def test_switching_strategy_keeps_valid_keys_and_names_the_rest(tmp: Path):
    config = tiny_config(tmp, strategy={"name": "er", "memory_size": 24, "lr": 0.05})
    with pytest.raises(ConfigError, match=r"^unknown key 'strategy.memory_size' for strategy 'finetune' \(allowed: lr, "):
        parse_run_config(apply_overrides(config, ["strategy.name=finetune"]))
    lr_only = tiny_config(tmp, strategy={"name": "er", "lr": 0.05})
    cfg = parse_run_config(apply_overrides(lr_only, ["strategy.name=finetune"]))
    assert cfg.strategy.name == "finetune" and cfg.strategy.lr == 0.05  # lr is a finetune option: kept
    sim = apply_overrides(config, ["strategy.name=simplecil"])
    with pytest.raises(ConfigError, match=r"unknown keys 'strategy.memory_size', 'strategy.lr' for strategy 'simplecil'"):
        parse_run_config(sim)


def test_deep_merge_replaces_lists_and_does_not_mutate():
    base = {"a": {"b": [1, 2], "c": 1}}
    out = deep_merge(base, {"a": {"b": [3]}})
    assert out == {"a": {"b": [3], "c": 1}} and base == {"a": {"b": [1, 2], "c": 1}}


def test_valid_config_resolves_strategy_and_dataset_classes(tmp: Path):
    cfg = parse_run_config(tiny_config(tmp))
    assert type(cfg.strategy).__name__ == "ERConfig" and cfg.strategy.memory_size == 24
    assert cfg.benchmark.dataset.num_classes() == 6
    dumped = cfg.model_dump(mode="json")
    assert dumped["strategy"]["memory_policy"] == "auto"  # subclass fields survive serialisation


@pytest.mark.parametrize(
    "override, message",
    [
        ({"trian": {}}, "unknown key 'trian' (allowed: backbone, benchmark, cache_dir"),
        ({"train": {"epoch": 2}}, "unknown key 'train.epoch' (allowed: augment, batch_size, checkpoint, epochs"),
        ({"strategy": {"name": "er", "memory": 5}}, "unknown key 'strategy.memory' for strategy 'er' (allowed: lr, memory_policy, memory_size"),
        ({"strategy": {"name": "nope"}}, "strategy.name: unknown strategy 'nope' (available: aper, avalanche, coda_prompt, confit, derpp,"),
        ({"benchmark": {"dataset": {"name": "mnist"}}}, "unknown benchmark 'mnist' (available: cifar10, cifar100, cub200, digits, domainnet, fashion_mnist"),
        ({"train": {"epochs": "3"}}, "'train.epochs': Input should be a valid integer (got '3')"),
        ({"train": {"epochs": 0}}, "'train.epochs': Input should be greater than or equal to 1 (got 0)"),
        ({"strategy": {"name": "er", "memory_size": -1}}, "'strategy.memory_size': Input should be greater than or equal to 0"),
        ({"benchmark": {"scenario": "domain"}}, "'benchmark.scenario': Input should be 'class_incremental', 'task_incremental', 'online' or 'domain_incremental'"),
        ({"benchmark": {"n_experiences": 4}}, "benchmark.n_experiences: 4 does not divide 6 classes (allowed: 1, 2, 3, 6"),
        ({"benchmark": {"class_order": [0, 1, 2, 3, 4, 4]}}, "benchmark.class_order: must be a permutation of 0..5"),
        ({"benchmark": {"base_classes": 6}}, "benchmark.base_classes: 6 leaves no classes"),
        ({"backbone": {"name": "resnet_99"}}, "unknown backbone 'resnet_99'"),
        ({"backbone": {"trainable": "last_blocks"}}, "'trainable_blocks' is required when trainable is 'last_blocks'"),
        ({"backbone": {"weights": {"source": "file"}}}, "'path' is required when source is 'file'"),
        ({"backbone": {"kwargs": {"num_classes": 3}}}, "'num_classes' is set by the framework"),
        ({"benchmark": {"scenario": "online"}}, "train.epochs: must be 1 in the online scenario"),
        ({"strategy": "er"}, "'strategy' must be a mapping with a 'name' key"),
    ],
)
def test_bad_config_gives_one_line_naming_the_key(tmp: Path, override, message):
    with pytest.raises(ConfigError) as err:
        parse_run_config(tiny_config(tmp, **override))
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_split_sizes():
    assert split_sizes(10, 4, 4) == [4, 2, 2, 2]
    assert split_sizes(10, 5, None) == [2] * 5
    assert split_sizes(10, 1, None) == [10]
    with pytest.raises(ValueError, match="do not split evenly"):
        split_sizes(10, 4, 3)
    with pytest.raises(ValueError, match="11 experiences for 10 classes"):
        split_sizes(10, 11, None)


def test_yaml_anchors_and_merge_keys(tmp: Path):
    (tmp / "a.yaml").write_text("x-opt: &opt {lr: 0.1, momentum: 0.5}\nstrategy: {<<: *opt, name: er, lr: 0.2}\n")
    assert load_yaml(tmp / "a.yaml") == {"strategy": {"lr": 0.2, "momentum": 0.5, "name": "er"}}  # x- keys dropped


@pytest.mark.parametrize(
    "text, message",
    [
        ("seed: [1\n", "YAML syntax error"),
        ("seed: 1\nseed: 2\n", "duplicate key 'seed'"),
        ("benchmark:\n  on: 1\n", "key 'on' is read as a boolean"),
        ("- 1\n- 2\n", "top level must be a mapping"),
    ],
)
def test_yaml_errors(tmp: Path, text: str, message: str):
    path = tmp / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_run_config(path)


def test_cli_exit_code_2_one_line_and_no_run_dir(tmp: Path, capsys):
    path = write_yaml(tmp / "cfg.yaml", tiny_config(tmp, train={"epochs": "many"}))
    code = main(["run", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: 'train.epochs': Input should be a valid integer")
    assert err.count("\n") == 1
    assert not (tmp / "runs").exists()


def test_cli_missing_config_file(tmp: Path, capsys):
    assert main(["run", str(tmp / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_cli_set_override_error_names_key(tmp: Path, capsys):
    path = write_yaml(tmp / "cfg.yaml", tiny_config(tmp))
    assert main(["run", str(path), "--set", "strategy.memory_sise=3"]) == 2
    assert "unknown key 'strategy.memory_sise'" in capsys.readouterr().err
    assert not (tmp / "runs").exists()


def test_cli_list(capsys):
    assert main(["list", "strategies"]) == 0
    out = capsys.readouterr().out
    for name in ("er", "finetune", "joint", "simplecil"):
        assert name in out
    assert main(["list", "backbones", "resnet1*"]) == 0
    assert "resnet18" in capsys.readouterr().out


def test_a_dataset_changed_by_set_warns_that_the_experiment_folder_did_not(tmp):
    import warnings

    from cl.api import load_config
    from tests.conftest import tiny_config

    base = tiny_config(tmp)
    with pytest.warns(UserWarning, match=r"changed the dataset from 'synthetic' to 'digits' but the run is still filed under experiment 'tiny'"):
        cfg = load_config(base, ["benchmark.dataset={name: digits}", "benchmark.n_experiences=5"])
    assert cfg.experiment == "tiny" and cfg.benchmark.dataset.name == "digits"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(base, ["benchmark.dataset={name: digits}", "benchmark.n_experiences=5", "experiment=digits_tiny"]).experiment == "digits_tiny"
        load_config(base, ["benchmark.dataset.n_classes=9"])  # the same dataset: no warning


def test_the_old_freeze_key_is_refused_with_the_new_names_and_old_runs_keep_their_identity(tmp):
    from cl.engine.rundir import result_config
    from tests.conftest import tiny_config

    with pytest.raises(ConfigError, match=r"'freeze' is now 'trainable', which says what trains \(frozen -> none, bn_only -> batchnorm, last_k -> last_blocks, all -> all\)"):
        parse_run_config(tiny_config(tmp, backbone={"name": "test_resnet", "freeze": "all"}))
    for new, old in (("none", "frozen"), ("all", "all"), ("batchnorm", "bn_only")):
        backbone = result_config(parse_run_config(tiny_config(tmp, backbone={"name": "test_resnet", "trainable": new})))["backbone"]
        assert backbone["freeze"] == old and "trainable" not in backbone  # hashed as runs made before the rename were


def test_overrides_inside_volatile_sections_do_not_rename_the_run():
    from cl.engine.rundir import override_label

    before = {"strategy": {"name": "er", "lr": 0.01}, "loader": {"num_workers": "auto"}}
    assert override_label(["loggers.tensorboard=true", "loggers.wandb={}", "loader.num_workers=0", "progress=false"], before) is None
    assert override_label(["loggers.mlflow={}", "strategy.lr=0.5"], before) == "strategy.lr=0.5"
    assert override_label(["loggersx=1"], before) == "loggersx=1"  # a prefix of a name is not its section
