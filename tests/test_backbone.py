"""Backbones: weights from file / hub (offline) / pretraining, safe loading, freezing, checksums."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from cl.config import BackboneConfig, BenchmarkConfig, _specialise, parse_run_config
from cl.data.benchmark import build_benchmark
from cl.data.transforms import BatchTransform
from cl.errors import ConfigError, WeightsError
from cl.models.backbone import check_input, create_backbone, load_weights_file
from cl.models.pretrain import get_pretrained
from cl.utils import file_sha256, state_dict_sha256
from tests.conftest import tiny_config

GREY16 = BatchTransform(1, 1, None, (0.5,), (0.5,))
PROJECT = Path(__file__).resolve().parent.parent


def backbone_cfg(**kw) -> BackboneConfig:
    return BackboneConfig.model_validate({"name": "test_resnet", **kw})


def reference_model(seed: int = 5) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=0, in_chans=1).eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_file_weights_round_trip(tmp: Path, suffix: str):
    ref = reference_model()
    path = tmp / f"w{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": ref.state_dict()}, path)
    bb = create_backbone(backbone_cfg(weights={"source": "file", "path": str(path)}), GREY16, seed=0)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(bb.model(x), ref(x))
    assert bb.weights["file_sha256"] == file_sha256(path)
    assert bb.weights["sha256"] == state_dict_sha256(ref)


def test_file_weights_sha_mismatch_and_wrong_architecture(tmp: Path):
    path = tmp / "w.safetensors"
    save_file({k: v.contiguous() for k, v in reference_model().state_dict().items()}, str(path))
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        create_backbone(backbone_cfg(weights={"source": "file", "path": str(path), "sha256": "0" * 64}), GREY16, seed=0)
    vit = {"name": "test_vit", "kwargs": {"img_size": 16, "patch_size": 4}, "weights": {"source": "file", "path": str(path)}}
    with pytest.raises(WeightsError, match="do not match backbone 'test_vit'"):
        create_backbone(BackboneConfig.model_validate(vit), GREY16, seed=0)


def test_pickled_code_in_checkpoint_is_refused(tmp: Path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp / "evil.pth"
    torch.save({"weight": Evil()}, path)
    with pytest.raises(WeightsError, match="cannot load weights safely"):
        load_weights_file(path)
    (tmp / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="cannot load weights safely"):
        load_weights_file(tmp / "junk.safetensors")


def test_hub_weights_load_offline_from_a_local_hub_cache(tmp: Path):
    """The real `pretrained=True` hub path, served from a hub cache the test writes (no network)."""
    torch.manual_seed(0)
    ref = timm.create_model("test_vit", num_classes=0)
    snapshot = tmp / "hf" / "hub" / "models--timm--test_vit.r160_in1k" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(snapshot / "model.safetensors"))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    torch.save(ref.state_dict(), tmp / "ref.pth")
    script = textwrap.dedent(
        f"""
        import torch
        from cl.config import BackboneConfig
        from cl.data.transforms import BatchTransform
        from cl.models.backbone import create_backbone
        cfg = BackboneConfig.model_validate({{"name": "test_vit", "weights": {{"source": "hub"}}}})
        bb = create_backbone(cfg, BatchTransform(3, 3, 160, (0.1,) * 3, (0.2,) * 3), seed=0)  # dataset stats
        ref = torch.load({str(tmp / "ref.pth")!r}, weights_only=True)
        state = bb.model.state_dict()
        assert all(torch.equal(state[k], ref[k]) for k in ref), "weights differ"
        assert bb.weights["hf_hub_id"] == "timm/test_vit.r160_in1k", bb.weights
        assert bb.transform.mean == (0.5, 0.5, 0.5) and bb.transform.std == (0.5, 0.5, 0.5)  # replaced by the tag's own
        assert bb.weights["pretrained_input"]["input_size"] == (3, 160, 160), bb.weights  # recorded with the run
        print("ok", bb.weights["sha256"][:12])
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(PROJECT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=PROJECT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")

    # a whole run from a YAML: an image folder decoded as the tag's weights expect (160 px, bicubic,
    # shorter side to 160 / 0.95, centre crop), normalised with the tag's mean/std
    from tests.fakes import write_image_folder

    write_image_folder(tmp / "images", 4, per_split=2, size=(40, 30))
    config = {"experiment": "hub", "out_dir": str(tmp / "runs"), "cache_dir": str(tmp / "cache"), "progress": False,
              "benchmark": {"dataset": {"name": "image_folder", "root": str(tmp / "images"), "image_size": None}, "n_experiences": 2},
              "backbone": {"name": "test_vit", "weights": {"source": "hub"}}, "strategy": {"name": "simplecil"}}
    (tmp / "hub.yaml").write_text(json.dumps(config))
    out = subprocess.run([sys.executable, "-m", "cl", "run", str(tmp / "hub.yaml")], env=env, capture_output=True, text=True, cwd=PROJECT)
    assert out.returncode == 0, out.stderr[-2000:]
    run_env = json.loads((tmp / "runs" / "hub" / "simplecil" / "seed0" / "env.json").read_text())
    assert run_env["benchmark"]["decode"] == {"size": 160, "mode": "RGB", "resize": "crop", "crop_pct": 0.95, "interpolation": "bicubic"}
    assert run_env["input_transform"]["mean"] == [0.5, 0.5, 0.5] and run_env["benchmark"]["input_shape"] == [3, 160, 160]

    env["HF_HOME"] = str(tmp / "empty")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=PROJECT)
    assert out.returncode != 0 and "could not fetch hub weights for 'test_vit'" in out.stderr


def trainable(bb) -> set[str]:
    return {n for n, p in bb.model.named_parameters() if p.requires_grad}


def test_trainable_policies_train_only_the_intended_parameters():
    names = {n for n, _ in reference_model().named_parameters()}
    assert trainable(create_backbone(backbone_cfg(trainable="none"), GREY16, seed=0)) == set()
    assert trainable(create_backbone(backbone_cfg(trainable="all"), GREY16, seed=0)) == names
    bn = trainable(create_backbone(backbone_cfg(trainable="batchnorm"), GREY16, seed=0))
    assert bn and all(".bn" in n or "conv1.1" in n or "conv1.4" in n or n.startswith("bn1") or "downsample.2" in n for n in bn)
    last = trainable(create_backbone(backbone_cfg(trainable="last_blocks", trainable_blocks=1), GREY16, seed=0))
    assert last == {n for n in names if n.startswith("layer4.")}


def test_last_k_on_vit_includes_final_norm_and_frozen_parts_stay_in_eval():
    cfg = BackboneConfig.model_validate({"name": "test_vit", "kwargs": {"img_size": 16, "patch_size": 4}, "trainable": "last_blocks", "trainable_blocks": 2})
    bb = create_backbone(cfg, GREY16, seed=0)
    depth = len(bb.model.blocks)
    assert trainable(bb) == {n for n, _ in bb.model.named_parameters() if n.startswith((f"blocks.{depth - 1}.", f"blocks.{depth - 2}.", "norm."))}
    bb.set_train(True)
    assert bb.model.blocks[-1].training and not bb.model.blocks[0].training and not bb.model.patch_embed.training


def test_bn_only_on_a_model_without_batchnorm_is_a_config_error():
    cfg = BackboneConfig.model_validate({"name": "test_vit", "kwargs": {"img_size": 16, "patch_size": 4}, "trainable": "batchnorm"})
    with pytest.raises(ConfigError, match="has no BatchNorm layers"):
        create_backbone(cfg, GREY16, seed=0)


def test_input_size_mismatch_is_a_clear_error():
    vit = {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1}}
    bb = create_backbone(BackboneConfig.model_validate(vit), GREY16, seed=0)
    with pytest.raises(ConfigError, match="cannot take \\(1, 16, 16\\) inputs"):
        check_input(bb, (1, 16, 16), torch.device("cpu"))


def test_pretraining_is_deterministic_and_cached(tmp: Path):
    raw = {"dataset": {"name": "synthetic", "n_classes": 4, "train_per_class": 16, "test_per_class": 4, "image_size": 16}, "n_experiences": 2}
    bench = build_benchmark(_specialise(BenchmarkConfig, raw).model_validate(raw), tmp, seed=0)
    cfg = backbone_cfg(weights={"source": "pretrain", "pretrain": {"epochs": 1, "batch_size": 8}})
    kw = dict(data_root=tmp, seed=0, device=torch.device("cpu"))
    s1, m1 = get_pretrained(cfg, bench, cache_dir=tmp / "c1", **kw)
    s2, m2 = get_pretrained(cfg, bench, cache_dir=tmp / "c2", **kw)
    assert m1["cache"] == m2["cache"] == "miss"
    assert m1["sha256"] == m2["sha256"] == state_dict_sha256(s1) == state_dict_sha256(s2)
    s3, m3 = get_pretrained(cfg, bench, cache_dir=tmp / "c1", **kw)
    assert m3["cache"] == "hit" and m3["sha256"] == m1["sha256"]
    assert m1["pretrained_on"].startswith("base session of synthetic (2 classes)")
    bb = create_backbone(cfg, bench.transform, seed=0, pretrained_state=s1, pretrain_info=m1)
    assert bb.weights["sha256"] == m1["sha256"] and bb.weights["source"] == "pretrain"


def test_pretraining_on_a_source_benchmark(tmp: Path):
    raw = {"dataset": {"name": "synthetic", "n_classes": 4, "train_per_class": 8, "test_per_class": 4, "image_size": 16}, "n_experiences": 2}
    bench = build_benchmark(_specialise(BenchmarkConfig, raw).model_validate(raw), tmp, seed=0)
    source = {"dataset": {"name": "digits"}, "n_experiences": 1, "train_per_class": 5}
    pretrain = {"train_on": "benchmark", "benchmark": source, "epochs": 1}
    run = parse_run_config(tiny_config(tmp, backbone={"name": "test_resnet", "weights": {"source": "pretrain", "pretrain": pretrain}}))
    _, meta = get_pretrained(run.backbone, bench, data_root=tmp, cache_dir=tmp / "c", seed=0, device=torch.device("cpu"))
    assert meta["pretrained_on"] == "benchmark digits (10 classes)" and meta["n_samples"] == 50
    assert meta["transform"]["size"] == 16  # source images resized to the target's input size
