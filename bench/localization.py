"""Localization throughput: maps/s over the threshold grid, vectorised vs a per-threshold loop, side by side.

Each map (7 x 7, like resnet at 224 px) is upsampled to 224 x 224, normalised, thresholded at every
point of the grid, and the largest 8-connected component's box is scored against a ground-truth box.
The vectorised path labels all thresholds of an image in one scipy call; the baseline loops over
thresholds and labels each mask on its own, as research code does.

    python bench/localization.py --maps 200
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage

from dml_ray.metrics.localization import LocalizationCounter, box_iou, score_maps, threshold_grid


def naive(maps: np.ndarray, gt: np.ndarray, thresholds: np.ndarray, size: int) -> np.ndarray:
    """Per image, per threshold: label the mask, keep the largest component, box it, IoU."""
    scores = score_maps(maps, size)
    correct = np.zeros((len(maps), len(thresholds)), dtype=bool)
    for n, score in enumerate(scores):
        for t, threshold in enumerate(thresholds):
            labels, count = ndimage.label(score >= threshold, structure=np.ones((3, 3)))
            if count == 0:
                continue
            sizes = np.bincount(labels.ravel())[1:]
            ys, xs = np.nonzero(labels == 1 + int(np.argmax(sizes)))
            box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)
            correct[n, t] = box_iou(box, gt[n]) >= 0.5
    return correct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=int, default=200)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--interval", type=float, default=0.01)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    maps = ndimage.gaussian_filter(rng.random((args.maps, 7, 7)), sigma=(0, 1, 1)).astype(np.float32)
    corner = rng.uniform(0, args.size / 2, (args.maps, 2))
    gt = np.concatenate([corner, corner + rng.uniform(args.size / 4, args.size / 2, (args.maps, 2))], axis=1)
    thresholds = threshold_grid(args.interval)

    start = time.perf_counter()
    reference = naive(maps, gt, thresholds, args.size)
    naive_s = time.perf_counter() - start
    timings = {}
    for mode in ("paper", "wsol"):
        counter = LocalizationCounter(thresholds, mode=mode, input_size=args.size)
        start = time.perf_counter()
        _, _, correct = counter.accumulate(maps, gt)
        timings[mode] = time.perf_counter() - start
        if mode == "paper":
            assert (correct == reference).all(), "vectorised and naive localization disagree"
    n = args.maps
    print(f"{n} maps 7x7 -> {args.size}x{args.size}, {len(thresholds)} thresholds, one core")
    print(f"naive per-threshold loop       : {n / naive_s:8.1f} maps/s")
    print(f"vectorised, paper mode         : {n / timings['paper']:8.1f} maps/s  (x{naive_s / timings['paper']:.1f})")
    print(f"vectorised, wsol mode (contours): {n / timings['wsol']:8.1f} maps/s")


if __name__ == "__main__":
    main()
