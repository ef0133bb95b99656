"""ToMe and ToCom on the PEFT suite's small ViT: speed and SimpleCIL accuracy vs the merging rate r.

1. The small ViT of ``experiments/peft/base_vit_fmnist.yaml`` (49 patch tokens + CLS, 4 blocks,
   pretrained by the framework on the base session, cached): images/s of an evaluation forward
   (batch 256, best of 3) with ToMe merging r tokens per block, and the final SimpleCIL accuracy of
   a full ``cl run`` with features of the training data at r = 0 and test features at r_t, without
   and with a ToCom compensator trained at r_s = 0 (self-distilled on the base session, cached);
   s is fixed at the training scale (0.1), not chosen on test data.
2. Speed only: a ViT-B/16-shaped random model at 224 px, r in {0, 8, 16} (a few batches, CPU).

    python experiments/bench/tocom.py [--rates 0 2 4 8 12] [--epochs 5] [--loss kl|mse] [--ppt] [--out DIR]

``--ppt`` adds PEFT-per-task (adapter) accuracy. Prints the command's numbers as Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cl.config import load_run_config  # noqa: E402
from cl.engine.loop import prepare_inputs, run  # noqa: E402
from cl.models.tome import TokenMerging, token_schedule  # noqa: E402
from cl.utils import torch_threads  # noqa: E402

CONFIG = ROOT / "experiments" / "peft" / "base_vit_fmnist.yaml"


def images_per_s(model: torch.nn.Module, x: torch.Tensor, repeats: int = 3) -> float:
    with torch.no_grad():
        model(x[:8])  # warm-up
        best = min(_timed(model, x) for _ in range(repeats))
    return len(x) / best


def _timed(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


def accuracy(out: Path, r: int, compensator: dict | None, strategy: dict, tag: str) -> float:
    tome = {"r_train": 0, "r_eval": r, "compensator": compensator}
    cfg = load_run_config(CONFIG, [f"out_dir={out}", f"experiment=tocom_bench/{tag}", f"run_name=r{r}", "progress=false",
                                   f"strategy={strategy}", f"backbone.tome={json.dumps(tome)}"])
    return run(cfg, resume=True)["final_acc"]  # a finished run of the same config is reused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=int, nargs="+", default=[0, 2, 4, 8, 12])
    parser.add_argument("--epochs", type=int, default=5, help="compensator self-distillation epochs")
    parser.add_argument("--loss", choices=["kl", "mse"], default="kl", help="compensator distillation loss")
    parser.add_argument("--speed-threads", type=int, default=1, help="torch threads while timing (1 is stable on a shared CPU)")
    parser.add_argument("--ppt", action="store_true", help="also PEFT-per-task (adapter) accuracy")
    parser.add_argument("--out", default=None, help="run directory root (default: a temporary directory)")
    args = parser.parse_args()
    r_max = max(args.rates)
    comp = {"r_max": max(r_max, 1), "dim": 2, "epochs": args.epochs, "loss": args.loss}
    out = Path(args.out or tempfile.mkdtemp(prefix="tocom_bench_"))

    cfg = load_run_config(CONFIG, [f"out_dir={out}", "progress=false", "strategy={name: simplecil}"])
    inputs = prepare_inputs(cfg, want_features=False)  # the suite's cached pretrained backbone
    model, bb = inputs.backbone.model, inputs.backbone
    test = torch.cat([e.test.x for e in inputs.images.experiences])[:256]
    x = bb.transform(test, torch.device("cpu"))
    n_tokens = model.patch_embed.num_patches + 1

    rows = []
    strategies = [("simplecil", "{name: simplecil}")] + ([("adapter", "{name: peft_per_task, peft: {name: adapter}}")] if args.ppt else [])
    for r in args.rates:
        with TokenMerging(model, r=r), torch_threads(args.speed_threads):
            speed = images_per_s(model, x)
        row = {"r": r, "tokens": token_schedule(n_tokens, len(model.blocks), r)[-1], "img_s": speed}
        for name, strategy in strategies:
            row[f"{name}_tome"] = accuracy(out, r, None, strategy, f"{name}_tome")
            row[f"{name}_tocom"] = accuracy(out, r, comp, strategy, f"{name}_tocom")
        rows.append(row)
        print(row, flush=True)

    print(f"\n## Small ViT ({n_tokens} tokens, {len(model.blocks)} blocks), split Fashion-MNIST B4 Inc2; features of training data at r=0, "
          f"test at r; ToCom r_max={comp['r_max']}, {args.epochs} epochs, loss {args.loss}, s=0.1\n")
    cols = [c for c in rows[0] if c not in ("r", "tokens", "img_s")]
    print(f"| r | tokens after last block | images/s (batch 256, {args.speed_threads} thread(s)) | " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for row in rows:
        print(f"| {row['r']} | {row['tokens']} | {row['img_s']:.0f} | " + " | ".join(f"{100 * row[c]:.2f}" for c in cols) + " |")

    torch.manual_seed(0)
    big = timm.create_model("vit_base_patch16_224", num_classes=0).eval()
    xb = torch.randn(8, 3, 224, 224)
    print(f"\n## ViT-B/16 shapes (random weights), 224 px, batch 8, CPU, {args.speed_threads} thread(s)\n")
    print("| r | tokens after last block | images/s |")
    print("|---|---|---|")
    for r in (0, 8, 16):
        with TokenMerging(big, r=r), torch_threads(args.speed_threads):
            speed = images_per_s(big, xb, repeats=2)
        print(f"| {r} | {token_schedule(197, 12, r)[-1]} | {speed:.1f} |", flush=True)


if __name__ == "__main__":
    main()
