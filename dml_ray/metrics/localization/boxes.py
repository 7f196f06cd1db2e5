"""Box containers shared by both modes: per-threshold largest boxes and ragged all-region boxes."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

# Per map: largest box per threshold [T, 4], every box [K, 4], their threshold indices [K].
ImageBoxes = tuple[np.ndarray, np.ndarray, np.ndarray]


class ComponentBoxes(NamedTuple):
    """Ragged boxes in coordinate form: box k belongs to image ``image_index[k]`` at threshold
    ``threshold_index[k]``. Every (image, threshold) pair owns at least one row."""

    boxes: np.ndarray  # [K, 4] int64 (x0, y0, x1, y1)
    image_index: np.ndarray  # [K] int64
    threshold_index: np.ndarray  # [K] int64


def _ragged(per_image: list[ImageBoxes]) -> ComponentBoxes:
    boxes = np.concatenate([b for _, b, _ in per_image]) if per_image else np.zeros((0, 4), np.int64)
    slices = np.concatenate([s for _, _, s in per_image]) if per_image else np.zeros(0, np.int64)
    images = np.repeat(np.arange(len(per_image)), [len(s) for _, _, s in per_image])
    return ComponentBoxes(boxes.astype(np.int64), images.astype(np.int64), slices.astype(np.int64))
