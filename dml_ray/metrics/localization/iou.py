"""Intersection over union in both conventions, and ground-truth boxes in the mode's convention."""
from __future__ import annotations

import numpy as np
import torch

from dml_ray.metrics.localization.modes import ArrayLike, Mode


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
