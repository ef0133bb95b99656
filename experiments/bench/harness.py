"""One benchmark harness: our strategies vs Avalanche's, side by side, each in its own process.

Every item runs in a fresh child process (so its peak RSS is its own) on the same stream, frozen
pretrained backbone, batch sizes and epochs, and reports wall time, samples/s, final accuracy,
replay-memory bytes and peak RSS:

* offline (the quickstart stream, split Fashion-MNIST B4 Inc2, 5 epochs, batch 64, SGD lr 0.01
  momentum 0.9, memory 200): ER, task-aware ER and SimpleCIL (ours, feature extraction included
  with a cold feature cache) vs Avalanche ``Naive`` and ``Replay`` (backbone run on every step);
* online (500 images per class, stream and replay batches of 10, memory 500): our ER and
  generative classifier vs Avalanche ``Replay`` and ``SCR`` through ``split_online_stream``;
* PEFT (``peft_speed.py``): training samples/s and inference latency hooked / merged / plain.

    python experiments/bench/harness.py [--only offline|online|peft] > bench.json

Prints one JSON object on stdout and a Markdown summary on stderr. Targets: offline ≥ 5× faster at
equal or better accuracy, online ≥ 3× samples/s.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
warnings.filterwarnings("ignore")

OFFLINE = ["ours_er", "ours_er_task_aware", "ours_simplecil", "avalanche_naive", "avalanche_replay"]
ONLINE = ["online_ours_er", "online_ours_generative", "online_avalanche_replay", "online_avalanche_scr"]
PEFT = ["peft"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---- children ----------------------------------------------------------------------------------


def _offline_data(tmp: Path) -> dict:
    from cl.config import load_yaml

    data = load_yaml(ROOT / "experiments/fmnist/b4inc2.yaml")
    data.update(progress=False, out_dir=str(tmp / "runs"), experiment="bench")
    data["train"] = {**data.get("train", {}), "epochs": 5, "batch_size": 64, "eval_future_tasks": False, "checkpoint": False}
    return data


def offline_item(item: str) -> dict:
    from cl.analysis import metrics as M
    from avalanche_side import FrozenExtractor, float_scenario, quiet_evaluator, run_avalanche
    from cl.config import parse_run_config
    from cl.engine.loop import prepare_inputs, run

    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    data = _offline_data(tmp)
    strategy = {"ours_er": {"name": "er", "memory_size": 200}, "ours_er_task_aware": {"name": "er_task_aware", "memory_size": 200},
                "ours_simplecil": {"name": "simplecil"}}.get(item, {"name": "er", "memory_size": 200})
    if strategy["name"] != "simplecil":
        strategy.update(lr=0.01, momentum=0.9)
    cfg = parse_run_config({**data, "strategy": strategy})
    inputs = prepare_inputs(cfg, want_features=False)  # the pretrained backbone, outside the timings
    bench, backbone = inputs.images, inputs.backbone
    n_train = sum(len(e.train) for e in bench.experiences)
    if item.startswith("ours"):
        cold = parse_run_config({**data, "strategy": strategy, "cache_dir": str(tmp / "cache")})
        shutil.copytree(cfg.resolved_cache_dir() / "backbones", tmp / "cache" / "backbones")
        t0 = time.perf_counter()
        m = run(cold)
        wall = time.perf_counter() - t0
        assert m is not None
        out = {"wall_time_s": wall, "final_acc": m["final_acc"], "forgetting": m["forgetting"], "memory_bytes": m["memory_bytes"]}
    else:
        from avalanche.models import IncrementalClassifier
        from avalanche.training import Naive, Replay

        scenario = float_scenario(bench, backbone.transform)
        torch.manual_seed(cfg.seed)
        model = torch.nn.Sequential(FrozenExtractor(backbone.model), IncrementalClassifier(backbone.feature_dim, initial_out_features=len(bench.experiences[0].classes)))
        common = dict(model=model, optimizer=torch.optim.SGD(list(model[1].parameters()), lr=0.01, momentum=0.9), criterion=torch.nn.CrossEntropyLoss(),
                      train_mb_size=64, train_epochs=5, eval_mb_size=cfg.train.eval_batch_size, device="cpu", evaluator=quiet_evaluator())
        strat = Replay(mem_size=200, **common) if item == "avalanche_replay" else Naive(**common)
        t0 = time.perf_counter()
        theirs = run_avalanche(strat, scenario)
        wall = time.perf_counter() - t0
        n_test = [len(e.test) for e in bench.experiences]
        mem = 200 * int(bench.experiences[0].train.x[0].numel()) if item == "avalanche_replay" else 0  # uint8-equivalent bytes
        out = {"wall_time_s": wall, "final_acc": M.final_acc(theirs["acc_matrix"], n_test), "forgetting": M.forgetting(theirs["acc_matrix"]),
               "memory_bytes": mem, "memory_note": "float32 tensors in Avalanche's buffer are 4x this" if mem else None}
    out["samples_per_s"] = n_train * 5 / out["wall_time_s"]
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def online_item(item: str) -> dict:
    from avalanche_side import FrozenExtractor, float_scenario
    from online_throughput import avalanche_online
    from cl.config import apply_overrides, load_yaml, parse_run_config
    from cl.engine.loop import prepare_inputs, run

    tmp = Path(tempfile.mkdtemp(prefix="bench-online-"))
    data = apply_overrides(load_yaml(ROOT / "experiments/fmnist/b4inc2.yaml"), [
        "benchmark.train_per_class=500", "benchmark.test_per_class=200", "benchmark.scenario=online", "benchmark.online.eval_every=1000000",
        "train.epochs=1", "train.checkpoint=false", "train.eval_future_tasks=false", "progress=false", f"out_dir={tmp}"])
    if item.startswith("online_ours"):
        name = "er" if item == "online_ours_er" else "generative_classifier"
        m = run(parse_run_config({**data, "strategy": {"name": name, "memory_size": 500, "replay_batch_size": 10, "lr": 0.05}}))
        assert m is not None
        samples = round(m["train_samples_per_s"] * m["train_time_s"])
        out = {"samples_per_s": m["train_samples_per_s"], "train_s": m["train_time_s"], "feature_extraction_s": m["feature_time_s"],
               "final_acc": m["final_acc"], "memory_bytes": m["memory_bytes"], "samples": samples}
    else:
        cfg = parse_run_config({**data, "strategy": {"name": "er"}})
        inputs = prepare_inputs(cfg, want_features=False)
        scenario = float_scenario(inputs.images, inputs.backbone.transform)
        args = argparse.Namespace(memory=500, lr=0.05)
        method = "replay" if item == "online_avalanche_replay" else "scr"
        out = avalanche_online(method, scenario, FrozenExtractor(inputs.backbone.model), inputs.backbone.feature_dim, inputs.bench.n_classes, args)
        out["memory_bytes"] = 500 * int(inputs.images.experiences[0].train.x[0].numel())
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def peft_item() -> dict:
    proc = subprocess.run([sys.executable, str(HERE / "peft_speed.py")], capture_output=True, text=True, check=True)
    text = proc.stdout
    return json.loads(text[: text.index("\n}\n") + 2])


def child(item: str) -> None:
    result = offline_item(item) if item in OFFLINE else online_item(item) if item in ONLINE else peft_item()
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print("RESULT " + json.dumps(result))


# ---- parent ------------------------------------------------------------------------------------


def measure(item: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", item], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["offline", "online", "peft"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    groups = {"offline": OFFLINE, "online": ONLINE, "peft": PEFT}
    items = groups[args.only] if args.only else OFFLINE + ONLINE + PEFT
    results = {}
    for item in items:
        print(f"measuring {item} ...", file=sys.stderr, flush=True)
        results[item] = measure(item)
    out = {"threads": torch.get_num_threads(), "results": results, "speedups": {}}
    r, s = results, out["speedups"]
    if "ours_er" in r and "avalanche_replay" in r and "error" not in r["avalanche_replay"]:
        for ours in ("ours_er", "ours_er_task_aware"):
            s[f"{ours}_vs_avalanche_replay"] = round(r["avalanche_replay"]["wall_time_s"] / r[ours]["wall_time_s"], 1)
        s["ours_simplecil_vs_avalanche_naive"] = round(r["avalanche_naive"]["wall_time_s"] / r["ours_simplecil"]["wall_time_s"], 1)
    if "online_ours_er" in r and "error" not in r.get("online_avalanche_replay", {"error": 1}):
        s["online_er_vs_avalanche_replay"] = round(r["online_ours_er"]["samples_per_s"] / r["online_avalanche_replay"]["samples_per_s"], 1)
        s["online_generative_vs_avalanche_scr"] = round(r["online_ours_generative"]["samples_per_s"] / r["online_avalanche_scr"]["samples_per_s"], 1)
    print(json.dumps(out, indent=2))
    print("\n| item | wall / train s | samples/s | final acc | memory bytes | peak RSS MB |\n|---|---:|---:|---:|---:|---:|", file=sys.stderr)
    for item, v in r.items():
        if item == "peft" or "error" in v:
            continue
        t = v.get("wall_time_s", v.get("train_s"))
        acc = v.get("final_acc")
        print(f"| {item} | {t:.1f} | {v['samples_per_s']:.0f} | {'–' if acc is None else f'{100 * acc:.1f}'} | {v.get('memory_bytes', 0):,} | {v['peak_rss_mb']:.0f} |", file=sys.stderr)
    if "peft" in r and "error" not in r["peft"]:
        print(f"| peft_speed (all methods) | | | | | {r['peft']['peak_rss_mb']:.0f} |", file=sys.stderr)
    print(f"\nspeed-ups: {json.dumps(s)}", file=sys.stderr)


if __name__ == "__main__":
    main()
