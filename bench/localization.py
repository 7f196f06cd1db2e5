"""Localization throughput over the threshold grid: the naive per-threshold loop vs both modes, side by side.

Each map (7 x 7, like a ResNet at 224 px) is upsampled to 224 x 224, normalised, cut at every threshold of
the grid, boxed and scored against a ground-truth box. The naive loop labels each threshold's mask on its
own (scipy.ndimage.label), as research code does. Paper mode sweeps every threshold in one union-find pass
(dml_ray.metrics.localization.components); wsol mode runs OpenCV's threshold + findContours once per
distinct 8-bit cut. Work is timed in interleaved chunks of maps (naive, paper, wsol, emulation, naive, ...)
so that load from other processes falls on every contender alike; the emulation runs on the first
``--emulation-maps`` maps only (it is the slowest).

The bench exits non-zero unless paper mode's boxes and verdicts equal the naive loop's and wsol mode's
OpenCV boxes equal the hand-written contour emulation's (the fallback without OpenCV).

    python bench/localization.py --maps 100
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from scipy import ndimage

from dml_ray.metrics.localization import LocalizationCounter, box_iou, mode_threshold_grid, score_maps, threshold_grid
from dml_ray.metrics.localization.wsol import _wsol_image_boxes, cv2


def naive(maps: np.ndarray, gt: np.ndarray, thresholds: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image, per threshold: label the mask, keep the largest component, box it, IoU > 0.5 (TIP Sec. VI-A)."""
    scores = score_maps(maps, size)
    boxes = np.zeros((len(maps), len(thresholds), 4), dtype=np.int64)
    for n, score in enumerate(scores):
        for t, threshold in enumerate(thresholds):
            labels, count = ndimage.label(score >= threshold, structure=np.ones((3, 3)))
            if count == 0:
                continue
            sizes = np.bincount(labels.ravel())[1:]
            ys, xs = np.nonzero(labels == 1 + int(np.argmax(sizes)))
            boxes[n, t] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    return boxes, box_iou(boxes, gt[:, None]) > 0.5


def emulated_wsol(maps: np.ndarray, thresholds: np.ndarray, size: int) -> np.ndarray:
    """wsol mode's largest-contour boxes from the hand-written emulation of cv2.findContours."""
    scores = score_maps(maps, size, "wsol")
    return np.stack([_wsol_image_boxes(s, thresholds, use_opencv=False)[0] for s in scores])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=int, default=100)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--interval", type=float, default=0.01, help="grid step of all three (wsol's own default "
                                                                      "is 0.001, see --wsol-default-grid)")
    parser.add_argument("--chunk", type=int, default=5, help="maps per interleaved timing chunk")
    parser.add_argument("--emulation-maps", type=int, default=20,
                        help="maps checked (and timed) with the slow contour emulation: the first ones")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: time.perf_counter; cpu: this process's CPU time (time.process_time), steadier "
                             "on a machine shared with other work (every contender runs on one thread)")
    parser.add_argument("--wsol-default-grid", action="store_true",
                        help="also time wsol mode on wsolevaluation's default 0.001 grid (1,000 thresholds)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if cv2 is not None:
        cv2.setNumThreads(1)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if cv2 is None:
        print("opencv-python-headless is not installed: wsol mode would time the emulation", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    maps = ndimage.gaussian_filter(rng.random((args.maps, 7, 7)), sigma=(0, 1, 1)).astype(np.float32)
    corner = rng.uniform(0, args.size / 2, (args.maps, 2))
    gt = np.concatenate([corner, corner + rng.uniform(args.size / 4, args.size / 2, (args.maps, 2))], axis=1)
    thresholds = threshold_grid(args.interval)

    def paper(part: slice) -> tuple[np.ndarray, np.ndarray]:
        counter = LocalizationCounter(thresholds, mode="paper", input_size=args.size)
        boxes, _, correct = counter.accumulate(maps[part], gt[part])
        return boxes, correct

    def wsol(part: slice, grid: np.ndarray = thresholds) -> np.ndarray:
        return LocalizationCounter(grid, mode="wsol", input_size=args.size).accumulate(maps[part], gt[part])[0]

    start = time.perf_counter()
    paper(slice(0, 1)), wsol(slice(0, 1))  # load the compiled union-find kernel (numba cache) once
    warmup = time.perf_counter() - start

    contenders = {"naive": lambda p: naive(maps[p], gt[p], thresholds, args.size), "paper": paper, "wsol": wsol,
                  "emulation": lambda p: emulated_wsol(maps[p], thresholds, args.size)}
    n_emulated = min(args.emulation_maps, args.maps)
    if args.wsol_default_grid:
        contenders["wsol_0.001"] = lambda p: wsol(p, mode_threshold_grid("wsol"))
    seconds = dict.fromkeys(contenders, 0.0)
    outputs: dict[str, list] = {name: [] for name in contenders}
    for first in range(0, args.maps, args.chunk):
        part = slice(first, min(first + args.chunk, args.maps))
        for name, run in contenders.items():
            if name == "emulation" and part.start >= n_emulated:
                continue
            start = clock()
            outputs[name].append(run(part))
            seconds[name] += clock() - start

    naive_boxes = np.concatenate([b for b, _ in outputs["naive"]])
    naive_correct = np.concatenate([c for _, c in outputs["naive"]])
    paper_boxes = np.concatenate([b for b, _ in outputs["paper"]])
    paper_correct = np.concatenate([c for _, c in outputs["paper"]])
    wsol_boxes, emulated = np.concatenate(outputs["wsol"]), np.concatenate(outputs["emulation"])
    n_emulated = len(emulated)
    checks = {"paper boxes == naive boxes": np.array_equal(paper_boxes, naive_boxes),
              "paper verdicts == naive verdicts": np.array_equal(paper_correct, naive_correct),
              f"wsol OpenCV boxes == emulated boxes (first {n_emulated} maps)":
                  np.array_equal(wsol_boxes[:n_emulated], emulated)}

    n = args.maps
    rate = {name: (n_emulated if name == "emulation" else n) / s for name, s in seconds.items()}
    print(f"{n} maps 7x7 -> {args.size}x{args.size}, {thresholds.size} thresholds, one thread, {args.clock} clock, "
          f"interleaved chunks of {args.chunk} (kernel load {warmup:.2f} s, excluded)")
    print(f"naive per-threshold loop       : {rate['naive']:8.1f} maps/s")
    print(f"vectorised, paper mode         : {rate['paper']:8.1f} maps/s  (x{rate['paper'] / rate['naive']:.1f})")
    print(f"vectorised, wsol mode          : {rate['wsol']:8.1f} maps/s  (x{rate['wsol'] / rate['naive']:.1f})")
    print(f"wsol mode, contour emulation   : {rate['emulation']:8.1f} maps/s  "
          f"(x{rate['emulation'] / rate['naive']:.1f}; OpenCV is x{rate['wsol'] / rate['emulation']:.1f} of it)")
    if args.wsol_default_grid:
        print(f"vectorised, wsol mode, 0.001   : {rate['wsol_0.001']:8.1f} maps/s  "
              f"(x{rate['wsol_0.001'] / rate['naive']:.1f}; 1,000 thresholds, wsolevaluation's default grid)")
    for name, ok in checks.items():
        print(f"{name}: {'yes' if ok else 'NO'}")
    if not all(checks.values()):
        print("FAILED: the boxes differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
