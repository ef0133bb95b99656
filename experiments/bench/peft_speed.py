"""PEFT methods: parameter counts on ViT-B/16 against the papers, and speed on a ViT.

1. Trainable parameters of every method on ``vit_base_patch16_224`` (random init) next to the
   number the papers report (the spec's table), with the relative difference.
2. On a ViT (default the PEFT suite's small one; ``--vit base`` for ViT-B/16 at 224), per method:
   training samples/s (forward + backward + AdamW step, backbone frozen), inference latency per
   batch with the module attached by hooks, merged into the weights (mergeable methods), and the
   plain backbone.

    python experiments/bench/peft_speed.py [--vit small|base] [--batch 64] [--repeats 20]

Prints one JSON object and two Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import timm
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cl.peft import build_peft  # noqa: E402
from cl.registry import PEFT  # noqa: E402

PAPERS = [  # (label, method, options, the papers' count)
    ("Adapter (m=8)", "adapter", {"bottleneck": 8}, 0.16e6),
    ("LoRA (r=8, qkv)", "lora", {"rank": 8}, 0.29e6),
    ("LoRA (r=8, q and v)", "lora", {"rank": 8, "targets": "qv"}, 0.29e6),
    ("VPT-deep (p=50)", "vpt", {"tokens": 50}, 0.46e6),
    ("SSF", "ssf", {}, 0.21e6),
    ("BitFit", "bitfit", {}, 0.10e6),
    ("Convpass (m=8)", "convpass", {"dim": 8}, 0.33e6),
    ("FacT-TT (r=12)", "fact", {}, 0.04e6),
    ("Consolidator (g=384)", "consolidator", {}, 0.30e6),
    ("KAdaptation", "kadaptation", {}, 0.05e6),
]

SPEED = [  # (label, method, options) on the speed model
    ("adapter", "adapter", {}), ("adapter_1bit", "adapter", {"bits": 1}), ("lora", "lora", {}), ("vpt_deep", "vpt", {"tokens": 5}),
    ("ssf", "ssf", {}), ("bitfit", "bitfit", {}), ("convpass", "convpass", {}), ("fact_tt", "fact", {}),
    ("consolidator", "consolidator", {}), ("kadaptation", "kadaptation", {"n": 8}),
]


def make(name: str, options: dict, model):
    return build_peft(PEFT.entry(name).config.model_validate({"name": name, **options}), model)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vit", choices=["small", "base"], default="small")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    torch.manual_seed(0)
    base = timm.create_model("vit_base_patch16_224", num_classes=0)
    counts = []
    for label, name, options, paper in PAPERS:
        n = make(name, options, base).num_parameters()
        counts.append({"method": label, "ours": n, "paper": paper, "diff_pct": round(100 * (n - paper) / paper, 1)})
    del base

    if args.vit == "base":
        model, shape = timm.create_model("vit_base_patch16_224", num_classes=0), (3, 224, 224)
    else:
        model = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, embed_dim=64, depth=4, num_heads=4, in_chans=1, num_classes=0)
        shape = (1, 28, 28)
    model.eval().requires_grad_(False)
    x = torch.randn(args.batch, *shape)
    with torch.no_grad():
        plain = timed(lambda: model(x), args.repeats)
    speed = []
    for label, name, options in SPEED:
        method = make(name, options, model)
        method.attach(model)
        head = torch.nn.Linear(model.num_features, 10)
        opt = torch.optim.AdamW(list(method.parameters()) + list(head.parameters()), lr=1e-3)
        y = torch.randint(0, 10, (args.batch,))

        def step() -> None:
            method.train()
            loss = torch.nn.functional.cross_entropy(head(model(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        train_s = timed(step, args.repeats)
        method.eval()
        with torch.no_grad():
            hooked = timed(lambda: model(x), args.repeats)
            row = {"method": label, "params": method.num_parameters(), "train_samples_per_s": round(args.batch / train_s, 1),
                   "infer_ms_hooked": round(1000 * hooked, 2), "infer_ms_plain": round(1000 * plain, 2), "infer_ms_merged": None}
            if method.mergeable:
                method.merge(model)
                row["infer_ms_merged"] = round(1000 * timed(lambda: model(x), args.repeats), 2)
                method.unmerge(model)
        method.detach()
        speed.append(row)

    out = {"vit": args.vit, "batch": args.batch, "threads": torch.get_num_threads(), "counts_vit_b16": counts, "speed": speed}
    print(json.dumps(out, indent=2))
    print("\n| method | ours (ViT-B/16) | papers | diff |\n|---|---:|---:|---:|")
    for c in counts:
        print(f"| {c['method']} | {c['ours']:,} | {c['paper'] / 1e6:.2f}M | {c['diff_pct']:+.1f}% |")
    print("\n| method | params | train samples/s | infer ms hooked | merged | plain backbone |\n|---|---:|---:|---:|---:|---:|")
    for r in speed:
        merged = "–" if r["infer_ms_merged"] is None else f"{r['infer_ms_merged']:.2f}"
        print(f"| {r['method']} | {r['params']:,} | {r['train_samples_per_s']:.0f} | {r['infer_ms_hooked']:.2f} | {merged} | {r['infer_ms_plain']:.2f} |")


if __name__ == "__main__":
    main()
