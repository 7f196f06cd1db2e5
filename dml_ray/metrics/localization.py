"""Weakly supervised localization from activation maps: frames, boxes, IoU and mergeable counters.

Protocol (DESIGN.md "Evaluation protocols: Localization"; activation-decomposition-tip2021 Sec. VI-A,
Tables I-IV; dist-cam Sec. 3, Table 1; MaxBoxAccV2 from Choe et al., "Evaluating Weakly Supervised
Object Localization Methods Right", CVPR 2020, public code clovaai/wsolevaluation):

    map (feature resolution) -> upsample to the model input frame -> min-max normalise
    -> mask at every threshold of a grid -> box(es) -> IoU with the ground-truth box(es), which are
    carried into the same frame (``box_to_input_frame``) -> counts per threshold -> accuracies.

Counting follows wsolevaluation's BoxEvaluator ("accumulate, then compute"), but the counts are
integer arrays, so two counters over disjoint shards merge by addition (a Ray reduce is a sum).

Two modes. ``"paper"`` (the default) follows DESIGN.md; ``"wsol"`` reproduces wsolevaluation so
numbers compare with published WSOL tables:

================  ====================================  ============================================
step              ``mode="paper"``                      ``mode="wsol"``
================  ====================================  ============================================
upsampling        bilinear, align_corners=False         bicubic, align_corners=False (torch; equals
                                                        the cv2.INTER_CUBIC resize of inference.py
                                                        up to ~1e-6, A = -0.75, replicated border)
normalisation     (m - min) / (max - min); constant     same; constant -> zeros; a map holding NaN
                  -> zeros; non-finite -> ValueError    -> zeros (inference.normalize_scoremap)
threshold grid    ``threshold_grid()`` =                the same grid (cam_curve_interval = 0.01)
                  np.arange(0, 1, 0.01), configurable
mask at t         ``map >= t`` on the float map         ``u8 > int(t * u8.max())`` with
                  (t = 0 keeps every pixel)             ``u8 = (map * 255).astype(uint8)``
                                                        (cv2.threshold THRESH_BINARY is strict; a
                                                        constant map gives an empty mask everywhere)
regions           8-connected components                contours of cv2.findContours(RETR_TREE):
                  (scipy.ndimage.label, ones(3, 3))     the outer border of every 8-connected
                                                        component AND the border of every hole
                                                        (4-connected background not reaching the
                                                        image edge)
single box        largest component by pixel count;     largest contour by cv2.contourArea (polygon
                  ties -> first in raster order         through the border pixel centres, see
                                                        ``wsol_largest_contour_boxes``); ties -> the
                                                        last component in raster order (cv2 lists
                                                        sibling contours in reverse discovery order
                                                        and max() keeps the first)
box               tight box in pixel-edge coordinates   cv2.boundingRect (x, y, w, h) -> (x, y,
                  (x0, y0, x1, y1) = (min x, min y,     min(x + w, W - 1), min(y + h, H - 1)): one
                  max x + 1, max y + 1)                 pixel past the component except at the
                                                        right / bottom edge, inclusive convention
empty mask        box (0, 0, 0, 0), area 0 -> IoU 0     box (0, 0, 0, 0), inclusive area 1 -> IoU
                                                        > 0 when the ground truth covers pixel (0, 0)
ground truth      continuous (x0, y0, x1, y1) in the    the same box truncated to integers
                  input frame                           (resize_bbox's int()), x1 <= W - 1,
                                                        y1 <= H - 1, inclusive convention
IoU               continuous areas (x1 - x0)(y1 - y0)   inclusive areas (x1 - x0 + 1)(y1 - y0 + 1)
                                                        (calculate_multiple_iou)
MaxBoxAccV2       all components' boxes; an image is    all contours' boxes (holes included); same
                  correct when ANY box reaches the IoU  rule
================  ====================================  ============================================

In both modes an image is correct at IoU threshold d when IoU >= d (wsolevaluation; the TIP paper's
text says "greater than 0.5"), the IoU of an image being its best over its ground-truth boxes; a
ground-truth box that is empty (outside the crop) or NaN-padded never matches (IoU 0).

Without OpenCV, cv2.findContours is replaced by exact equivalents on the pixel grid, checked against
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

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

logger = logging.getLogger(__name__)

Mode = Literal["paper", "wsol"]
MODES: tuple[str, ...] = ("paper", "wsol")
# activation-decomposition-tip2021 Sec. VI-A (Tables I, II, IV); dist-cam Sec. 3 (Table 1).
LOCALIZATION_IOU = 0.5
# MaxBoxAccV2 (Choe et al. CVPR 2020): mean over these IoU thresholds.
MAXBOXACC_IOUS: tuple[float, ...] = (0.3, 0.5, 0.7)

# In-plane connectivity for a stack of T masks: nothing connects across the stack axis.
_EIGHT_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_EIGHT_IN_PLANE[1] = True
_FOUR_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_FOUR_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)

ArrayLike = np.ndarray | torch.Tensor
Thresholds = ArrayLike | Sequence[float] | None
# Per map: largest box per threshold [T, 4], every box [K, 4], their threshold indices [K].
ImageBoxes = tuple[np.ndarray, np.ndarray, np.ndarray]


class ComponentBoxes(NamedTuple):
    """Ragged boxes in coordinate form: box k belongs to image ``image_index[k]`` at threshold
    ``threshold_index[k]``. Every (image, threshold) pair owns at least one row."""

    boxes: np.ndarray  # [K, 4] int64 (x0, y0, x1, y1)
    image_index: np.ndarray  # [K] int64
    threshold_index: np.ndarray  # [K] int64


# --------------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------------


def threshold_grid(interval: float = 0.01) -> np.ndarray:
    """Map thresholds ``np.arange(0, 1, interval)``: wsolevaluation's grid for ``cam_curve_interval``
    (0.01 in its evaluation.py command line and tests) and the grid search of
    activation-decomposition-tip2021 Sec. VI-A."""
    if not 0 < interval < 1:
        raise ValueError(f"threshold interval must be in (0, 1); got {interval}")
    return np.arange(0, 1, interval)


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    """``int`` -> (s, s); ``(h, w)`` -> (h, w)."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    if len(size) != 2:
        raise ValueError(f"{name} must be an int or (height, width); got {size!r}")
    return int(size[0]), int(size[1])


def resized_size(image_wh: ArrayLike | Sequence[float], resize: int | Sequence[int]) -> np.ndarray:
    """Output (width, height) of torchvision ``v2.Resize(resize)`` for images of size ``image_wh``
    ([..., 2]). An int resizes the shorter side to ``resize`` and the longer one to
    ``int(resize * long / short)`` (truncation, torchvision ``_compute_resized_output_size``; a square
    image counts its width as the shorter side); ``(h, w)`` resizes to exactly that."""
    wh = np.asarray(image_wh, dtype=np.int64)
    if wh.shape[-1] != 2 or (wh <= 0).any():
        raise ValueError(f"image_wh must be [..., 2] positive (width, height); got shape {wh.shape}")
    if not isinstance(resize, (int, np.integer)):
        h, w = _pair(resize, "resize")
        return np.broadcast_to(np.array([w, h], dtype=np.int64), wh.shape).copy()
    w, h = wh[..., 0], wh[..., 1]
    short, long = np.minimum(w, h), np.maximum(w, h)
    new_long = np.floor((int(resize) * long) / short).astype(np.int64)
    new_w = np.where(w <= h, int(resize), new_long)
    new_h = np.where(w <= h, new_long, int(resize))
    return np.stack([new_w, new_h], axis=-1)


def center_crop_offsets(size_wh: np.ndarray, crop: int | Sequence[int]) -> np.ndarray:
    """(left, top) of torchvision ``v2.CenterCrop(crop)`` on images of size ``size_wh`` ([..., 2]):
    ``int(round((size - crop) / 2))`` along an axis that is large enough (Python's round: halves go
    to even, so a surplus of 5 gives offset 2), and ``-((crop - size) // 2)`` along an axis that
    torchvision zero-pads first (``_center_crop_compute_padding``; its box kernel rounds the padded
    case differently, the pixels follow the padding)."""
    crop_h, crop_w = _pair(crop, "crop")
    size = np.asarray(size_wh, dtype=np.int64)
    crop_wh = np.array([crop_w, crop_h], dtype=np.int64)
    surplus = size - crop_wh
    return np.where(surplus >= 0, np.round(surplus / 2.0), -((-surplus) // 2)).astype(np.int64)


def box_to_input_frame(
    box_xywh: ArrayLike | Sequence[float],
    image_wh: ArrayLike | Sequence[float],
    resize: int | Sequence[int],
    crop: int | Sequence[int] | None,
) -> np.ndarray:
    """Carry ground-truth boxes from original-image pixels into the model input frame.

    The frame is the eval transform of ``dml_ray.data.transforms.eval_transform``: torchvision
    ``v2.Resize(resize)`` (see ``resized_size``; x scales by new_w / W, y by new_h / H) then
    ``v2.CenterCrop(crop)`` (see ``center_crop_offsets``); ``crop=None`` keeps the resized image.
    Coordinates are continuous pixel edges: box (x, y, w, h) covers [x, x + w] x [y, y + h].

    Args:
        box_xywh: [..., 4] boxes (x, y, w, h) in original pixels (CUB ``bounding_boxes.txt``).
        image_wh: [..., 2] original (width, height), broadcast against the boxes' leading shape.
        resize: as torchvision ``Resize``: int (shorter side) or (height, width).
        crop: as torchvision ``CenterCrop``: int or (height, width); None for no crop.

    Returns:
        [..., 4] float64 (x0, y0, x1, y1) in the input frame, clipped to the crop. A box wholly
        outside the crop comes back with x0 == x1 or y0 == y1 (empty): it never matches (IoU 0).
    """
    box = np.asarray(box_xywh, dtype=np.float64)
    if box.shape[-1] != 4:
        raise ValueError(f"box_xywh must be [..., 4] (x, y, w, h); got shape {box.shape}")
    if (box[..., 2:] < 0).any():
        raise ValueError("box_xywh has a negative width or height")
    wh = np.asarray(image_wh, dtype=np.int64)
    new_wh = resized_size(wh, resize)
    if crop is None:
        offset = np.zeros_like(new_wh)
        frame_wh = new_wh
    else:
        crop_h, crop_w = _pair(crop, "crop")
        offset = center_crop_offsets(new_wh, crop)
        frame_wh = np.broadcast_to(np.array([crop_w, crop_h], dtype=np.int64), new_wh.shape)
    # Multiply before dividing, as wsolevaluation's resize_bbox does, so integer truncation agrees.
    corners = np.concatenate([box[..., :2], box[..., :2] + box[..., 2:]], axis=-1)
    scale_num = np.concatenate([new_wh, new_wh], axis=-1)
    scale_den = np.concatenate([wh, wh], axis=-1)
    shift = np.concatenate([offset, offset], axis=-1)
    frame = (corners * scale_num) / scale_den - shift
    upper = np.concatenate([frame_wh, frame_wh], axis=-1)
    return np.clip(frame, 0, upper)


# --------------------------------------------------------------------------------------------------
# Maps
# --------------------------------------------------------------------------------------------------


def _as_maps(maps: ArrayLike, dtype: np.dtype | type | None = np.float32) -> np.ndarray:
    """[N, H, W] numpy array from a numpy array or a tensor: float64 stays float64 when ``dtype`` is
    None, anything else becomes ``dtype`` (float32 for None)."""
    if isinstance(maps, torch.Tensor):
        maps = maps.detach().cpu().numpy()
    arr = np.asarray(maps)
    if dtype is None:
        dtype = np.float64 if arr.dtype == np.float64 else np.float32
    out = arr.astype(dtype, copy=False)
    if out.ndim != 3:
        raise ValueError(f"maps must be [N, H, W]; got shape {out.shape}")
    return out


def upsample_maps(
    maps: ArrayLike, size: int | Sequence[int], method: Literal["bilinear", "bicubic"] = "bilinear"
) -> np.ndarray:
    """Resize [N, h, w] maps to the model input frame ``size`` (int or (H, W)) with
    ``torch.nn.functional.interpolate(mode=method, align_corners=False)`` (DESIGN.md: maps are stored
    at feature resolution and upsampled where used). Bicubic is what wsolevaluation's inference.py
    does with cv2.INTER_CUBIC. Same size in and out is the identity. Keeps float64 input as float64,
    anything else becomes float32."""
    arr = _as_maps(maps, None)
    out_h, out_w = _pair(size, "size")
    if arr.shape[1:] == (out_h, out_w):
        return arr.copy()
    resized = F.interpolate(torch.from_numpy(arr)[:, None], size=(out_h, out_w), mode=method,
                            align_corners=False)
    return resized[:, 0].numpy()


def minmax_normalise(maps: ArrayLike) -> np.ndarray:
    """Per-map ``(m - min) / (max - min)`` into [0, 1] (DESIGN.md localization; wsolevaluation
    ``normalize_scoremap``). A constant map becomes all zeros: in ``mode="paper"`` its mask at t = 0
    is the whole frame and empty above; in ``mode="wsol"`` its mask is empty at every threshold.
    Raises ValueError on NaN or infinite values."""
    arr = _as_maps(maps, None)
    if not np.isfinite(arr).all():
        raise ValueError("maps hold NaN or infinite values; cannot min-max normalise")
    low = arr.min(axis=(1, 2), keepdims=True)
    span = arr.max(axis=(1, 2), keepdims=True) - low
    constant = span == 0
    return np.where(constant, 0, (arr - low) / np.where(constant, 1, span)).astype(arr.dtype)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"localization mode {mode!r} is unknown; expected one of: {', '.join(MODES)}")


def score_maps(maps: ArrayLike, size: int | Sequence[int] | None = None, mode: Mode = "paper") -> np.ndarray:
    """The maps a mode thresholds: upsampled to ``size`` (None: already in the input frame) and
    min-max normalised. ``"paper"``: bilinear, float32, non-finite -> ValueError. ``"wsol"``: bicubic,
    float64 (wsolevaluation handles np.float maps), a map holding NaN -> zeros as in
    ``normalize_scoremap``."""
    _check_mode(mode)
    if mode == "paper":
        arr = _as_maps(maps, np.float32)
        return minmax_normalise(arr if size is None else upsample_maps(arr, size, "bilinear"))
    arr = _as_maps(maps, np.float64)
    if size is not None:
        arr = upsample_maps(arr, size, "bicubic")
    has_nan = np.isnan(arr).any(axis=(1, 2), keepdims=True)
    return minmax_normalise(np.where(has_nan, 0.0, arr))


# --------------------------------------------------------------------------------------------------
# Boxes from masks
# --------------------------------------------------------------------------------------------------


def _check_thresholds(thresholds: Thresholds) -> np.ndarray:
    grid = threshold_grid() if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0 or not np.isfinite(grid).all():
        raise ValueError(f"thresholds must be a non-empty 1-D finite array; got shape {grid.shape}")
    return grid


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


def _wsol_rect(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """wsolevaluation's box from cv2.boundingRect (x, y, w, h) of a contour whose pixels span the
    tight box (x0, y0, x1 = max x + 1, y1 = max y + 1): (x, y, min(x + w, W - 1), min(y + h, H - 1))."""
    out = boxes.copy()
    out[:, 2] = np.minimum(boxes[:, 2], width - 1)
    out[:, 3] = np.minimum(boxes[:, 3], height - 1)
    return out


def _wsol_image_boxes(score: np.ndarray, thresholds: np.ndarray) -> ImageBoxes:
    """One map [H, W] in [0, 1] at every threshold, wsolevaluation ``compute_bboxes_from_scoremaps``:
    uint8 quantisation, strict threshold, cv2.findContours(RETR_TREE) emulated on the pixel grid
    (module docstring). Returns the largest contour's box per threshold [T, 4], every contour's box
    [K, 4] and their threshold indices [K]; an empty mask gives (0, 0, 0, 0) in both."""
    height, width = score.shape
    n_t = thresholds.size
    quantised = (score * 255).astype(np.uint8)
    cuts = (thresholds * quantised.max()).astype(np.int64)  # int(threshold * np.max(scoremap_image))
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


def _image_boxes(score: np.ndarray, thresholds: np.ndarray, mode: Mode) -> ImageBoxes:
    if mode == "paper":
        return _paper_image_boxes(score, thresholds)
    if not ((score >= 0) & (score <= 1)).all():
        raise ValueError("mode='wsol' needs maps in [0, 1] (wsolevaluation check_scoremap_validity); "
                         "pass them through score_maps(..., mode='wsol') first")
    return _wsol_image_boxes(score, thresholds)


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


def _ragged(per_image: list[ImageBoxes]) -> ComponentBoxes:
    boxes = np.concatenate([b for _, b, _ in per_image]) if per_image else np.zeros((0, 4), np.int64)
    slices = np.concatenate([s for _, _, s in per_image]) if per_image else np.zeros(0, np.int64)
    images = np.repeat(np.arange(len(per_image)), [len(s) for _, _, s in per_image])
    return ComponentBoxes(boxes.astype(np.int64), images.astype(np.int64), slices.astype(np.int64))


def all_component_boxes(maps: ArrayLike, thresholds: Thresholds = None) -> ComponentBoxes:
    """Every 8-connected component's tight box of ``map >= t``, for MaxBoxAccV2's multi-contour
    evaluation (Choe et al. CVPR 2020: a prediction is correct when ANY box reaches the IoU). Same
    conventions as ``largest_component_boxes``; an empty mask contributes one (0, 0, 0, 0) row."""
    arr = _as_maps(maps, None)
    grid = _check_thresholds(thresholds)
    return _ragged([_paper_image_boxes(m, grid) for m in arr])


def wsol_largest_contour_boxes(maps: ArrayLike, thresholds: Thresholds = None) -> np.ndarray:
    """wsolevaluation ``compute_bboxes_from_scoremaps(multi_contour_eval=False)``: per map (in
    [0, 1]) and threshold the box of the contour with the largest cv2.contourArea, in wsolevaluation's
    convention (module docstring). Returns [N, T, 4] int64."""
    arr = _as_maps(maps, np.float64)
    grid = _check_thresholds(thresholds)
    return np.stack([_image_boxes(m, grid, "wsol")[0] for m in arr]).reshape(len(arr), grid.size, 4)


def wsol_all_contour_boxes(maps: ArrayLike, thresholds: Thresholds = None) -> ComponentBoxes:
    """wsolevaluation ``compute_bboxes_from_scoremaps(multi_contour_eval=True)``: every RETR_TREE
    contour's box (outer borders of all components and borders of all holes)."""
    arr = _as_maps(maps, np.float64)
    grid = _check_thresholds(thresholds)
    return _ragged([_image_boxes(m, grid, "wsol") for m in arr])


# --------------------------------------------------------------------------------------------------
# IoU
# --------------------------------------------------------------------------------------------------


def box_iou(pred: ArrayLike, gt: ArrayLike) -> np.ndarray:
    """IoU of (x0, y0, x1, y1) boxes in continuous coordinates, broadcast over leading axes:
    area = (x1 - x0) * (y1 - y0). An empty union (two empty boxes) gives 0, so do empty boxes."""
    p = np.asarray(pred, dtype=np.float64)
    g = np.asarray(gt, dtype=np.float64)
    iw = np.clip(np.minimum(p[..., 2], g[..., 2]) - np.maximum(p[..., 0], g[..., 0]), 0, None)
    ih = np.clip(np.minimum(p[..., 3], g[..., 3]) - np.maximum(p[..., 1], g[..., 1]), 0, None)
    inter = iw * ih
    union = ((p[..., 2] - p[..., 0]) * (p[..., 3] - p[..., 1])
             + (g[..., 2] - g[..., 0]) * (g[..., 3] - g[..., 1]) - inter)
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def box_iou_inclusive(pred: ArrayLike, gt: ArrayLike) -> np.ndarray:
    """IoU in wsolevaluation's inclusive-pixel convention (``calculate_multiple_iou``): a box
    (x0, y0, x1, y1) covers pixels x0..x1 and y0..y1, area (x1 - x0 + 1) * (y1 - y0 + 1), so
    (0, 0, 0, 0) is one pixel; a non-positive union gives 0. Broadcast over leading axes."""
    p = np.asarray(pred, dtype=np.float64)
    g = np.asarray(gt, dtype=np.float64)
    iw = np.clip(np.minimum(p[..., 2], g[..., 2]) - np.maximum(p[..., 0], g[..., 0]) + 1, 0, None)
    ih = np.clip(np.minimum(p[..., 3], g[..., 3]) - np.maximum(p[..., 1], g[..., 1]) + 1, 0, None)
    inter = iw * ih
    union = ((p[..., 2] - p[..., 0] + 1) * (p[..., 3] - p[..., 1] + 1)
             + (g[..., 2] - g[..., 0] + 1) * (g[..., 3] - g[..., 1] + 1) - inter)
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _gt_boxes(
    gt_boxes: ArrayLike, n_maps: int, size: tuple[int, int], mode: Mode
) -> tuple[np.ndarray, np.ndarray]:
    """[N, G, 4] ground truth in the mode's convention and [N, G] validity (non-empty, not NaN).
    Accepts [N, 4] (one box per image) or [N, G, 4] (NaN rows pad images with fewer boxes)."""
    gt = np.asarray(gt_boxes.detach().cpu().numpy() if isinstance(gt_boxes, torch.Tensor) else gt_boxes,
                    dtype=np.float64)
    if gt.ndim == 2:
        gt = gt[:, None]
    if gt.ndim != 3 or gt.shape[0] != n_maps or gt.shape[2] != 4:
        raise ValueError(f"gt_boxes must be [N, 4] or [N, G, 4] (x0, y0, x1, y1) with N = {n_maps} maps; "
                         f"got shape {gt.shape}")
    finite = np.isfinite(gt).all(axis=2)
    safe = np.where(finite[..., None], gt, 0.0)
    if (safe[..., 2] < safe[..., 0]).any() or (safe[..., 3] < safe[..., 1]).any():
        raise ValueError("gt_boxes must be (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0 "
                         "(use box_to_input_frame on (x, y, w, h) boxes)")
    valid = finite & (safe[..., 2] > safe[..., 0]) & (safe[..., 3] > safe[..., 1])
    if mode == "wsol":
        height, width = size
        safe = np.floor(np.clip(safe, 0, None))
        safe[..., 2] = np.minimum(safe[..., 2], width - 1)
        safe[..., 3] = np.minimum(safe[..., 3], height - 1)
        safe[..., 0] = np.minimum(safe[..., 0], safe[..., 2])
        safe[..., 1] = np.minimum(safe[..., 1], safe[..., 3])
    return safe, valid


def _best_iou(boxes: np.ndarray, gt: np.ndarray, valid: np.ndarray, mode: Mode) -> np.ndarray:
    """IoU of boxes [..., 4] against every ground-truth box [..., G, 4] (broadcast), best over G."""
    iou_fn = box_iou if mode == "paper" else box_iou_inclusive
    ious = np.where(valid, iou_fn(boxes[..., None, :], gt), 0.0)
    return ious.max(axis=-1)


# --------------------------------------------------------------------------------------------------
# Per image and accumulated results
# --------------------------------------------------------------------------------------------------


@dataclass
class _BatchResult:
    largest_boxes: np.ndarray  # [N, T, 4]
    largest_iou: np.ndarray  # [N, T]
    any_iou: np.ndarray  # [N, T] best IoU over all components / contours


def _evaluate_batch(maps: ArrayLike, gt_boxes: ArrayLike, thresholds: np.ndarray,
                    input_size: int | Sequence[int] | None, mode: Mode) -> _BatchResult:
    _check_mode(mode)
    scores = score_maps(maps, input_size, mode)
    n_maps, height, width = scores.shape
    gt, valid = _gt_boxes(gt_boxes, n_maps, (height, width), mode)
    per_image = [_image_boxes(s, thresholds, mode) for s in scores]
    largest = np.stack([p[0] for p in per_image]).reshape(n_maps, thresholds.size, 4)
    largest_iou = _best_iou(largest, gt[:, None], valid[:, None], mode)
    ragged = _ragged(per_image)
    ragged_iou = _best_iou(ragged.boxes, gt[ragged.image_index], valid[ragged.image_index], mode)
    any_iou = np.zeros((n_maps, thresholds.size))
    np.maximum.at(any_iou, (ragged.image_index, ragged.threshold_index), ragged_iou)
    return _BatchResult(largest, largest_iou, any_iou)


def per_image_results(
    maps: ArrayLike,
    gt_boxes: ArrayLike,
    thresholds: Thresholds = None,
    *,
    input_size: int | Sequence[int] | None = None,
    mode: Mode = "paper",
    iou_threshold: float = LOCALIZATION_IOU,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of the ``localization`` table (image x threshold) for one method.

    Args:
        maps: [N, h, w] raw maps; upsampled to ``input_size`` (None: already in the input frame) and
            normalised as ``score_maps`` does for ``mode``.
        gt_boxes: [N, 4] or [N, G, 4] (x0, y0, x1, y1) in the input frame (``box_to_input_frame``).
        thresholds: [T]; default ``threshold_grid()``.
        input_size: the model input frame, int or (H, W).
        mode: "paper" or "wsol" (module docstring).
        iou_threshold: correct when IoU >= this (0.5 in both papers).

    Returns:
        boxes [N, T, 4] (largest component / contour, the mode's convention), ious [N, T] float64
        (best over the ground-truth boxes), correct [N, T] bool.
    """
    grid = _check_thresholds(thresholds)
    result = _evaluate_batch(maps, gt_boxes, grid, input_size, mode)
    return result.largest_boxes, result.largest_iou, result.largest_iou >= iou_threshold


class LocalizationCounter:
    """Per-threshold localization counts, accumulated batch by batch and merged by addition
    (wsolevaluation BoxEvaluator: accumulate, then compute).

    Counts (all int64, so shards sum exactly):
        ``n_images``; ``correct_largest[i, t]`` images whose largest component (contour) box reaches
        ``iou_thresholds[i]`` at ``thresholds[t]`` (activation-decomposition-tip2021 Table I);
        ``correct_any[i, t]`` the same with any component's box (MaxBoxAccV2); ``n_with_class`` images
        given a class verdict and ``correct_class_and_box[t]`` those whose class is right AND whose
        largest box has IoU >= 0.5 (dist-cam Table 1, top-1 localization).
    """

    def __init__(
        self,
        thresholds: Thresholds = None,
        iou_thresholds: Sequence[float] = MAXBOXACC_IOUS,
        *,
        mode: Mode = "paper",
        input_size: int | Sequence[int] | None = None,
    ) -> None:
        """Args:
            thresholds: [T] map thresholds; default ``threshold_grid()`` (np.arange(0, 1, 0.01)).
            iou_thresholds: IoU thresholds of MaxBoxAccV2; must contain 0.5, the papers' criterion.
            mode: "paper" (DESIGN.md) or "wsol" (wsolevaluation, module docstring).
            input_size: model input frame (int or (H, W)) the maps are upsampled to; None when
                ``accumulate`` receives maps already in that frame.
        """
        _check_mode(mode)
        self.thresholds = _check_thresholds(thresholds)
        self.iou_thresholds = tuple(float(d) for d in iou_thresholds)
        if LOCALIZATION_IOU not in self.iou_thresholds:
            raise ValueError(f"iou_thresholds must contain {LOCALIZATION_IOU} (the papers' criterion); "
                             f"got {self.iou_thresholds}")
        self.mode: Mode = mode
        self.input_size = None if input_size is None else _pair(input_size, "input_size")
        shape = (len(self.iou_thresholds), self.thresholds.size)
        self.n_images = 0
        self.correct_largest = np.zeros(shape, dtype=np.int64)
        self.correct_any = np.zeros(shape, dtype=np.int64)
        self.n_with_class = 0
        self.correct_class_and_box = np.zeros(self.thresholds.size, dtype=np.int64)

    @property
    def _primary(self) -> int:
        return self.iou_thresholds.index(LOCALIZATION_IOU)

    def accumulate(
        self, maps: ArrayLike, gt_boxes: ArrayLike, correct_class_mask: ArrayLike | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Count one batch; returns its ``per_image_results`` (boxes, ious, correct), computed once for both.

        Args:
            maps: [N, h, w] raw maps (see ``per_image_results``).
            gt_boxes: [N, 4] or [N, G, 4] (x0, y0, x1, y1) in the input frame; an image is right when
                its best ground-truth IoU reaches the threshold.
            correct_class_mask: [N] bool, True where the predicted class (nearest prototype, dist-cam
                Sec. 3) is the image's class; needed for the top-1 localization error.
        """
        result = _evaluate_batch(maps, gt_boxes, self.thresholds, self.input_size, self.mode)
        n_maps = result.largest_iou.shape[0]
        ious = np.asarray(self.iou_thresholds)[:, None, None]
        self.correct_largest += (result.largest_iou[None] >= ious).sum(axis=1)
        self.correct_any += (result.any_iou[None] >= ious).sum(axis=1)
        self.n_images += n_maps
        if correct_class_mask is not None:
            right_class = np.asarray(correct_class_mask, dtype=bool)
            if right_class.shape != (n_maps,):
                raise ValueError(f"correct_class_mask must be [N] bool with N = {n_maps}; "
                                 f"got shape {right_class.shape}")
            self.n_with_class += n_maps
            box_ok = result.largest_iou >= LOCALIZATION_IOU
            self.correct_class_and_box += (box_ok & right_class[:, None]).sum(axis=0)
        logger.debug("localization counter (%s): +%d images, %d in all", self.mode, n_maps, self.n_images)
        return result.largest_boxes, result.largest_iou, result.largest_iou >= LOCALIZATION_IOU

    def merge(self, other: LocalizationCounter) -> LocalizationCounter:
        """A new counter holding the sum of both (shards over disjoint images); neither is changed."""
        same = (self.mode == other.mode and self.input_size == other.input_size
                and self.iou_thresholds == other.iou_thresholds
                and np.array_equal(self.thresholds, other.thresholds))
        if not same:
            raise ValueError("cannot merge localization counters with different mode, input_size, "
                             "thresholds or iou_thresholds")
        merged = LocalizationCounter(self.thresholds, self.iou_thresholds, mode=self.mode,
                                     input_size=self.input_size)
        merged.n_images = self.n_images + other.n_images
        merged.correct_largest = self.correct_largest + other.correct_largest
        merged.correct_any = self.correct_any + other.correct_any
        merged.n_with_class = self.n_with_class + other.n_with_class
        merged.correct_class_and_box = self.correct_class_and_box + other.correct_class_and_box
        return merged

    def threshold_index(self, threshold: float) -> int:
        """Position of ``threshold`` on this counter's grid (to float tolerance)."""
        hits = np.flatnonzero(np.isclose(self.thresholds, threshold, rtol=0, atol=1e-9))
        if hits.size == 0:
            grid = self.thresholds
            raise ValueError(f"threshold {threshold} is not on the counter's grid "
                             f"({grid.min():g}..{grid.max():g}, {grid.size} values)")
        return int(hits[0])

    def compute(self, threshold: float | None = None) -> dict:
        """Accuracies as fractions in [0, 1].

        Args:
            threshold: report the "at threshold" values there (chosen on held-out images with
                ``choose_threshold``); None: at the best threshold of these images (paper Table II).

        Returns:
            dict with ``n_images``; ``thresholds`` [T]; ``accuracy`` [T] (IoU >= 0.5, largest box,
            Table I); ``best_threshold``, ``best_accuracy`` (Table II; ties -> first on the grid);
            ``threshold`` and ``accuracy_at_threshold``; ``maxboxacc_v2`` (mean over
            ``iou_thresholds`` of the best-threshold accuracy with any box) and
            ``maxboxacc_v2_per_iou`` {iou: value}; and, when every image came with a class verdict,
            ``top1_loc_error`` at ``threshold`` and ``top1_loc_error_per_threshold`` [T] (dist-cam
            Table 1: 1 - fraction with the right class AND IoU >= 0.5), else None for both.
        """
        if self.n_images == 0:
            raise ValueError("no images were accumulated; nothing to compute")
        if 0 < self.n_with_class < self.n_images:
            raise ValueError(f"correct_class_mask was given for {self.n_with_class} of {self.n_images} "
                             "images; give it for every batch or for none")
        accuracy = self.correct_largest[self._primary] / self.n_images
        best = int(np.argmax(accuracy))
        at = best if threshold is None else self.threshold_index(threshold)
        per_iou = self.correct_any.max(axis=1) / self.n_images
        top1 = (1.0 - self.correct_class_and_box / self.n_images) if self.n_with_class else None
        return {
            "n_images": self.n_images,
            "thresholds": self.thresholds.copy(),
            "accuracy": accuracy,
            "best_threshold": float(self.thresholds[best]),
            "best_accuracy": float(accuracy[best]),
            "threshold": float(self.thresholds[at]),
            "accuracy_at_threshold": float(accuracy[at]),
            "maxboxacc_v2": float(per_iou.mean()),
            "maxboxacc_v2_per_iou": {d: float(v) for d, v in zip(self.iou_thresholds, per_iou, strict=True)},
            "top1_loc_error": None if top1 is None else float(top1[at]),
            "top1_loc_error_per_threshold": top1,
        }


def choose_threshold(counter_on_holdout: LocalizationCounter) -> float:
    """The map threshold with the best accuracy (IoU >= 0.5, largest box) on held-out images,
    the first on the grid on ties; evaluate the other images with ``counter.compute(threshold=...)`` so the
    threshold is not tuned on the images it is reported on (Choe et al. CVPR 2020, Sec. 4)."""
    return counter_on_holdout.compute()["best_threshold"]
