"""Box containers shared by both modes: per-threshold largest boxes and ragged all-region boxes."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage

# Per map: largest box per threshold [T, 4], every box [K, 4], their threshold indices [K].
ImageBoxes = tuple[np.ndarray, np.ndarray, np.ndarray]


class ComponentBoxes(NamedTuple):
    """Ragged boxes in coordinate form: box k belongs to image ``image_index[k]`` at threshold
    ``threshold_index[k]``. Every (image, threshold) pair owns at least one row."""

    boxes: np.ndarray  # [K, 4] int64 (x0, y0, x1, y1)
    image_index: np.ndarray  # [K] int64
    threshold_index: np.ndarray  # [K] int64


def _labelled_boxes(labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """For labels 1..count of a [T, H, W] stack: the slice index of each label and its tight box
    (x0, y0, x1 = max x + 1, y1 = max y + 1) from ``ndimage.find_objects``."""
    if count == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 4), dtype=np.int64)
    table = np.array([[s[0].start, s[2].start, s[1].start, s[2].stop, s[1].stop]
                      for s in ndimage.find_objects(labels, count)], dtype=np.int64)
    return table[:, 0], table[:, 1:]


def _best_per_slice(slice_of: np.ndarray, score: np.ndarray, prefer_last: bool, n_slices: int) -> np.ndarray:
    """Index (into the label arrays) of the highest score in every slice, -1 for an empty slice.
    Ties go to the first label in raster order, or the last with ``prefer_last``."""
    chosen = np.full(n_slices, -1, dtype=np.int64)
    if slice_of.size == 0:
        return chosen
    rank = np.arange(slice_of.size)
    order = np.lexsort((-rank if prefer_last else rank, -score, slice_of))
    slices, first = np.unique(slice_of[order], return_index=True)
    chosen[slices] = order[first]
    return chosen


def _ragged(per_image: list[ImageBoxes]) -> ComponentBoxes:
    boxes = np.concatenate([b for _, b, _ in per_image]) if per_image else np.zeros((0, 4), np.int64)
    slices = np.concatenate([s for _, _, s in per_image]) if per_image else np.zeros(0, np.int64)
    images = np.repeat(np.arange(len(per_image)), [len(s) for _, _, s in per_image])
    return ComponentBoxes(boxes.astype(np.int64), images.astype(np.int64), slices.astype(np.int64))
