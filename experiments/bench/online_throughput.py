"""Online training throughput: our ER and generative classifier vs Avalanche's online path.

Same stream (online split Fashion-MNIST B4 Inc2, stream batches of 10, replay batches of 10,
memory 500), same frozen pretrained backbone, same optimiser. Avalanche is run the way its docs
describe online learning: ``split_online_stream(train_stream, experience_size=10)`` and one
``strategy.train`` call per mini-experience, with

* ``avalanche_replay``: Naive + ReplayPlugin(ReservoirSamplingBuffer) over the frozen backbone + a linear head
  over all classes (``IncrementalClassifier`` fails on ``split_online_stream``'s experiences);
* ``avalanche_scr``: SCR (its closest relative of the generative classifier) over the same backbone,
  with a trainable MLP "feature extractor" on top, like our projection;

both on images (Avalanche has no feature cache: the backbone runs on every step) and, as its best
case, on our cached features. Throughput counts training only: stream samples / training seconds.
For ours, the one-off feature extraction is reported and also folded into a second figure.

    python experiments/bench/online_throughput.py [--train-per-class 500] [--memory 500]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

from avalanche_side import FrozenExtractor, float_scenario, quiet_evaluator  # noqa: E402
from cl.config import apply_overrides, load_yaml, parse_run_config  # noqa: E402
from cl.engine.loop import prepare_inputs, run  # noqa: E402


def avalanche_online(method: str, scenario, feature_extractor: nn.Module, feature_dim: int, n_classes: int, args) -> dict:
    from avalanche.benchmarks.scenarios import split_online_stream
    from avalanche.models import SCRModel
    from avalanche.training import SCR, Naive
    from avalanche.training.plugins import ReplayPlugin
    from avalanche.training.storage_policy import ReservoirSamplingBuffer

    torch.manual_seed(0)
    if method == "scr":
        extractor = nn.Sequential(feature_extractor, nn.Linear(feature_dim, 256), nn.ReLU())
        model = SCRModel(extractor, nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128)))
        params = [p for p in model.parameters() if p.requires_grad]
        strategy = SCR(model=model, optimizer=torch.optim.SGD(params, lr=args.lr, momentum=0.9), mem_size=args.memory,
                       batch_size_mem=10, train_mb_size=10, train_epochs=1, eval_mb_size=1024, evaluator=quiet_evaluator())
    else:
        # a fixed head over all classes, like our ER: IncrementalClassifier cannot adapt to the mini-experiences
        # of split_online_stream (Avalanche 0.6: OnlineCLExperience has no classes_in_this_experience)
        model = nn.Sequential(feature_extractor, nn.Linear(feature_dim, n_classes))
        params = [p for p in model.parameters() if p.requires_grad]
        plugin = ReplayPlugin(args.memory, batch_size=10, batch_size_mem=10, storage_policy=ReservoirSamplingBuffer(args.memory))
        strategy = Naive(model=model, optimizer=torch.optim.SGD(params, lr=args.lr, momentum=0.9), criterion=nn.CrossEntropyLoss(),
                         train_mb_size=10, train_epochs=1, eval_mb_size=1024, plugins=[plugin], evaluator=quiet_evaluator())
    stream = split_online_stream(scenario.train_stream, experience_size=10, seed=0)
    samples, start = 0, time.perf_counter()
    with warnings.catch_warnings(record=True):
        for mini in stream:
            strategy.train(mini)
            samples += len(mini.dataset)
    seconds = time.perf_counter() - start
    return {"samples": samples, "train_s": round(seconds, 2), "samples_per_s": round(samples / seconds, 1)}


def features_scenario(bench, train_x, test_x):
    """The same stream over cached features (Avalanche's best case)."""
    from avalanche.benchmarks import nc_benchmark
    from avalanche.benchmarks.utils import DataAttribute
    from avalanche.benchmarks.utils.classification_dataset import ClassificationDataset

    def ds(x, y):
        return ClassificationDataset([torch.utils.data.TensorDataset(x, y)], data_attributes=[
            DataAttribute(y.tolist(), "targets"), DataAttribute([0] * len(y), "targets_task_labels", use_in_getitem=True)])

    sizes = [len(e.classes) for e in bench.experiences]
    return nc_benchmark(ds(train_x, bench.source.y_train), ds(test_x, bench.source.y_test), n_experiences=len(sizes), task_labels=False,
                        fixed_class_order=bench.class_order, per_exp_classes={0: sizes[0]}, class_ids_from_zero_from_first_exp=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "experiments/fmnist/b4inc2.yaml"))
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--memory", type=int, default=500)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-online-"))
    data = load_yaml(args.config)
    data = apply_overrides(data, [f"benchmark.train_per_class={args.train_per_class}", "benchmark.test_per_class=200", "benchmark.scenario=online",
                                  "benchmark.online.eval_every=1000000", "train.epochs=1", "train.checkpoint=false", "train.eval_future_tasks=false",
                                  "progress=false", f"out_dir={tmp}"])
    results: dict[str, dict] = {}
    for name, strategy in (("ours_er", {"name": "er", "memory_size": args.memory, "replay_batch_size": 10, "lr": args.lr}),
                           ("ours_generative", {"name": "generative_classifier", "memory_size": args.memory, "replay_batch_size": 10, "lr": args.lr})):
        m = run(parse_run_config({**data, "strategy": strategy, "run_name": name}))
        assert m is not None
        samples = round(m["train_samples_per_s"] * m["train_time_s"])
        results[name] = {
            "samples": samples, "train_s": round(m["train_time_s"], 2), "samples_per_s": round(m["train_samples_per_s"], 1),
            "feature_extraction_s": round(m["feature_time_s"], 2),
            "samples_per_s_incl_features": round(samples / (m["train_time_s"] + m["feature_time_s"]), 1),
            "final_acc": round(m["final_acc"], 4),
        }
    cfg = parse_run_config({**data, "strategy": {"name": "er"}})
    inputs = prepare_inputs(cfg, want_features=True)
    bench, images, backbone = inputs.bench, inputs.images, inputs.backbone
    n_classes = bench.n_classes
    img_scenario = float_scenario(images, backbone.transform)
    train_x, test_x = _pool_features(bench)
    feat_scenario = features_scenario(images, train_x, test_x)
    for method in ("replay", "scr"):
        results[f"avalanche_{method}_images"] = avalanche_online(method, img_scenario, FrozenExtractor(backbone.model), backbone.feature_dim, n_classes, args)
        results[f"avalanche_{method}_features"] = avalanche_online(method, feat_scenario, nn.Identity(), backbone.feature_dim, n_classes, args)
    ratios = {
        "er_vs_avalanche_replay_images": results["ours_er"]["samples_per_s"] / results["avalanche_replay_images"]["samples_per_s"],
        "er_vs_avalanche_replay_features": results["ours_er"]["samples_per_s"] / results["avalanche_replay_features"]["samples_per_s"],
        "generative_vs_avalanche_scr_images": results["ours_generative"]["samples_per_s"] / results["avalanche_scr_images"]["samples_per_s"],
        "generative_vs_avalanche_scr_features": results["ours_generative"]["samples_per_s"] / results["avalanche_scr_features"]["samples_per_s"],
    }
    out = {"stream_batch": 10, "replay_batch": 10, "memory": args.memory, "threads": torch.get_num_threads(),
           "backbone": f"{backbone.name} (frozen, {backbone.weights.get('source')})", "results": results,
           "speedups": {k: round(v, 1) for k, v in ratios.items()}}
    print(json.dumps(out, indent=2))


def _pool_features(bench):
    """Cached features back in pool order (the experiences hold them per experience)."""
    d = bench.experiences[0].train.x.shape[1]
    train = torch.empty(len(bench.source.y_train), d)
    test = torch.empty(len(bench.source.y_test), d)
    for e in bench.experiences:
        train[e.train_ids] = e.train.x
        test[e.test_ids] = e.test.x
    return train, test


if __name__ == "__main__":
    main()
