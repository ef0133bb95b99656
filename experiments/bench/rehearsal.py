"""Rehearsal at real shapes: ViT-B/16 at 224 px on CPU, and what the full GPU suite should cost.

On a CIFAR-format subset (synthetic pixels in CIFAR-100's official python layout: 4 train and 4 test
images per class), for PEFT-per-task (adapter, LoRA), SimpleCIL and RanPAC with the config of
``experiments/peft/cifar100_b0inc10.yaml`` (ViT-B/16, 224 px, batch 48, 10 experiences) and random
weights (the cost does not depend on them), at fp32 and bf16:

* seconds per training step at the config's batch size, feature-extraction images/s, evaluation
  images/s - timed by :mod:`cl.engine.estimate` (the strategy's own ``observe``/``predict``, the
  real input pipeline), each configuration in its own process;
* peak RSS of that process, and the disk the full run would use (float32 feature cache, checkpoints);
* the number of backbone sample-passes of the full CIFAR-100 B0 Inc10 run (50,000 train and 10,000
  test images), which gives its CPU cost from the timings, and its GPU cost from a stated GPU
  throughput (``--gpu-fwd``/``--gpu-train`` images/s; not measured here: there is no GPU).

    python experiments/bench/rehearsal.py [--precisions fp32 bf16] [--only adapter lora simplecil ranpac]

Prints one JSON object and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "experiments" / "peft" / "cifar100_b0inc10.yaml"
STRATEGIES = {
    "adapter": ["strategy.name=peft_per_task", "strategy.peft={name: adapter, bottleneck: 8}"],
    "lora": ["strategy.name=peft_per_task", "strategy.peft={name: lora}"],
    "simplecil": ["strategy={name: simplecil}", "backbone.cache_features=true"],
    "ranpac": ["strategy={name: ranpac}"],
}
FULL = {"train": 50_000, "test": 10_000, "experiences": 10}


def child(args: argparse.Namespace) -> None:
    from cl.cli import load_cli_config
    from cl.engine.estimate import estimate_run

    overrides = json.loads(args.child)
    cfg = load_cli_config(str(CONFIG), overrides, str(Path(args.work) / "runs"))
    print(json.dumps(estimate_run(cfg).to_dict()))


def passes(name: str, epochs: int) -> dict[str, int]:
    """Samples of the full run through each timed step: plain backbone forward passes, ``predict``
    calls (test images, each task's test set after its own and every later task), training steps,
    and backbone passes per ``predict`` (for the GPU figure)."""
    n, k, test = FULL["train"], FULL["experiences"], FULL["test"]
    evaluated = sum(test // k * (k - j) for j in range(k))
    if name == "simplecil":  # features of every image once; predictions on cached features
        return {"forward": n + test, "predict": 0, "train": 0, "passes_per_predict": 0}
    if name == "ranpac":  # first session adapted for its epochs, then every training image once
        return {"forward": n, "predict": evaluated, "train": n // k * epochs, "passes_per_predict": 1}
    # PEFT-per-task: its epochs on every image, prototypes from each task's images once, and per test
    # image one plain pass (task inference) and one with the inferred task's module
    return {"forward": n, "predict": evaluated, "train": n * epochs, "passes_per_predict": 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--only", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--gpu-fwd", type=float, default=2000.0, help="assumed GPU inference images/s (ViT-B/16, 224 px, bf16)")
    parser.add_argument("--gpu-train", type=float, default=600.0, help="assumed GPU training images/s (frozen ViT-B/16 + PEFT, bf16)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the suite (experiments/peft_cifar100.yaml: 3)")
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args)
        return
    from cl.data.fakes import write_cifar
    from cl.config import load_yaml

    work = Path(args.work or tempfile.mkdtemp(prefix="rehearsal-"))
    data = work / "data"
    if not (data / "cifar-100-python").is_dir():
        write_cifar(data, 100, per_file=400)
    epochs = load_yaml(CONFIG)["train"]["epochs"]
    batch = load_yaml(CONFIG)["train"]["batch_size"]
    results = []
    for name in args.only:
        for precision in args.precisions:
            overrides = [f"data_root={data}", f"cache_dir={work / 'cache'}", "backbone.weights.source=none", "device=cpu",
                         f"precision={precision}", "progress=false", *STRATEGIES[name]]
            proc = subprocess.run([sys.executable, __file__, "--work", str(work), "--child", json.dumps(overrides)],
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"{name} {precision}: {proc.stderr.strip().splitlines()[-1]}")
            est = json.loads(proc.stdout.strip().splitlines()[-1])
            per = est["per_sample_s"]
            fwd = per.get("feature extraction")
            row = {
                "strategy": name, "precision": precision,
                "s_per_step": per["training"] * batch if "training" in per else None,
                "extract_img_per_s": 1 / fwd if fwd else None,
                "eval_img_per_s": 1 / per["evaluation"],
                "peak_rss_gb": est["peak_rss_gb"],
                "disk_gb": est["disk_gb"],
            }
            # the full run's disk: the feature cache grows with the images, checkpoints do not
            full_disk = dict(est["disk_gb"])
            if "feature cache" in full_disk:
                full_disk["feature cache"] *= (FULL["train"] + FULL["test"]) / est["samples"]["feature extraction"]
            row["full_run_disk_gb"] = sum(full_disk.values())
            p = passes(name, epochs)
            cpu = p["forward"] * per["backbone forward"] + p["predict"] * per["evaluation"] + p["train"] * per.get("training", 0.0)
            gpu = (p["forward"] + p["predict"] * p["passes_per_predict"]) / args.gpu_fwd + p["train"] / args.gpu_train
            row["full_run_cpu_h"], row["full_run_gpu_h"] = cpu / 3600, gpu / 3600
            row["passes"] = p
            results.append(row)
            print(json.dumps(row), file=sys.stderr)
    import torch

    print(json.dumps({"config": str(CONFIG.relative_to(ROOT)), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "batch": batch, "epochs": epochs, "gpu_assumed_img_per_s":
                      {"forward": args.gpu_fwd, "train": args.gpu_train}, "results": results}, indent=1))
    print()
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()} kernels (bf16 runs natively only with AVX512-BF16 or AMX)")
    print("| strategy | precision | s/step (batch %d) | extraction img/s | eval img/s | peak RSS GB | full run disk GB | full run CPU h | full run GPU h (assumed) |" % batch)
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        step = "-" if r["s_per_step"] is None or r["strategy"] == "simplecil" else f"{r['s_per_step']:.1f}"
        ext = "-" if r["extract_img_per_s"] is None else f"{r['extract_img_per_s']:.1f}"
        ev = "-" if r["strategy"] == "simplecil" else f"{r['eval_img_per_s']:.1f}"  # on cached features: no backbone
        print(f"| {r['strategy']} | {r['precision']} | {step} | {ext} | {ev} | {r['peak_rss_gb']:.2f} | {r['full_run_disk_gb']:.2f} | "
              f"{r['full_run_cpu_h']:.1f} | {r['full_run_gpu_h']:.2f} |")
    for precision in args.precisions:
        rows = [r for r in results if r["precision"] == precision]
        print(f"\nsuite experiments/peft_cifar100.yaml at {precision} ({', '.join(r['strategy'] for r in rows)} x {args.seeds} seeds): "
              f"{args.seeds * sum(r['full_run_cpu_h'] for r in rows):.0f} CPU h here, "
              f"{args.seeds * sum(r['full_run_gpu_h'] for r in rows):.1f} GPU h at the assumed throughput")


if __name__ == "__main__":
    main()
