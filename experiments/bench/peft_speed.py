"""PEFT methods: parameter counts on ViT-B/16 against the papers, and speed on a ViT.

1. Trainable parameters on ``vit_base_patch16_224`` (random init) of the configuration that
   reproduces each figure the papers print (:mod:`cl.peft.reported`: source, what else the paper
   counted, the gap and why), and the stored bytes of the 1-bit adapter at the paper's d=32.
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

from cl.peft import bank, build_peft  # noqa: E402
from cl.peft.reported import BI_ADAPTFORMER_BYTES, REPORTED  # noqa: E402
from cl.registry import PEFT  # noqa: E402

SPEED = [  # (label, method, options) on the speed model
    ("adapter", "adapter", {}), ("adapter_1bit", "adapter", {"bits": 1}), ("lora", "lora", {}), ("vpt_deep", "vpt", {"tokens": 5}),
    ("ssf", "ssf", {}), ("bitfit", "bitfit", {}), ("convpass", "convpass", {}), ("fact_tt", "fact", {}),
    ("consolidator", "consolidator", {}), ("kadaptation", "kadaptation", {"n": 8}), ("krona", "krona", {}), ("memvp", "memvp", {}),
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
    for row in REPORTED:
        n = make(row.method, row.options, base).num_parameters()
        counts.append({"method": row.label, "ours": n, "counted_as_paper": round(n + row.extra), "paper": row.reported, "source": row.source,
                       "diff_pct": round(100 * (n + row.extra - row.reported) / row.reported, 1), "reproduces": row.reproduces, "note": row.note})
    one_bit = {bias: bank.packed_nbytes(bank.pack(make("adapter", {"bits": 1, "bottleneck": 32, "bias": bias}, base))) for bias in (False, True)}
    storage = {"bi_adaptformer_d32_bytes": one_bit[False], "with_float_biases_bytes": one_bit[True],
               "paper_weight_bytes": BI_ADAPTFORMER_BYTES, "bias_overhead_pct": round(100 * (one_bit[True] / one_bit[False] - 1), 1)}
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

    out = {"vit": args.vit, "batch": args.batch, "threads": torch.get_num_threads(), "counts_vit_b16": counts, "one_bit_storage_vit_b16": storage, "speed": speed}
    print(json.dumps(out, indent=2))
    print("\n| configuration | ours (ViT-B/16) | as the paper counts | printed | source | diff | note |\n|---|---:|---:|---:|---|---:|---|")
    for c in counts:
        print(f"| {c['method']} | {c['ours']:,} | {c['counted_as_paper']:,} | {c['paper'] / 1e6:.2f}M | {c['source']} | {c['diff_pct']:+.1f}% | {c['note']} |")
    print(f"\n1-bit adapter, d=32, ViT-B/16: {storage['bi_adaptformer_d32_bytes']:,} B stored ({storage['paper_weight_bytes']:,} B of bits + μ, σ); "
          f"with float biases {storage['with_float_biases_bytes']:,} B (+{storage['bias_overhead_pct']}%)")
    print("\n| method | params | train samples/s | infer ms hooked | merged | plain backbone |\n|---|---:|---:|---:|---:|---:|")
    for r in speed:
        merged = "–" if r["infer_ms_merged"] is None else f"{r['infer_ms_merged']:.2f}"
        print(f"| {r['method']} | {r['params']:,} | {r['train_samples_per_s']:.0f} | {r['infer_ms_hooked']:.2f} | {merged} | {r['infer_ms_plain']:.2f} |")


if __name__ == "__main__":
    main()
