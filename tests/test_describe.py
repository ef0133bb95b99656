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
