"""Weakly supervised localization from activation maps: frames, boxes, IoU and mergeable counters.

Protocol (DESIGN.md "Evaluation protocols: Localization"; activation-decomposition-tip2021 Sec. VI-A,
Tables I-IV; dist-cam Sec. 3, Table 1; MaxBoxAccV2 from Choe et al., "Evaluating Weakly Supervised
Object Localization Methods Right", CVPR 2020, public code clovaai/wsolevaluation):

    map (feature resolution) -> normalise and upsample to the model input frame
    -> mask at every threshold of a grid -> box(es) -> IoU with the ground-truth box(es), which are
    carried into the same frame (``box_to_input_frame``) -> counts per threshold -> accuracies.

Counting follows wsolevaluation's BoxEvaluator ("accumulate, then compute"), but the counts are
integer arrays, so two counters over disjoint shards merge by addition (a Ray reduce is a sum).

Two modes. ``"paper"`` (the default) follows the TIP paper and its authors' code; ``"wsol"`` reproduces
wsolevaluation so numbers compare with published WSOL tables:

================  ====================================  ============================================
step              ``mode="paper"``                      ``mode="wsol"``
================  ====================================  ============================================
input frame       the run's eval transform (resize the  Resize((S, S)), no crop (wsolevaluation's
                  shorter side, centre crop)            data_loaders test transform; the pipeline's
                                                        ``data.frame: resize``)
constant map      zeros, decided on the stored map      same (wsolevaluation normalize_scoremap sees
                  (before upsampling)                   cv2's exact constant)
normalisation     ``normalise="relu_max"`` (default):   (m - min) / (max - min) after upsampling;
                  max(m, 0) / max at map resolution,    a map holding NaN -> zeros
                  then upsampling (the TIP authors'     (inference.normalize_scoremap)
                  demo code); ``"minmax"``: upsample,
                  then (m - min) / (max - min);
                  non-finite -> ValueError
upsampling        bilinear, align_corners=False         bicubic, align_corners=False (torch; equals
                                                        the cv2.INTER_CUBIC resize of inference.py
                                                        up to ~1e-6, A = -0.75, replicated border)
threshold grid    ``paper_threshold_grid()`` =          ``threshold_grid(0.001)`` (cam_curve_interval
                  np.arange(0, 1, 0.01) plus Table I's  default); any interval, nothing added
                  thresholds (0.15 ... 0.7) if missed
mask at t         ``map >= t`` on the float map         ``u8 > int(t * u8.max())`` with
                  (t = 0 keeps every pixel)             ``u8 = (map * 255).astype(uint8)``
                                                        (cv2.threshold THRESH_BINARY is strict; a
                                                        constant map gives an empty mask everywhere)
regions           8-connected components (as            contours of cv2.findContours(RETR_TREE):
                  scipy.ndimage.label, ones(3, 3))      the outer border of every 8-connected
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

Correct at IoU criterion d (the IoU of an image being its best over its ground-truth boxes; a ground-truth
box that is empty (outside the crop) or NaN-padded never matches): mode paper counts IoU > d for the
largest box (TIP Sec. VI-A: "greater than 0.5"; ``iou_rule="at_least"`` for >=), mode wsol IoU >= d
(BoxEvaluator). MaxBoxAccV2 counts IoU >= d in both modes (its definition) and the Dist-CAM top-1
localization error IoU >= 0.5 (dist-cam Sec. 4: wrong when "lower than 0.5").

Paper mode boxes every threshold in one union-find sweep (``components``, Numba); wsol mode thresholds and
traces contours with OpenCV, once per distinct 8-bit cut (``wsol``).

The wsol mode's exact emulation of OpenCV's contours (the fallback without OpenCV) is described in ``wsol.py``.

One module per idea: ``grid`` (thresholds), ``frames`` (input frame), ``maps`` (score maps), ``components``
(paper-mode boxes), ``wsol`` (wsolevaluation-exact boxes), ``boxes`` (containers), ``iou`` and ``counter``
(counters, MaxBoxAccV2). Everything public is re-exported here.
"""
from dml_ray.metrics.localization.boxes import ComponentBoxes
from dml_ray.metrics.localization.components import all_component_boxes, largest_component_boxes
from dml_ray.metrics.localization.counter import LocalizationCounter, choose_threshold, per_image_results
from dml_ray.metrics.localization.frames import box_to_input_frame, center_crop_offsets, resized_size
from dml_ray.metrics.localization.grid import (
    DEFAULT_INTERVAL,
    PAPER_THRESHOLDS,
    mode_threshold_grid,
    paper_threshold_grid,
    threshold_grid,
)
from dml_ray.metrics.localization.iou import box_iou, box_iou_inclusive
from dml_ray.metrics.localization.maps import minmax_normalise, relu_max_normalise, score_maps, upsample_maps
from dml_ray.metrics.localization.modes import (
    IOU_RULES,
    LOCALIZATION_IOU,
    MAXBOXACC_IOUS,
    MODE_DEFAULTS,
    MODES,
    NORMALISATIONS,
    IouRule,
    Mode,
    Normalise,
)
from dml_ray.metrics.localization.wsol import wsol_all_contour_boxes, wsol_largest_contour_boxes

__all__ = [
    "DEFAULT_INTERVAL", "IOU_RULES", "LOCALIZATION_IOU", "MAXBOXACC_IOUS", "MODES", "MODE_DEFAULTS", "NORMALISATIONS",
    "PAPER_THRESHOLDS", "ComponentBoxes", "IouRule", "LocalizationCounter", "Mode", "Normalise",
    "mode_threshold_grid", "paper_threshold_grid", "relu_max_normalise",
    "all_component_boxes", "box_iou", "box_iou_inclusive", "box_to_input_frame", "center_crop_offsets",
    "choose_threshold", "largest_component_boxes", "minmax_normalise", "per_image_results", "resized_size",
    "score_maps", "threshold_grid", "upsample_maps", "wsol_all_contour_boxes", "wsol_largest_contour_boxes",
]
