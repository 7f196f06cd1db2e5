"""Per-image results and mergeable per-threshold counters: accuracy per threshold (TIP Table I), best
threshold (Table II), MaxBoxAccV2 and the Dist-CAM top-1 localization error."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dml_ray.metrics.localization.boxes import ImageBoxes, _ragged
from dml_ray.metrics.localization.components import _paper_image_boxes
from dml_ray.metrics.localization.frames import _pair
from dml_ray.metrics.localization.grid import _check_thresholds
from dml_ray.metrics.localization.iou import _best_iou, _gt_boxes
from dml_ray.metrics.localization.maps import score_maps
from dml_ray.metrics.localization.modes import (
    LOCALIZATION_IOU,
    MAXBOXACC_IOUS,
    ArrayLike,
    IouRule,
    Mode,
    Normalise,
    Thresholds,
    passes,
    resolve_options,
)
from dml_ray.metrics.localization.wsol import _wsol_image_boxes

logger = logging.getLogger(__name__)


def _image_boxes(score: np.ndarray, thresholds: np.ndarray, mode: Mode) -> ImageBoxes:
    if mode == "paper":
        return _paper_image_boxes(score, thresholds)
    return _wsol_image_boxes(score, thresholds)


@dataclass
class _BatchResult:
    largest_boxes: np.ndarray  # [N, T, 4]
    largest_iou: np.ndarray  # [N, T]
    any_iou: np.ndarray  # [N, T] best IoU over all components / contours


def _evaluate_batch(maps: ArrayLike, gt_boxes: ArrayLike, thresholds: np.ndarray,
                    input_size: int | Sequence[int] | None, mode: Mode, normalise: Normalise) -> _BatchResult:
    scores = score_maps(maps, input_size, mode, normalise)
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
    normalise: Normalise | None = None,
    iou_rule: IouRule | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of the ``localization`` table (image x threshold) for one method.

    Args:
        maps: [N, h, w] raw maps; upsampled to ``input_size`` (None: already in the input frame) and
            normalised as ``score_maps`` does for ``mode`` and ``normalise``.
        gt_boxes: [N, 4] or [N, G, 4] (x0, y0, x1, y1) in the input frame (``box_to_input_frame``).
        thresholds: [T]; default the mode's grid (``mode_threshold_grid``).
        input_size: the model input frame, int or (H, W).
        mode: "paper" or "wsol" (package docstring of dml_ray.metrics.localization).
        iou_threshold: the IoU criterion (0.5 in both papers).
        normalise: "relu_max" or "minmax"; None: the mode's default (``MODE_DEFAULTS``).
        iou_rule: "greater" (IoU > criterion) or "at_least" (>=); None: the mode's default.

    Returns:
        boxes [N, T, 4] (largest component / contour, the mode's convention), ious [N, T] float64
        (best over the ground-truth boxes), correct [N, T] bool.
    """
    normalise, iou_rule = resolve_options(mode, normalise, iou_rule)
    grid = _check_thresholds(thresholds, mode)
    result = _evaluate_batch(maps, gt_boxes, grid, input_size, mode, normalise)
    return result.largest_boxes, result.largest_iou, passes(result.largest_iou, iou_threshold, iou_rule)


class LocalizationCounter:
    """Per-threshold localization counts, accumulated batch by batch and merged by addition
    (wsolevaluation BoxEvaluator: accumulate, then compute).

    Counts (all int64, so shards sum exactly):
        ``n_images``; ``correct_largest[i, t]`` images whose largest component (contour) box passes
        ``iou_thresholds[i]`` under ``iou_rule`` at ``thresholds[t]`` (activation-decomposition-tip2021
        Table I: IoU > 0.5); ``correct_any[i, t]`` images with any component's box at IoU >=
        ``iou_thresholds[i]`` (MaxBoxAccV2, Choe et al.'s >= in both modes); ``n_with_class`` images given a
        class verdict and ``correct_class_and_box[t]`` those whose class is right AND whose largest box has
        IoU >= 0.5 (dist-cam Sec. 4: a localization is wrong when the IoU "is lower than 0.5").
    """

    def __init__(
        self,
        thresholds: Thresholds = None,
        iou_thresholds: Sequence[float] = MAXBOXACC_IOUS,
        *,
        mode: Mode = "paper",
        input_size: int | Sequence[int] | None = None,
        normalise: Normalise | None = None,
        iou_rule: IouRule | None = None,
    ) -> None:
        """Args:
            thresholds: [T] map thresholds; default the mode's grid (``mode_threshold_grid``: paper
                np.arange(0, 1, 0.01), wsol np.arange(0, 1, 0.001)).
            iou_thresholds: IoU thresholds of MaxBoxAccV2; must contain 0.5, the papers' criterion.
            mode: "paper" (DESIGN.md) or "wsol" (wsolevaluation, package docstring).
            input_size: model input frame (int or (H, W)) the maps are upsampled to; None when
                ``accumulate`` receives maps already in that frame.
            normalise: "relu_max" or "minmax" (``score_maps``); None: the mode's default.
            iou_rule: "greater" or "at_least" for ``correct_largest``; None: the mode's default.
        """
        self.normalise, self.iou_rule = resolve_options(mode, normalise, iou_rule)
        self.thresholds = _check_thresholds(thresholds, mode)
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
        result = _evaluate_batch(maps, gt_boxes, self.thresholds, self.input_size, self.mode, self.normalise)
        n_maps = result.largest_iou.shape[0]
        ious = np.asarray(self.iou_thresholds)[:, None, None]
        self.correct_largest += passes(result.largest_iou[None], ious, self.iou_rule).sum(axis=1)
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
        return (result.largest_boxes, result.largest_iou,
                passes(result.largest_iou, LOCALIZATION_IOU, self.iou_rule))

    def merge(self, other: LocalizationCounter) -> LocalizationCounter:
        """A new counter holding the sum of both (shards over disjoint images); neither is changed."""
        same = (self.mode == other.mode and self.input_size == other.input_size
                and (self.normalise, self.iou_rule) == (other.normalise, other.iou_rule)
                and self.iou_thresholds == other.iou_thresholds
                and np.array_equal(self.thresholds, other.thresholds))
        if not same:
            raise ValueError("cannot merge localization counters with different mode, input_size, "
                             "normalise, iou_rule, thresholds or iou_thresholds")
        merged = LocalizationCounter(self.thresholds, self.iou_thresholds, mode=self.mode,
                                     input_size=self.input_size, normalise=self.normalise, iou_rule=self.iou_rule)
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
            dict with ``n_images``; ``thresholds`` [T]; ``accuracy`` [T] (IoU > 0.5 or >= 0.5 by
            ``iou_rule``, largest box, Table I); ``best_threshold``, ``best_accuracy`` (Table II; ties -> first on the grid);
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
    """The map threshold with the best accuracy (IoU criterion 0.5, largest box) on held-out images,
    the first on the grid on ties; evaluate the other images with ``counter.compute(threshold=...)`` so the
    threshold is not tuned on the images it is reported on (Choe et al. CVPR 2020, Sec. 4)."""
    return counter_on_holdout.compute()["best_threshold"]
