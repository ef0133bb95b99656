"""Peak memory of a run over a 50,000-image folder: streamed from disk vs decoded into memory.

Generates ``root/{train,test}/<class>/<n>.jpg`` (100 classes, 450 train + 50 test images each,
``--source-size`` px JPEGs of smooth random colour fields), then runs ``cl run`` in a child process
per setting - SimpleCIL on a small ResNet (random weights: memory does not depend on them), features
of all 50,000 images extracted once into the chunked cache - and reports the child's peak RSS
(``ru_maxrss``), wall time, and the decoded size the pool would take in memory.

    python experiments/bench/stream_rss.py [--work DIR] [--sizes 224] [--eager-sizes 112] [--workers 2]
    python experiments/bench/stream_rss.py --work DIR2 --classes 10 --eager-sizes   # 5,000 images: is it bounded?

A streamed run's peak is set by the batch (activations at the decoded size) and by what grows with
the number of images (labels, file paths and digests, the cached features), never by the decoded
pool: compare the 50,000- and 5,000-image peaks.

Prints one JSON object and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
TRAIN, TEST = 450, 50  # per class


def make_folder(root: Path, size: int, classes: int) -> int:
    """The 50k-image tree (kept if it is already there); returns its size in bytes."""
    from PIL import Image

    done = root / ".complete"
    if not done.is_file():
        rng = np.random.default_rng(0)
        for c in range(classes):
            for split, n in (("train", TRAIN), ("test", TEST)):
                folder = root / split / f"class{c:03d}"
                folder.mkdir(parents=True, exist_ok=True)
                for k in range(n):
                    small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)  # upsampled: smooth, JPEG-friendly
                    Image.fromarray(small).resize((size, size), Image.BILINEAR).save(folder / f"{k}.jpg", quality=85)
        done.write_text("ok")
    return sum(p.stat().st_size for p in root.rglob("*.jpg"))


# A fresh parent per run reports the peak RSS of its one run (ru_maxrss of children is a maximum over
# all of a process's waited-for descendants, and would mix the settings): the largest single process
# of the run, its main process or one of its DataLoader workers (each holds its own copy of torch).
MEASURE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
           "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)")


def run_child(config: Path) -> tuple[float, float, str]:
    """(peak RSS of the run's largest process in GB, wall seconds, last output line) of ``cl run config``."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "cl", "run", str(config), "--overwrite"],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr.strip().splitlines()[-2:])
    peak_kb = int(next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("PEAK_KB")))
    return peak_kb / 2**20, wall, proc.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="working directory (the image tree is kept there between runs)")
    parser.add_argument("--source-size", type=int, default=96, help="side of the generated JPEGs")
    parser.add_argument("--sizes", type=int, nargs="*", default=[224], help="decoded sizes to run streamed")
    parser.add_argument("--eager-sizes", type=int, nargs="*", default=[112], help="decoded sizes to run in memory too")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--classes", type=int, default=100, help="classes of 500 images (100: 50,000 images)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="stream-rss-"))
    t0 = time.perf_counter()
    tree_bytes = make_folder(work / "images", args.source_size, args.classes)
    gen_s = time.perf_counter() - t0
    settings = [("always", s) for s in args.sizes] + [("never", s) for s in args.eager_sizes]
    rows = []
    for stream, size in settings:
        config = {
            "experiment": f"stream_rss_{stream}_{size}", "out_dir": str(work / "runs"), "cache_dir": str(work / "cache"),
            "progress": False, "seed": 0,
            "benchmark": {"dataset": {"name": "image_folder", "root": str(work / "images"), "image_size": size}, "n_experiences": min(10, args.classes)},
            "backbone": {"name": "resnet10t", "weights": {"source": "none"}, "trainable": "none", "cache_features": True},
            "strategy": {"name": "simplecil"},
            "train": {"eval_batch_size": 256, "checkpoint": False},
            "loader": {"stream": stream, "num_workers": args.workers if stream == "always" else 0},
        }
        path = work / f"{stream}_{size}.yaml"
        path.write_text(yaml.safe_dump(config))
        peak_gb, wall, line = run_child(path)
        decoded_gb = (TRAIN + TEST) * args.classes * 3 * size * size / 2**30
        rows.append({"stream": stream, "size": size, "peak_rss_gb": peak_gb, "wall_s": wall, "decoded_pool_gb": decoded_gb, "result": line})
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(json.dumps({"images": (TRAIN + TEST) * args.classes, "tree_mb": tree_bytes / 2**20, "generate_s": gen_s, "workers": args.workers,
                      "rows": rows}, indent=1))
    print()
    print("| decoded size | streamed | peak RSS GB | wall s | decoded pool would be GB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} px | {'yes' if r['stream'] == 'always' else 'no (in memory)'} | {r['peak_rss_gb']:.2f} | {r['wall_s']:.0f} | {r['decoded_pool_gb']:.2f} |")


if __name__ == "__main__":
    main()
