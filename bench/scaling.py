"""The demo config at several multiples of its images: seconds per image per stage and peak memory.

Each scale is one ``run_pipeline`` of jobs/configs/demo.yaml with ``data.synthetic.images_per_class`` times
the scale (24 classes; 16 images each at 1x), in its own process, Ray started inside it as a user's run
starts it. Peak memory is the largest resident memory of that process and every process it started (Ray's
workers and object store included; shared pages are counted once per process, so it is an upper bound),
sampled every 0.5 s. The last lines extrapolate to CUB-200-2011 (11,788 images at 224 px) and Stanford
Online Products (120,053 images) from the largest scale (see BENCHMARKS.md for the model).

    python bench/scaling.py --scales 1,4,16
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

STAGES = ["data", "train", "embed", "evaluate", "knn", "explain", "localize"]


def one_scale(scale: int, stages: list[str], out: str) -> dict:
    """Run the demo at ``scale`` in this process; returns images, per-stage seconds and peak memory."""
    from bench.evaluate import PeakMemory
    from pipelines.run import run_pipeline
    from tests.conftest import demo_like_config

    cfg = demo_like_config(out, **{"run_id": f"x{scale}", "stages": stages,
                                   "data.synthetic.images_per_class": 16 * scale})
    with PeakMemory() as memory:
        start = time.perf_counter()
        summary = run_pipeline(cfg)
        wall = time.perf_counter() - start
    n = cfg.data.synthetic.n_classes * cfg.data.synthetic.images_per_class
    return {"scale": scale, "images": n, "wall": wall, "peak_gib": memory.peak / 2**30,
            "stages": {name: info["seconds"] for name, info in summary.stages.items()},
            "load": os.getloadavg()[0]}


def extrapolate(row: dict) -> list[str]:
    """Seconds for CUB and SOP from the largest scale: per-image stages linear in images and in pixels
    (64 -> 224 px: x12.25; explain and localize work on the feature-map grid and the 224 px frame alike),
    the searches (evaluate, knn) quadratic in images."""
    lines = []
    n = row["images"]
    pixels = (224 / 64) ** 2
    for name, images, size_factor in (("CUB-200-2011", 11_788, pixels), ("SOP", 120_053, pixels)):
        total, parts = 0.0, []
        for stage, seconds in row["stages"].items():
            factor = (images / n) ** 2 if stage in ("evaluate", "knn") else images / n * (
                size_factor if stage in ("train", "embed", "explain", "localize") else 1.0)
            total += seconds * factor
            parts.append(f"{stage} {seconds * factor / 60:.0f} min")
        lines.append(f"{name}: {images:,} images ~ {total / 3600:.1f} h on this machine ({', '.join(parts)})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="1,4,16")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process: run one scale
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    stages = args.stages.split(",")
    if args.one is not None:
        logging.basicConfig(level=logging.WARNING)
        print("RESULT " + json.dumps(one_scale(args.one, stages, args.out)), flush=True)
        return
    rows = []
    for scale in (int(s) for s in args.scales.split(",")):
        out = tempfile.mkdtemp(prefix=f"bench-scaling-x{scale}-")
        proc = subprocess.run([sys.executable, __file__, "--one", str(scale), "--stages", args.stages, "--out", out],
                              capture_output=True, text=True, env=os.environ)
        result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not result:
            raise SystemExit(f"scale {scale} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(result[0][len("RESULT "):]))
        row = rows[-1]
        print(f"{scale:>3}x {row['images']:>6} images: wall {row['wall']:7.1f} s, peak {row['peak_gib']:.2f} GiB, "
              f"load {row['load']:.1f}; s/image: "
              + ", ".join(f"{s} {v / row['images']:.4f}" for s, v in row["stages"].items()), flush=True)
    for line in extrapolate(rows[-1]):
        print(line)


if __name__ == "__main__":
    main()
