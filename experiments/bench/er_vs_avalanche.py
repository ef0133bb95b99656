"""ER in this framework vs Avalanche's ``Replay``: same stream, backbone and hyper-parameters.

Both train a linear classifier over a frozen pretrained backbone (the quickstart's, pretrained on
the base session), with SGD(lr, momentum), the same epochs, batch size and replay memory size.
Ours caches the backbone's features once; Avalanche runs the backbone on every step.

    python experiments/bench/er_vs_avalanche.py [--config experiments/fmnist/b4inc2.yaml] [--repeats 1]

Prints one JSON object (and a small table) with wall time and final accuracy of each side.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

from cl.analysis import metrics as M  # noqa: E402
from avalanche_side import FrozenExtractor, float_scenario, quiet_evaluator, run_avalanche  # noqa: E402
from cl.config import apply_overrides, load_yaml, parse_run_config  # noqa: E402
from cl.engine.loop import prepare_inputs, run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "experiments/fmnist/b4inc2.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--memory", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()

    torch.set_num_threads(torch.get_num_threads())
    tmp = Path(tempfile.mkdtemp(prefix="bench-er-"))
    data = apply_overrides(load_yaml(args.config), args.overrides)
    data.update(progress=False, out_dir=str(tmp / "runs"), experiment="bench")
    data["train"] = {**data.get("train", {}), "epochs": args.epochs, "batch_size": args.batch_size, "eval_future_tasks": False, "checkpoint": False}
    data["strategy"] = {"name": "er", "lr": args.lr, "momentum": 0.9, "memory_size": args.memory}
    cfg = parse_run_config(data)

    # Pretrained backbone from the shared cache (built once, outside both timings).
    inputs = prepare_inputs(cfg, want_features=False)
    bench, backbone = inputs.images, inputs.backbone

    # --- ours, cold feature cache: feature extraction is inside the measured time ---------------
    cold = parse_run_config({**data, "cache_dir": str(tmp / "cache")})
    shutil.copytree(cfg.resolved_cache_dir() / "backbones", tmp / "cache" / "backbones")
    t0 = time.perf_counter()
    ours = run(cold)
    ours_wall = time.perf_counter() - t0
    assert ours is not None

    # --- Avalanche Replay ---------------------------------------------------------------------
    from avalanche.models import IncrementalClassifier
    from avalanche.training import Replay

    scenario = float_scenario(bench, backbone.transform)
    torch.manual_seed(cfg.seed)
    model = torch.nn.Sequential(FrozenExtractor(backbone.model), IncrementalClassifier(backbone.feature_dim, initial_out_features=len(bench.experiences[0].classes)))
    head_params = list(model[1].parameters())
    strategy = Replay(
        model=model, optimizer=torch.optim.SGD(head_params, lr=args.lr, momentum=0.9), criterion=torch.nn.CrossEntropyLoss(),
        mem_size=args.memory, train_mb_size=args.batch_size, train_epochs=args.epochs, eval_mb_size=cfg.train.eval_batch_size,
        device="cpu", evaluator=quiet_evaluator(),
    )
    t0 = time.perf_counter()
    theirs = run_avalanche(strategy, scenario)
    theirs_wall = time.perf_counter() - t0
    n_test = [len(e.test) for e in bench.experiences]

    result = {
        "stream": f"{cfg.benchmark.dataset.name}, {len(n_test)} experiences, {sum(len(e.train) for e in bench.experiences)} train samples",
        "backbone": f"{backbone.name} (frozen, {backbone.weights.get('source')})",
        "hyper_parameters": {"epochs": args.epochs, "batch_size": args.batch_size, "memory": args.memory, "lr": args.lr},
        "threads": torch.get_num_threads(),
        "ours": {
            "wall_time_s": round(ours_wall, 2),
            "feature_extraction_s": round(ours["feature_time_s"], 2),
            "train_s": round(ours["train_time_s"], 2),
            "eval_s": round(ours["eval_time_s"], 2),
            "final_acc": round(ours["final_acc"], 4),
            "forgetting": round(ours["forgetting"], 4),
        },
        "avalanche_replay": {
            "wall_time_s": round(theirs_wall, 2),
            "train_s": round(theirs["train_time_s"], 2),
            "eval_s": round(theirs["eval_time_s"], 2),
            "final_acc": round(M.final_acc(theirs["acc_matrix"], n_test), 4),
            "forgetting": round(M.forgetting(theirs["acc_matrix"]), 4),
        },
    }
    result["speedup"] = round(theirs_wall / ours_wall, 2)
    print(json.dumps(result, indent=2))
    print(
        f"\nER (ours): {ours_wall:.1f}s, final acc {100 * ours['final_acc']:.1f}%  |  "
        f"Avalanche Replay: {theirs_wall:.1f}s, final acc {100 * result['avalanche_replay']['final_acc']:.1f}%  |  "
        f"speed-up x{result['speedup']}"
    )
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
