"""`cl describe NAME` lists every option of every registered strategy, dataset and PEFT method."""

from __future__ import annotations

import pytest

from cl.cli import main
from cl.registry import BENCHMARKS, PEFT, STRATEGIES


@pytest.mark.parametrize("registry", [STRATEGIES, BENCHMARKS, PEFT], ids=["strategies", "datasets", "peft"])
def test_describe_lists_every_field_of_every_entry(registry, capsys: pytest.CaptureFixture):
    for name in registry.names():
        assert main(["describe", name]) == 0
        out = capsys.readouterr().out
        entry = registry.entry(name)
        model = entry.config or entry.builder
        fields = [k for k in getattr(model, "model_fields", {}) if k != "name"]
        listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ") and not line.startswith("  in a run")}
        assert set(fields) <= listed, (name, sorted(set(fields) - listed))
        assert f"'{name}'" in out.splitlines()[0]


def test_describe_shows_types_defaults_bounds_and_descriptions(capsys: pytest.CaptureFixture):
    assert main(["describe", "er"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "sgd | adam | adamw" in lines["optimizer"] and "= 'sgd'" in lines["optimizer"]
    assert "int | null" in lines["replay_batch_size"] and "= null" in lines["replay_batch_size"]
    assert "replay buffer capacity" in lines["memory_size"] and "= 200" in lines["memory_size"]
    assert main(["describe", "image_folder"]) == 0
    out = capsys.readouterr().out
    assert "benchmark.dataset: {name: image_folder" in out and "(required)" in out


def test_describe_unknown_name_is_one_line(capsys: pytest.CaptureFixture):
    assert main(["describe", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'nope' is not a strategy, dataset or PEFT method" in err[0]


def test_cl_run_help_lists_common_keys_that_exist_with_their_exact_choices(capsys):
    import re
    import typing

    import pytest

    from cl.cli import COMMON_KEYS, main
    from cl.config import RunConfig, _model_type, _unwrap
    from cl.strategies.er import ERConfig

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert COMMON_KEYS.splitlines()[1] in capsys.readouterr().out
    checked = 0
    for key, value in re.findall(r"([a-z_][a-z_.]*)=(\S+)", COMMON_KEYS):
        model, field = RunConfig, None
        for part in key.split("."):
            if model is None:
                break
            if key.startswith("strategy.") and part != "strategy" and model is not ERConfig:
                model = ERConfig
            if key.startswith("benchmark.dataset.") and part == "name":
                field = None
                break
            assert part in model.model_fields, f"{key}: no field {part}"
            field = model.model_fields[part]
            model = _model_type(field.annotation)
        checked += 1
        if field is not None and "|" in value and "..." not in value:
            inner, _ = _unwrap(field.annotation)
            assert typing.get_origin(inner) is typing.Literal, key
            assert set(value.split("|")) == set(typing.get_args(inner)), key
    assert checked >= 25
