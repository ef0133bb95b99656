"""Images streamed from disk, memory-mapped feature caches, the ImageNet-R/-A and DomainNet sources and
the domain-incremental scenario: each equal to its in-memory counterpart, and each failing in one line."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cl.config import BenchmarkConfig, _specialise
from cl.data import disk
from cl.data.benchmark import build_benchmark
from cl.data.disk import Decode, DiskImages, ImageFiles, cat_images, loader_options
from cl.errors import ConfigError, DataError
from tests.conftest import write_yaml
from tests.fakes import write_domainnet, write_image_folder, write_imagenet_variant


def _validate(raw: dict) -> BenchmarkConfig:
    return _specialise(BenchmarkConfig, raw).model_validate(raw)


def _bench(root: Path, **kw) -> BenchmarkConfig:
    dataset = {"name": "image_folder", "root": str(root), "image_size": 8, **kw.pop("dataset", {})}
    return _validate({"dataset": dataset, "n_experiences": 2, **kw})


def _batches(bench, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for e in bench.experiences:
        out += [(x.clone(), y.clone()) for x, y in e.train.batches(5, g)]
        out += [(x.clone(), y.clone()) for x, y in e.test.batches(4)]
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    write_image_folder(root, 4, per_split=6, size=(13, 9))
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_equals_eager_sample_for_sample(tree: Path, workers: int):
    with loader_options(stream="never"):
        eager = build_benchmark(_bench(tree), Path("."), 0)
    with loader_options(stream="always", num_workers=workers):
        streamed = build_benchmark(_bench(tree), Path("."), 0)
        assert isinstance(streamed.experiences[0].train.x, DiskImages) and not eager.source.streamed
        got = _batches(streamed)
    want = _batches(eager)
    assert len(got) == len(want)
    for (a, ya), (b, yb) in zip(got, want):
        assert a.dtype == torch.uint8 and torch.equal(a, b) and torch.equal(ya, yb)
    # the same run identity either way: results may be reused across the two
    assert streamed.content_sha256() == eager.content_sha256()


def test_streamed_and_eager_normalise_alike_above_the_stats_subsample(tree: Path, monkeypatch: pytest.MonkeyPatch):
    """Channel statistics of image files come from the same seeded subsample whether the pool is
    streamed or decoded into memory: otherwise one run identity would hold two normalisations (a run
    killed streamed and resumed in memory would mix them). Found by the 50k-image benchmark, which
    also ran out of memory: the in-memory statistics cast the whole pool to int64 twice."""
    monkeypatch.setattr(disk, "STATS_LIMIT", 5)  # 24 training images: a subsample of 5
    with loader_options(stream="never"):
        eager = build_benchmark(_bench(tree), Path("."), 0)
    with loader_options(stream="always"):
        streamed = build_benchmark(_bench(tree), Path("."), 0)
    assert not eager.source.streamed and streamed.source.streamed
    assert eager.transform.mean == streamed.transform.mean and eager.transform.std == streamed.transform.std
    whole = eager.source.x_train.transpose(0, 1).reshape(3, -1).double() / 255
    assert eager.transform.mean != tuple(whole.mean(dim=1).tolist())  # the subsample, not the whole pool
    x = eager.source.x_train
    rows = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:5].sort().values
    sub = x[rows].transpose(0, 1).reshape(3, -1).double() / 255
    assert eager.transform.mean == pytest.approx(tuple(sub.mean(dim=1).tolist()), abs=1e-12)
    assert eager.transform.std == pytest.approx(tuple(max(v, 1 / 255) for v in sub.std(dim=1).tolist()), abs=1e-12)


def test_auto_streams_only_above_the_memory_limit(tree: Path):
    with loader_options(stream="auto", max_in_memory_gb=1.0):
        assert not build_benchmark(_bench(tree), Path("."), 0).source.streamed
    with loader_options(stream="auto", max_in_memory_gb=1e-9):
        assert build_benchmark(_bench(tree), Path("."), 0).source.streamed


def test_persistent_workers_survive_a_pass_left_half_way(tree: Path):
    files = ImageFiles(sorted(tree.glob("train/*/*.png")), Decode(8))
    x = DiskImages(files)
    plan = [torch.arange(i, min(i + 3, len(x))) for i in range(0, len(x), 3)]
    want = [files.decode_rows(p) for p in plan]
    with loader_options(num_workers=2):
        first = list(itertools.islice(x.iterate(plan), 2))  # abandoned after two batches (max_steps)
        loader = files._loader
        again = list(x.iterate(plan))
        nested = [(a, list(x.iterate(plan[:2]))) for a in itertools.islice(x.iterate(plan), 1)]  # a pass inside a pass
        assert files._loader is loader  # the same workers
    assert all(torch.equal(a, b) for a, b in zip(first + again, want[:2] + want))
    assert torch.equal(nested[0][0], want[0]) and all(torch.equal(a, b) for a, b in zip(nested[0][1], want[:2]))


def test_views_index_like_tensors(tree: Path):
    files = ImageFiles(sorted(tree.glob("train/*/*.png")), Decode(8))
    x, full = DiskImages(files), DiskImages(files).load()
    rows = torch.tensor([5, 0, 7])
    mask = torch.zeros(len(x), dtype=torch.bool)
    mask[[1, 3]] = True
    assert torch.equal(x[rows].load(), full[rows]) and torch.equal(x[2:6].load(), full[2:6])
    assert torch.equal(x[mask].load(), full[mask]) and torch.equal(x[4], full[4])
    assert x.shape == full.shape and len(x[rows]) == 3
    assert torch.equal(cat_images([x[rows], x[2:4]]).load(), torch.cat([full[rows], full[2:4]]))
    other = DiskImages(ImageFiles(files.paths, Decode(8)))  # other files object: decoded and concatenated
    assert torch.equal(cat_images([x[rows], other[2:4]]), torch.cat([full[rows], full[2:4]]))


def test_decode_crop_is_timm_eval_geometry(tmp_path: Path):
    # 40 x 20 image whose column i has red value i: shorter side 20 -> 10 (crop_pct 1), width 40 -> 20,
    # centre crop of 10 keeps columns 5..14 of the resized image, whose nearest source columns are 2j + 1
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :, 0] = np.arange(40)[None, :]
    Image.fromarray(arr).save(tmp_path / "a.png")
    raw = (tmp_path / "a.png").read_bytes()
    out = Decode(10, "RGB", "crop", 1.0, "nearest")(raw, "a.png")
    assert out.shape == (3, 10, 10) and out[0, 0].tolist() == [2 * j + 1 for j in range(5, 15)]
    # crop_pct 0.5: shorter side 20 (no resize of 20 x 40), centre 10 x 10: columns 15..24
    out = Decode(10, "RGB", "crop", 0.5, "nearest")(raw, "a.png")
    assert out[0, 0].tolist() == list(range(15, 25))
    squash = Decode(10, "RGB", "squash", 1.0, "nearest")(raw, "a.png")
    assert squash[0, 0].tolist() == [4 * i + 2 for i in range(10)]


def test_hub_tag_sets_the_decoding(tree: Path):
    from cl.config import BackboneConfig
    from cl.data.sources import ImageFolderConfig
    from cl.models.backbone import hub_input_hint

    hint = hub_input_hint(BackboneConfig.model_validate({"name": "vit_base_patch16_224.augreg_in21k", "weights": {"source": "hub"}}))
    assert hint == {"input_size": [3, 224, 224], "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center"}
    assert hub_input_hint(BackboneConfig.model_validate({"name": "resnet18"})) is None
    cfg = ImageFolderConfig(root=str(tree))
    assert cfg.decode(hint) == Decode(224, "RGB", "crop", 0.9, "bicubic")
    assert cfg.decode(None).resize == "squash" if cfg.image_size else True
    with pytest.raises(DataError, match="image_size: required"):
        cfg.decode(None)
    assert ImageFolderConfig(root=str(tree), image_size=32, resize="squash").decode(hint) == Decode(32, "RGB", "squash", 1.0, "bicubic")


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image_is_one_line(tmp_path: Path, workers: int):
    write_image_folder(tmp_path, 2, per_split=2)
    with loader_options(stream="always", num_workers=workers):
        bench = build_benchmark(_bench(tmp_path), Path("."), 0)  # (normalisation statistics decode the train split)
        (tmp_path / "test" / "class001" / "1.png").write_bytes(b"not a png")
        with pytest.raises(DataError) as err:
            for e in bench.experiences:
                list(e.test.batches(1))
    assert str(err.value) == f"{tmp_path / 'test' / 'class001' / '1.png'}: unreadable image (not a recognised image format)"


def test_class_balanced_memory_decodes_only_what_it_keeps(tree: Path):
    from cl.memory import ClassBalancedMemory

    with loader_options(stream="always"):
        streamed = build_benchmark(_bench(tree), Path("."), 0)
    eager = build_benchmark(_bench(tree), Path("."), 0)
    a, b = ClassBalancedMemory(5, torch.Generator().manual_seed(1)), ClassBalancedMemory(5, torch.Generator().manual_seed(1))
    for es, ee in zip(streamed.experiences, eager.experiences):
        a.update(es.train.x, es.train.y, es.index)
        b.update(ee.train.x, ee.train.y, ee.index)
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.t, b.t)


# ---- feature cache ------------------------------------------------------------------------------


def _entry(tmp_path: Path, rows=(11, 5), dim=3, dtype="float32", chunk=4):
    from cl.models.features import FeatureEntry

    return FeatureEntry(tmp_path / "e", {"train": rows[0], "test": rows[1]}, dim, dtype, chunk)


def _pools(rows=(11, 5), dim=3):
    g = torch.Generator().manual_seed(0)
    return {"train": torch.randn(rows[0], dim, generator=g), "test": torch.randn(rows[1], dim, generator=g)}


def test_cache_entry_is_memory_mapped_and_equal(tmp_path: Path):
    pools, calls = _pools(), []

    def extract(x, bar):
        calls.append(len(x))
        return x.clone()

    out, hit = _entry(tmp_path).fill(extract, pools, False)
    assert not hit and calls == [4, 4, 3, 4, 1] and all(torch.equal(out[k], pools[k]) for k in pools)
    again, hit = _entry(tmp_path).fill(extract, pools, False)
    assert hit and len(calls) == 5 and all(torch.equal(again[k], pools[k]) for k in pools)
    assert (tmp_path / "e" / "train.bin").stat().st_size == 11 * 3 * 4
    with pytest.warns(UserWarning, match="unusable"):  # another dtype in the same directory resets the entry
        half, _ = _entry(tmp_path, dtype="float16").fill(extract, pools, False)
    assert half["train"].dtype == torch.float32 and torch.equal(half["train"], pools["train"].half().float())


def test_interrupted_extraction_resumes_at_the_first_missing_chunk(tmp_path: Path):
    pools, calls = _pools(), []

    def dying(x, bar):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(len(x))
        return x.clone()

    with pytest.raises(KeyboardInterrupt):
        _entry(tmp_path).fill(dying, pools, False)
    state = json.loads((tmp_path / "e" / "state.json").read_text())
    assert [c is not None for c in state["chunks"]["train"]] == [True, True, False]

    resumed = []
    out, hit = _entry(tmp_path).fill(lambda x, bar: resumed.append(len(x)) or x.clone(), pools, False)
    assert not hit and resumed == [3, 4, 1] and all(torch.equal(out[k], pools[k]) for k in pools)


def test_damaged_chunk_is_extracted_again_with_a_warning(tmp_path: Path):
    pools = _pools()
    _entry(tmp_path).fill(lambda x, bar: x.clone(), pools, False)
    path = tmp_path / "e" / "train.bin"
    raw = bytearray(path.read_bytes())
    raw[20] ^= 0xFF  # inside chunk 0
    path.write_bytes(bytes(raw))
    redone = []
    with pytest.warns(UserWarning, match="1 chunk"):
        out, hit = _entry(tmp_path).fill(lambda x, bar: redone.append(len(x)) or x.clone(), pools, False)
    assert redone == [4] and torch.equal(out["train"], pools["train"])
    path.write_bytes(b"short")
    with pytest.warns(UserWarning, match="unusable"):
        out, _ = _entry(tmp_path).fill(lambda x, bar: x.clone(), pools, False)
    assert torch.equal(out["train"], pools["train"])


def test_streamed_run_end_to_end_with_float16_cache(tree: Path, tmp_path: Path, capsys):
    from cl.cli import main

    base = {"experiment": "disk", "out_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"), "progress": False,
            "benchmark": {"dataset": {"name": "image_folder", "root": str(tree), "image_size": 16}, "n_experiences": 2},
            "backbone": {"name": "test_resnet", "cache_dtype": "float16"},
            "strategy": {"name": "simplecil"}, "loader": {"stream": "always", "num_workers": 2}}
    write_yaml(tmp_path / "a.yaml", base)
    assert main(["run", str(tmp_path / "a.yaml")]) == 0
    run = tmp_path / "runs" / "disk" / "simplecil" / "seed0"
    streamed = json.loads((run / "metrics.json").read_text())
    env = json.loads((run / "env.json").read_text())
    assert env["benchmark"]["streamed"] is True and env["loader"]["num_workers"] == 2
    assert list((tmp_path / "cache" / "features").glob("*/train.bin"))
    # in memory, other loader settings: the same run (loader is not identity), the same numbers
    write_yaml(tmp_path / "b.yaml", {**base, "out_dir": str(tmp_path / "runs2"), "loader": {"stream": "never"}})
    assert main(["run", str(tmp_path / "b.yaml")]) == 0
    eager = json.loads((tmp_path / "runs2" / "disk" / "simplecil" / "seed0" / "metrics.json").read_text())
    env = json.loads((tmp_path / "runs2" / "disk" / "simplecil" / "seed0" / "env.json").read_text())
    assert eager["acc_matrix"] == streamed["acc_matrix"] and env["benchmark"]["streamed"] is False
    assert eager["feature_cache"] == "hit"


# ---- ImageNet-R / -A, DomainNet --------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["folders", "lists", "random"])
def test_imagenet_r_layouts(tmp_path: Path, layout: str):
    from cl.data.sources import ImageNetRConfig

    write_imagenet_variant(tmp_path, "imagenet-r", "flat" if layout == "random" else layout, per_class=3)
    src = ImageNetRConfig(root=str(tmp_path), split=layout, image_size=6).load(tmp_path)
    assert len(src.classes) == 200 and len(src.y_train) + len(src.y_test) == 600
    if layout == "random":
        assert len(src.y_test) == 120  # 20% of all images
    else:
        assert len(src.y_train) == 400 and len(src.y_test) == 200
    first = src.x_train[0]
    label = int(src.y_train[0])
    cls = label if layout != "lists" else 199 - label  # the lists number classes in reverse
    assert int(first[0, 0, 0]) == cls and src.classes[label].startswith("n")


def test_imagenet_a_and_bad_lists(tmp_path: Path):
    from cl.data.sources import ImageNetAConfig, ImageNetRConfig

    write_imagenet_variant(tmp_path, "imagenet-a", "folders")
    assert len(ImageNetAConfig(root=str(tmp_path), image_size=4).load(tmp_path).classes) == 200
    with pytest.raises(DataError, match="imagenet-r not found.*no automatic download"):
        ImageNetRConfig(root=str(tmp_path), image_size=4).load(tmp_path)
    write_imagenet_variant(tmp_path, "imagenet-r", "lists")
    (tmp_path / "imagenet-r_test.yaml").write_text("data: [a/b.jpg]\ntargets: [0]\n")
    with pytest.raises(DataError, match=r"does not end in imagenet-r/<wnid>/<file>"):
        ImageNetRConfig(root=str(tmp_path), split="lists", image_size=4).load(tmp_path)
    (tmp_path / "imagenet-r_test.yaml").write_text("- just a list\n")
    with pytest.raises(DataError, match="not a split list"):
        ImageNetRConfig(root=str(tmp_path), split="lists", image_size=4).load(tmp_path)


@pytest.fixture(scope="module")
def domainnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dn")
    write_domainnet(root, n_classes=345, per_class=1)
    return root


def test_domain_incremental_stream(domainnet: Path):
    cfg = _validate({"dataset": {"name": "domainnet", "root": str(domainnet / "domainnet"), "image_size": 4,
                                                      "domains": ["sketch", "real"]},
                                          "scenario": "domain_incremental", "n_experiences": 2})
    bench = build_benchmark(cfg, domainnet, 0)
    assert bench.class_order == list(range(345)) and [e.classes for e in bench.experiences] == [list(range(345))] * 2
    assert [len(e.train) for e in bench.experiences] == [345, 345] and [len(e.test) for e in bench.experiences] == [345, 345]
    sketch, real = bench.experiences
    # red channel = (class + 40 * domain index in the official order) % 256: sketch is 5, real is 4
    assert int(sketch.train.x[3][0, 0, 0]) == (int(sketch.train.y[3]) + 200) % 256
    assert int(real.test.x[7][0, 0, 0]) == (int(real.test.y[7]) + 160) % 256
    assert bench.describe()["domains"] == ["sketch", "real"]


@pytest.mark.parametrize(("change", "message"), [
    ({"n_experiences": 3}, "n_experiences: 3, but the stream has one experience per domain"),
    ({"base_classes": 5}, "base_classes: not used in the domain-incremental scenario"),
    ({"dataset": {"name": "synthetic"}}, "domain_incremental needs a multi-domain dataset"),
])
def test_domain_incremental_refusals(domainnet: Path, change, message):
    from cl.config import check_benchmark

    raw = {"dataset": {"name": "domainnet", "root": str(domainnet), "domains": ["sketch", "real"]},
           "scenario": "domain_incremental", "n_experiences": 2, **change}
    with pytest.raises(ConfigError, match=message):
        check_benchmark(_validate(raw))


def test_domainnet_bad_list_line(tmp_path: Path):
    from cl.data.sources import DomainNetConfig

    write_domainnet(tmp_path, domains=("real",), n_classes=2)
    (tmp_path / "domainnet" / "real_test.txt").write_text("real/class_000/x.jpg zero\n")
    with pytest.raises(DataError, match=r"real_test.txt:1: expected '<domain>/<class>/<file> <label 0..344>'"):
        DomainNetConfig(root=str(tmp_path / "domainnet"), domains=["real"]).load(tmp_path)


@pytest.mark.parametrize("strategy", ["simplecil", "peft_per_task"])
def test_domain_incremental_through_the_cli(domainnet: Path, tmp_path: Path, capsys, strategy: str):
    from cl.cli import main

    config = {"experiment": "dil", "out_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"), "progress": False,
              "benchmark": {"dataset": {"name": "domainnet", "root": str(domainnet / "domainnet"), "image_size": 16,
                                        "domains": ["quickdraw", "clipart", "real"]},
                            "scenario": "domain_incremental", "n_experiences": 3, "train_per_class": 1},
              "backbone": {"name": "test_resnet"}, "strategy": {"name": strategy}}
    write_yaml(tmp_path / "c.yaml", config)
    code = main(["run", str(tmp_path / "c.yaml")])
    err = capsys.readouterr().err
    if strategy == "peft_per_task":
        assert code == 2 and "peft_per_task assumes new classes per experience" in err and not (tmp_path / "runs").exists()
        return
    assert code == 0, err
    metrics = json.loads((tmp_path / "runs" / "dil" / "simplecil" / "seed0" / "metrics.json").read_text())
    acc = metrics["acc_matrix"]
    assert len(acc) == 3 and all(v is not None for v in acc[2])  # every domain evaluated after the last
    env = json.loads((tmp_path / "runs" / "dil" / "simplecil" / "seed0" / "env.json").read_text())
    assert env["benchmark"]["domains"] == ["quickdraw", "clipart", "real"]


def test_a_constant_channel_does_not_divide_by_zero(tmp_path: Path):
    from PIL import Image

    for split in ("train", "test"):
        for c in range(2):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            Image.new("RGB", (6, 6), (10 * c, 0, 0)).save(tmp_path / split / f"c{c}" / "a.png")
    bench = build_benchmark(_bench(tmp_path), Path("."), 0)
    assert min(bench.transform.std) == pytest.approx(1 / 255)
    x = bench.transform(bench.experiences[0].train.x)
    assert torch.isfinite(x).all()


def test_a_symlinked_cache_file_is_never_written_through(tmp_path: Path):
    from cl.models.features import FeatureEntry

    victim = tmp_path / "victim.bin"
    victim.write_bytes(bytes(11 * 3 * 4))
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "train.bin").symlink_to(victim)
    with pytest.raises(OSError, match="train.bin in the cache entry is a symlink"):
        FeatureEntry(tmp_path / "e", {"train": 11, "test": 5}, 3, "float32", 4).fill(lambda x, bar: x.clone(), _pools(), False)
    assert victim.read_bytes() == bytes(11 * 3 * 4)
