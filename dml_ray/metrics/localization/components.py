"""Paper mode (DESIGN.md, activation-decomposition-tip2021 Sec. VI-A): 8-connected components of
``map >= t`` and their tight boxes."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from dml_ray.metrics.localization.boxes import ComponentBoxes, ImageBoxes, _best_per_slice, _labelled_boxes, _ragged
from dml_ray.metrics.localization.grid import _check_thresholds
from dml_ray.metrics.localization.maps import _as_maps
from dml_ray.metrics.localization.modes import ArrayLike, Thresholds

# In-plane connectivity for a stack of T masks: nothing connects across the stack axis.
_EIGHT_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_EIGHT_IN_PLANE[1] = True


def _paper_image_boxes(score: np.ndarray, thresholds: np.ndarray) -> ImageBoxes:
    """One map [H, W] at every threshold, DESIGN.md protocol: mask = map >= t, 8-connected components.

    Returns the largest component's box per threshold [T, 4] (by pixel count, ties to the first in
    raster order; (0, 0, 0, 0) for an empty mask), every component's box [K, 4] and their threshold
    indices [K] (an empty mask contributes one (0, 0, 0, 0) row)."""
    masks = score[None] >= thresholds[:, None, None]
    labels, count = ndimage.label(masks, structure=_EIGHT_IN_PLANE)
    slice_of, boxes = _labelled_boxes(labels, count)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    chosen = _best_per_slice(slice_of, sizes, prefer_last=False, n_slices=thresholds.size)
    largest = np.zeros((thresholds.size, 4), dtype=np.int64)
    largest[chosen >= 0] = boxes[chosen[chosen >= 0]]
    empty = np.flatnonzero(chosen < 0)
    all_boxes = np.concatenate([boxes, np.zeros((empty.size, 4), dtype=np.int64)])
    all_slices = np.concatenate([slice_of, empty])
    return largest, all_boxes, all_slices


def largest_component_boxes(maps: ArrayLike, thresholds: Thresholds = None) -> np.ndarray:
    """Box of the largest 8-connected component of ``map >= t`` for every map and threshold
    (DESIGN.md localization; activation-decomposition-tip2021 Sec. VI-A: "the bounding box that
    covers the largest connected component in the mask").

    Each map's T masks are labelled in one ``scipy.ndimage.label`` call on the [T, H, W] stack with a
    structure that connects within a slice (3 x 3 ones) and never across it; sizes come from one
    bincount and boxes from one ``find_objects``.

    Args:
        maps: [N, H, W] maps in the input frame, thresholded as given (normalise first); float64
            stays float64, other types become float32.
        thresholds: [T]; default ``threshold_grid()``.

    Returns:
        [N, T, 4] int64 (x0, y0, x1, y1) pixel-edge boxes (x1 = max x + 1). Size ties go to the
        component met first in raster order; an empty mask gives (0, 0, 0, 0) (area 0, IoU 0).
    """
    arr = _as_maps(maps, None)
    grid = _check_thresholds(thresholds)
    return np.stack([_paper_image_boxes(m, grid)[0] for m in arr]).reshape(len(arr), grid.size, 4)


def all_component_boxes(maps: ArrayLike, thresholds: Thresholds = None) -> ComponentBoxes:
    """Every 8-connected component's tight box of ``map >= t``, for MaxBoxAccV2's multi-contour
    evaluation (Choe et al. CVPR 2020: a prediction is correct when ANY box reaches the IoU). Same
    conventions as ``largest_component_boxes``; an empty mask contributes one (0, 0, 0, 0) row."""
    arr = _as_maps(maps, None)
    grid = _check_thresholds(thresholds)
    return _ragged([_paper_image_boxes(m, grid) for m in arr])
