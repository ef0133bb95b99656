"""Representational-shift maths on hand-made features, and the probe pipeline end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cl.analysis import shift as S
from cl.cli import main
from tests.conftest import tiny_config, write_yaml


def test_linear_cka_by_hand_one_dimension():
    # 1-D linear CKA is the squared Pearson correlation: x=[1,2,3], y=[1,3,2] -> r=0.5 -> 0.25
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([[1.0], [3.0], [2.0]])
    assert S.linear_cka(x, y) == pytest.approx(0.25)


def test_linear_cka_by_hand_two_dimensions():
    # centred X (3x2), Y (3x1): ||Y'X||^2 = 5, ||X'X||_F = sqrt(10), ||Y'Y||_F = 2
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    y = torch.tensor([[1.0], [0.0], [-1.0]])
    assert S.linear_cka(x, y) == pytest.approx(5 / (2 * math.sqrt(10)))
    # the Gram-matrix form gives the same number
    assert S.cka(S.gram_linear(x), S.gram_linear(y)) == pytest.approx(5 / (2 * math.sqrt(10)))


def test_cka_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    for y in (x @ q, 3.7 * x, x + 5.0, 2.0 * x @ q - 1.0):  # orthogonal, isotropic scale, translation
        assert S.linear_cka(x, y) == pytest.approx(1.0, abs=1e-9)
        assert S.linear_cka(x, y, debiased=True) == pytest.approx(1.0, abs=1e-9)
        assert S.rbf_cka(x, y) == pytest.approx(1.0, abs=1e-9)  # median bandwidth scales with the data
    # not invariant to anisotropic scaling
    assert S.linear_cka(x, x * torch.linspace(0.1, 10, 8)) < 0.99


def test_debiased_cka_matches_song_et_al_and_removes_small_sample_bias():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 30, generator=g), torch.randn(12, 30, generator=g)
    k, l = S.gram_linear(x), S.gram_linear(y)
    # the centred-Gram implementation equals the explicit U-statistic (Song et al. 2012, eq. 5)
    via_centering = float(torch.sum(S.center_gram(k, True) * S.center_gram(l, True))) / (12 * 9)
    assert via_centering == pytest.approx(S.hsic_unbiased(k, l), rel=1e-9)
    expected = S.hsic_unbiased(k, l) / math.sqrt(S.hsic_unbiased(k, k) * S.hsic_unbiased(l, l))
    assert S.linear_cka(x, y, debiased=True) == pytest.approx(expected, rel=1e-9)
    # independent features, few samples: the biased estimate is far from 0, the debiased one is not
    assert S.linear_cka(x, y) > 0.3
    assert abs(S.linear_cka(x, y, debiased=True)) < 0.15
    with pytest.raises(ValueError, match="at least 4"):
        S.linear_cka(x[:3], y[:3], debiased=True)


def test_feature_and_prototype_drift_by_hand():
    before = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 1.0]])
    after = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 1.0], [3.0, 1.0]])
    d = S.feature_drift(before, after)
    norms = [1.0, 1.0, math.sqrt(2), math.sqrt(10)]
    assert d["l2"] == pytest.approx(0.25)  # one row moved by 1
    assert d["rel_l2"] == pytest.approx(0.25 / (sum(norms) / 4))
    assert d["cosine"] == pytest.approx((1 - 1 / math.sqrt(2)) / 4)
    labels = torch.tensor([0, 0, 1, 1])
    p = S.prototype_drift(before, after, labels)
    # class 0 mean moves from (0.5, 0.5) to (0.5, 1.0); class 1 does not move
    assert p["l2"] == pytest.approx(0.25)


def test_bn_mean_error_by_hand():
    e = S.bn_mean_error(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 5.0]), torch.tensor([1.0, 1.0, 4.0]))
    assert e["mae"] == pytest.approx(2 / 3)
    assert e["rel_l2"] == pytest.approx(2 / math.sqrt(30))
    assert e["z"] == pytest.approx((2 / 4) / 3)  # |3 - 5| / 4 in the third channel


def test_shift_tables_on_hand_made_probes():
    f = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(20) % 2
    probes = {
        0: {"task0/feat/a": f, "task0/labels/y": y},
        1: {"task0/feat/a": f * 2, "task0/labels/y": y, "task1/feat/a": f, "task1/labels/y": y,
            "task0/bn_batch/bn": torch.tensor([1.0, 1.0]), "task0/bn_running/bn": torch.tensor([1.0, 2.0])},
    }
    tables = S.shift_tables(probes)
    cka = {(r["task"], r["experience"]): r["cka"] for r in tables["cka"]}
    assert cka[(0, 0)] == pytest.approx(1.0) and cka[(0, 1)] == pytest.approx(1.0) and (1, 1) in cka
    drift = {(r["task"], r["experience"]): r for r in tables["drift"]}
    assert drift[(0, 1)]["rel_l2"] == pytest.approx(1.0) and drift[(0, 1)]["proto_rel_l2"] == pytest.approx(1.0)
    assert tables["bn"] == [{"layer": "bn", "task": 0, "experience": 1, "variant": "used", "mae": 0.5, "rel_l2": pytest.approx(1 / math.sqrt(2))}]
    summary = S.summarize_shift(tables, {"feat": ["a"], "bn": ["bn"]})
    assert summary["layers"]["a"]["cka"] == pytest.approx(1.0) and summary["cka_curve"]["a"] == [None, pytest.approx(1.0)]


def test_probes_saved_by_the_loop_and_cl_shift(tmp: Path, shared_cache: Path, capsys):
    cfg = tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "finetune", "lr": 0.1},
                      backbone={"name": "test_resnet", "trainable": "all", "weights": {"source": "pretrain", "pretrain": {"epochs": 2, "batch_size": 32}}},
                      shift={"enabled": True, "per_class": 6})
    path = write_yaml(tmp / "cfg.yaml", cfg)
    assert main(["run", str(path)]) == 0
    run_dir = tmp / "runs" / "tiny" / "finetune" / "seed0"
    probes, order = S.load_probes(run_dir)
    assert sorted(probes) == [0, 1, 2]
    assert order["feat"][-1] == "embedding" and order["feat"][0] == "act1" and "bn1" in order["bn"]
    assert probes[2]["task0/feat/layer4"].dtype == torch.float16 and probes[2]["task0/feat/layer4"].shape[0] == 12
    assert "task2/feat/layer4" in probes[2] and "task2/feat/layer4" not in probes[1]  # only tasks seen so far
    capsys.readouterr()
    assert main(["shift", str(run_dir)]) == 0
    assert "CKA" in capsys.readouterr().out
    summary = json.loads((run_dir / "shift" / "shift.json").read_text())
    ckas = [v["cka"] for v in summary["layers"].values()]
    assert all(0 <= c <= 1 + 1e-6 for c in ckas)
    assert summary["layers"]["layer4"]["cka"] < 0.999  # the whole backbone trains: its features moved
    for name in ("cka.csv", "drift.csv", "bn.csv", "summary.md", "cka_task1.png", "cka_by_layer.png", "bn_error_by_layer.png"):
        assert (run_dir / "shift" / name).is_file(), name


def test_frozen_backbone_shows_no_shift_in_its_layers(tmp: Path, shared_cache: Path):
    cfg = tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "er", "memory_size": 12}, shift={"enabled": True, "per_class": 6})
    from cl.config import parse_run_config
    from cl.engine.loop import run

    run(parse_run_config(cfg))
    summary = S.analyse_run(tmp / "runs" / "tiny" / "er" / "seed0")
    for layer, v in summary["layers"].items():
        assert v["cka"] == pytest.approx(1.0, abs=1e-3), layer  # cached features: the backbone is bit-identical
    assert all(v["old_tasks"] is not None for v in summary["bn"].values()) and summary["bn_metric"] == "z"


def test_shift_without_probes_is_a_clear_error(tmp: Path, capsys):
    (tmp / "run").mkdir()
    assert main(["shift", str(tmp / "run")]) == 2
    assert "no probes saved" in capsys.readouterr().err
