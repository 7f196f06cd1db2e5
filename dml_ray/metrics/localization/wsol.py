"""wsolevaluation-exact mode: uint8 quantisation, strict threshold and cv2.findContours(RETR_TREE)
boxes (compute_bboxes_from_scoremaps of clovaai/wsolevaluation).

OpenCV (``opencv-python-headless``, the library wsolevaluation itself calls) does the thresholding and the
contours. Only the distinct integer cuts ``int(t * max(u8))`` are computed (at most 256 of them, however
fine the grid: wsolevaluation's default 0.001 grid has 1,000 thresholds), and of those only the ones that
give different masks, then spread over the grid.

Without OpenCV (an environment where it cannot be installed), cv2.findContours is replaced by exact equivalents on the pixel grid, checked against
OpenCV 4.8 and 5.0 on random masks while writing this module (tests pin the cases by hand):

* the outer border that RETR_TREE / RETR_EXTERNAL traces is the border of one 8-connected component,
  so its bounding rectangle is the component's tight box (find_objects on ``label(mask, ones(3,3))``);
* a hole border runs through the foreground pixels 4-adjacent to the hole, so its bounding rectangle
  is the hole's box grown by one pixel on each side;
* the area of an outer contour (shoelace through pixel centres, thin parts cancelling) is
  ``#{2x2 cells with 4 corners in F} + 0.5 * #{2x2 cells with 3 corners in F}`` where F is the
  component with its holes filled; hole and nested contours are never larger than the top-level
  contour around them, so the largest contour is always a top-level component's.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

try:  # opencv-python-headless is a dependency; the emulation covers an environment without it
    import cv2
except ImportError:  # pragma: no cover - exercised by forcing use_opencv=False in the tests
    cv2 = None

from dml_ray.metrics.localization.boxes import ComponentBoxes, ImageBoxes, _ragged
from dml_ray.metrics.localization.grid import _check_thresholds
from dml_ray.metrics.localization.maps import _as_maps
from dml_ray.metrics.localization.modes import ArrayLike, Thresholds

# In-plane connectivity for a stack of T masks: nothing connects across the stack axis.
_EIGHT_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_EIGHT_IN_PLANE[1] = True
_FOUR_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_FOUR_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


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


def _wsol_rect(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """wsolevaluation's box from cv2.boundingRect (x, y, w, h) of a contour whose pixels span the
    tight box (x0, y0, x1 = max x + 1, y1 = max y + 1): (x, y, min(x + w, W - 1), min(y + h, H - 1))."""
    out = boxes.copy()
    out[:, 2] = np.minimum(boxes[:, 2], width - 1)
    out[:, 3] = np.minimum(boxes[:, 3], height - 1)
    return out


def _emulated_cut_boxes(quantised: np.ndarray, cuts: np.ndarray) -> ImageBoxes:
    """cv2.threshold + cv2.findContours(RETR_TREE) emulated on the pixel grid (module docstring) for a
    uint8 map [H, W] at every cut [C]: the largest contour's box per cut [C, 4], every contour's box [K, 4]
    and their cut indices [K]; an empty mask gives (0, 0, 0, 0) in both."""
    height, width = quantised.shape
    n_t = cuts.size
    masks = quantised[None] > cuts[:, None, None]  # cv2.THRESH_BINARY: src > thresh

    labels, count = ndimage.label(masks, structure=_EIGHT_IN_PLANE)
    slice_of, boxes = _labelled_boxes(labels, count)

    # Holes: 4-connected background components that do not reach the image edge (cv2 pads a zero
    # frame, so background touching the edge is outside). Their border box is the hole's box + 1.
    background, n_bg = ndimage.label(~masks, structure=_FOUR_IN_PLANE)
    edge = np.concatenate([background[:, 0].ravel(), background[:, -1].ravel(),
                           background[:, :, 0].ravel(), background[:, :, -1].ravel()])
    is_hole = np.ones(n_bg + 1, dtype=bool)
    is_hole[edge] = False
    is_hole[0] = False
    hole_slice, hole_boxes = _labelled_boxes(background, n_bg)
    hole_slice, hole_boxes = hole_slice[is_hole[1:]], hole_boxes[is_hole[1:]] + np.array([-1, -1, 1, 1])

    # Largest contour: the top-level components are the 8-connected components of the hole-filled
    # mask; cv2.contourArea of their outer border counts full 2x2 cells once and 3-corner cells half.
    filled = masks | is_hole[background]
    top, n_top = ndimage.label(filled, structure=_EIGHT_IN_PLANE)
    top_slice, top_boxes = _labelled_boxes(top, n_top)
    corners = (filled[:, :-1, :-1].astype(np.int8) + filled[:, :-1, 1:] + filled[:, 1:, :-1]
               + filled[:, 1:, 1:])
    cell_label = np.maximum(np.maximum(top[:, :-1, :-1], top[:, :-1, 1:]),
                            np.maximum(top[:, 1:, :-1], top[:, 1:, 1:]))
    half_cells = np.where(corners == 4, 2, np.where(corners == 3, 1, 0))
    area2 = np.bincount(cell_label.ravel(), weights=half_cells.ravel(), minlength=n_top + 1)[1:]
    chosen = _best_per_slice(top_slice, area2, prefer_last=True, n_slices=n_t)
    largest = np.zeros((n_t, 4), dtype=np.int64)
    largest[chosen >= 0] = _wsol_rect(top_boxes[chosen[chosen >= 0]], height, width)

    empty = np.setdiff1d(np.arange(n_t), slice_of)
    all_boxes = np.concatenate([_wsol_rect(boxes, height, width), _wsol_rect(hole_boxes, height, width),
                                np.zeros((empty.size, 4), dtype=np.int64)])
    all_slices = np.concatenate([slice_of, hole_slice, empty])
    return largest, all_boxes, all_slices


def _opencv_cut_boxes(quantised: np.ndarray, cuts: np.ndarray) -> ImageBoxes:
    """wsolevaluation's scoremap2bbox with OpenCV for a uint8 map [H, W] at every cut [C]: same outputs as
    ``_emulated_cut_boxes`` (the largest contour is the first of cv2's list with the largest
    cv2.contourArea, as Python's max() keeps)."""
    height, width = quantised.shape
    largest = np.zeros((cuts.size, 4), dtype=np.int64)
    boxes, owners = [], []
    for c, cut in enumerate(cuts):
        _, mask = cv2.threshold(quantised, int(cut), 255, cv2.THRESH_BINARY)
        contours = cv2.findContours(mask, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]  # OpenCV 3, 4 and 5
        if not contours:
            boxes.append(np.zeros((1, 4), dtype=np.int64))
            owners.append(np.array([c]))
            continue
        rects = np.array([cv2.boundingRect(contour) for contour in contours], dtype=np.int64).reshape(-1, 4)
        rects[:, 2:] += rects[:, :2]  # (x, y, w, h) -> (x, y, x + w, y + h), then wsolevaluation's clip
        rects[:, 2] = np.minimum(rects[:, 2], width - 1)
        rects[:, 3] = np.minimum(rects[:, 3], height - 1)
        largest[c] = rects[int(np.argmax([cv2.contourArea(contour) for contour in contours]))]
        boxes.append(rects)
        owners.append(np.full(len(rects), c))
    return largest, np.concatenate(boxes), np.concatenate(owners)


def _wsol_image_boxes(score: np.ndarray, thresholds: np.ndarray, use_opencv: bool | None = None) -> ImageBoxes:
    """One map [H, W] in [0, 1] at every threshold, wsolevaluation ``compute_bboxes_from_scoremaps``:
    uint8 quantisation, the cut ``int(t * max(u8))``, strict threshold, contour boxes. Returns the largest
    contour's box per threshold [T, 4], every contour's box [K, 4] and their threshold indices [K]; an empty
    mask gives (0, 0, 0, 0) in both. ``use_opencv``: None uses OpenCV when it is installed, False forces
    the emulation (tests compare the two)."""
    if not ((score >= 0) & (score <= 1)).all():
        raise ValueError("mode='wsol' needs maps in [0, 1] (wsolevaluation check_scoremap_validity); "
                         "pass them through score_maps(..., mode='wsol') first")
    if use_opencv and cv2 is None:
        raise ImportError("use_opencv=True needs opencv-python-headless (pip install opencv-python-headless)")
    quantised = (score * 255).astype(np.uint8)
    cuts = (thresholds * quantised.max()).astype(np.int64)  # int(threshold * np.max(scoremap_image))
    # The mask u8 > cut only changes where the cut passes a value the map holds: cuts with the same count
    # of held values at or below them give the same mask, so each such group is traced once.
    held = np.unique(quantised)
    masks, first, inverse = np.unique(np.searchsorted(held, cuts, side="right"), return_index=True,
                                      return_inverse=True)
    opencv = cv2 is not None if use_opencv is None else use_opencv
    largest, boxes, owner = (_opencv_cut_boxes if opencv else _emulated_cut_boxes)(quantised, cuts[first])
    # Spread the distinct cuts' boxes over the grid: threshold t takes cut inverse[t]'s rows.
    order = np.argsort(owner, kind="stable")
    start = np.searchsorted(owner[order], np.arange(masks.size + 1))
    rows = np.concatenate([order[start[u]:start[u + 1]] for u in inverse])
    return largest[inverse], boxes[rows], np.repeat(np.arange(thresholds.size), np.diff(start)[inverse])


def wsol_largest_contour_boxes(maps: ArrayLike, thresholds: Thresholds = None) -> np.ndarray:
    """wsolevaluation ``compute_bboxes_from_scoremaps(multi_contour_eval=False)``: per map (in
    [0, 1]) and threshold the box of the contour with the largest cv2.contourArea, in wsolevaluation's
    convention (package docstring). Returns [N, T, 4] int64."""
    arr = _as_maps(maps, np.float64)
    grid = _check_thresholds(thresholds, "wsol")
    return np.stack([_wsol_image_boxes(m, grid)[0] for m in arr]).reshape(len(arr), grid.size, 4)


def wsol_all_contour_boxes(maps: ArrayLike, thresholds: Thresholds = None) -> ComponentBoxes:
    """wsolevaluation ``compute_bboxes_from_scoremaps(multi_contour_eval=True)``: every RETR_TREE
    contour's box (outer borders of all components and borders of all holes)."""
    arr = _as_maps(maps, np.float64)
    grid = _check_thresholds(thresholds, "wsol")
    return _ragged([_wsol_image_boxes(m, grid) for m in arr])
