"""Known-answer tests of dml_ray.metrics.localization (every expected value worked out by hand)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from torchvision import tv_tensors
from torchvision.transforms import v2

from dml_ray.metrics.localization import (
    PAPER_THRESHOLDS,
    LocalizationCounter,
    all_component_boxes,
    box_iou,
    box_iou_inclusive,
    box_to_input_frame,
    center_crop_offsets,
    choose_threshold,
    largest_component_boxes,
    minmax_normalise,
    mode_threshold_grid,
    per_image_results,
    resized_size,
    score_maps,
    threshold_grid,
    upsample_maps,
    wsol_all_contour_boxes,
    wsol_largest_contour_boxes,
)

# wsolevaluation's evaluation_test.py score maps (array[y][x]); their expected boxes came from cv2.
UNIMODAL = np.array([[0.0, 0.0, 0.0, 0.0, 0.0],
                     [0.0, 0.4, 0.4, 0.4, 0.6],
                     [0.0, 0.4, 1.0, 0.8, 0.6],
                     [0.0, 0.4, 0.4, 0.4, 0.6]])
MULTIMODAL = np.array([[0.4, 0.0, 0.2, 0.2, 0.2],
                       [0.4, 0.4, 0.0, 0.4, 0.0],
                       [0.0, 0.0, 0.0, 0.4, 0.0],
                       [1.0, 0.6, 0.8, 0.2, 0.2]])
STEP_02 = np.arange(0, 1, 0.2)  # 0, 0.2, 0.4, 0.6000000000000001, 0.8


def blank(h: int = 6, w: int = 6) -> np.ndarray:
    return np.zeros((h, w))


# ---------------------------------------------------------------- frames


def test_resize_and_crop_follow_torchvision() -> None:
    # Resize(256) of 400 x 300 (w x h): short side h -> 256, long side int(256 * 400 / 300) = int(341.33).
    assert resized_size([400, 300], 256).tolist() == [341, 256]
    assert resized_size([300, 400], 256).tolist() == [256, 341]
    assert resized_size([224, 224], (100, 50)).tolist() == [50, 100]
    out = v2.Resize(256, antialias=True)(torch.zeros(1, 300, 400))
    assert tuple(out.shape[1:]) == (256, 341)
    # CenterCrop(224): surplus 117 -> round(58.5) = 58 (half to even), 32 -> 16, 5 -> round(2.5) = 2;
    # a short side (201) is zero-padded by (224 - 201) // 2 = 11 first, i.e. offset -11.
    assert center_crop_offsets(np.array([341, 256]), 224).tolist() == [58, 16]
    assert center_crop_offsets(np.array([229, 229]), 224).tolist() == [2, 2]
    assert center_crop_offsets(np.array([201, 201]), 224).tolist() == [-11, -11]
    for w, h in [(341, 256), (229, 229), (201, 201)]:
        index = torch.arange(w, dtype=torch.float32).repeat(1, h, 1) + 1  # pixel value = x + 1
        cropped = v2.CenterCrop(224)(index)
        row = cropped[0, 112]
        first = int(row.nonzero()[0, 0])  # padded columns are 0
        left = int(center_crop_offsets(np.array([w, h]), 224)[0])
        assert row[first].item() - 1 == first + left  # crop column c shows resized column c + left


def test_box_to_input_frame_hand_values() -> None:
    # 400 x 300 -> resize 341 x 256 (x * 341 / 400, y * 256 / 300) -> crop at (58, 16), 224 x 224.
    boxes = np.array([[100.0, 50.0, 200.0, 100.0],  # inside
                      [0.0, 0.0, 60.0, 300.0],  # x in [0, 51.15] - 58 < 0: wholly left of the crop
                      [20.0, 250.0, 100.0, 50.0]])  # partly outside (left and bottom)
    out = box_to_input_frame(boxes, (400, 300), 256, 224)
    sx, sy = 341 / 400, 256 / 300
    expected = np.array([[100 * sx - 58, 50 * sy - 16, 300 * sx - 58, 150 * sy - 16],
                         [0.0, 0.0, 0.0, 224.0],
                         [0.0, 250 * sy - 16, 120 * sx - 58, 224.0]])
    np.testing.assert_allclose(out, expected)
    np.testing.assert_allclose(out[0], [27.25, 26.0 + 2 / 3, 197.75, 112.0])
    np.testing.assert_allclose(out[2], [0.0, 197.0 + 1 / 3, 44.3, 224.0])
    assert out[1, 2] - out[1, 0] == 0  # empty: it can never be matched
    # torchvision's own box kernels agree (no padding involved here).
    bb = tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float64), format="XYWH",
                                  canvas_size=(300, 400))
    pipeline = v2.Compose([v2.Resize(256), v2.CenterCrop(224), v2.ConvertBoundingBoxFormat("XYXY"),
                           v2.ClampBoundingBoxes()])
    np.testing.assert_allclose(out, pipeline(bb).numpy(), atol=1e-4)
    # Vectorised over images of different sizes; padding shifts boxes right/down by 11.
    sizes = np.array([[400, 300], [201, 201]])
    xywh = np.array([[100.0, 50.0, 200.0, 100.0], [10.0, 20.0, 30.0, 40.0]])
    two = box_to_input_frame(xywh, sizes, 201, 224)
    np.testing.assert_allclose(two[1], [21.0, 31.0, 51.0, 71.0])


# ---------------------------------------------------------------- maps


def test_upsample_and_normalise() -> None:
    # Bilinear, align_corners=False, 1 x 2 -> 1 x 4: source x = (i + 0.5) / 2 - 0.5, clamped.
    up = upsample_maps(np.array([[[0.0, 1.0]]], dtype=np.float32), (1, 4))
    np.testing.assert_allclose(up[0, 0], [0.0, 0.25, 0.75, 1.0])
    same = np.random.default_rng(0).random((2, 3, 5)).astype(np.float32)
    np.testing.assert_array_equal(upsample_maps(same, (3, 5)), same)
    norm = minmax_normalise(np.array([[[2.0, 4.0], [3.0, 6.0]], [[5.0, 5.0], [5.0, 5.0]]]))
    np.testing.assert_allclose(norm[0], [[0.0, 0.5], [0.25, 1.0]])
    np.testing.assert_array_equal(norm[1], np.zeros((2, 2)))  # constant map -> zeros
    with pytest.raises(ValueError, match="NaN"):
        minmax_normalise(np.full((1, 2, 2), np.nan))
    assert (score_maps(np.full((1, 2, 2), np.nan), mode="wsol") == 0).all()  # normalize_scoremap
    np.testing.assert_allclose(threshold_grid()[[0, 1, -1]], [0.0, 0.01, 0.99])
    assert threshold_grid().size == 100


# ---------------------------------------------------------------- boxes


def test_several_components_largest_chosen_and_any_component_succeeds() -> None:
    m = blank()
    m[0:3, 0:3] = 1.0  # 9 pixels
    m[4:6, 4:6] = 1.0  # 4 pixels, touching the bottom-right border
    assert largest_component_boxes(m[None], [0.5])[0, 0].tolist() == [0, 0, 3, 3]
    comps = all_component_boxes(m[None], [0.5])
    assert sorted(comps.boxes.tolist()) == [[0, 0, 3, 3], [4, 4, 6, 6]]
    gt = np.array([[4.0, 4.0, 6.0, 6.0]])  # the small blob
    counter = LocalizationCounter([0.5])
    counter.accumulate(m[None], gt)
    result = counter.compute()
    assert result["accuracy"].tolist() == [0.0]  # largest component: IoU 0
    assert result["maxboxacc_v2"] == 1.0  # any component: IoU 1 at 0.3, 0.5 and 0.7


def test_border_component_box() -> None:
    m = blank(4, 5)
    m[1:4, 3:5] = 1.0  # touches right and bottom edges
    assert largest_component_boxes(m[None], [0.5])[0, 0].tolist() == [3, 1, 5, 4]
    # wsol: boundingRect gives (3, 1, 3 + 2, 1 + 3) -> clipped to (W - 1, H - 1) = (4, 3).
    assert wsol_largest_contour_boxes(m[None], [0.5])[0, 0].tolist() == [3, 1, 4, 3]
    interior = blank(4, 5)
    interior[1:3, 1:3] = 1.0  # not touching: wsol's box runs one pixel past it
    assert wsol_largest_contour_boxes(interior[None], [0.5])[0, 0].tolist() == [1, 1, 3, 3]
    assert largest_component_boxes(interior[None], [0.5])[0, 0].tolist() == [1, 1, 3, 3]


def test_eight_connectivity_joins_diagonals() -> None:
    m = blank(4, 4)
    m[0, 0] = m[1, 1] = m[2, 2] = 1.0  # a diagonal line: one 8-connected component
    m[3, 0] = 1.0  # alone
    assert largest_component_boxes(m[None], [0.5])[0, 0].tolist() == [0, 0, 3, 3]
    assert len(all_component_boxes(m[None], [0.5]).boxes) == 2


def test_constant_map_documented_behaviour() -> None:
    constant = np.full((1, 6, 6), 3.0)
    scores = score_maps(constant)
    assert (scores == 0).all()
    gt = np.array([[0.0, 0.0, 4.0, 4.0]])
    boxes, ious, correct = per_image_results(constant, gt, [0.0, 0.5])
    assert boxes[0].tolist() == [[0, 0, 6, 6], [0, 0, 0, 0]]  # t = 0: mask = everything; above: empty
    np.testing.assert_allclose(ious[0], [16 / 36, 0.0])
    # wsol: u8 max 0 -> cut 0 -> mask u8 > 0 empty -> box (0, 0, 0, 0), one inclusive pixel, and the
    # ground truth (0, 0, 4, 4) covers 25 inclusive pixels including (0, 0): IoU 1 / 25.
    boxes, ious, _ = per_image_results(constant, gt, [0.0, 0.5], mode="wsol")
    assert boxes[0].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0]]
    np.testing.assert_allclose(ious[0], [1 / 25, 1 / 25])


def test_largest_component_boxes_match_naive_loop() -> None:
    rng = np.random.default_rng(7)
    maps = ndimage.gaussian_filter(rng.random((4, 13, 17)), (0, 1.0, 1.0))
    maps = minmax_normalise(maps)
    thresholds = np.linspace(0.0, 0.95, 20)
    fast = largest_component_boxes(maps, thresholds)
    comps = all_component_boxes(maps, thresholds)
    for n, m in enumerate(maps):
        for t, thr in enumerate(thresholds):
            labels, count = ndimage.label(m >= thr, structure=np.ones((3, 3)))
            naive_all = []
            for sl in ndimage.find_objects(labels):
                naive_all.append([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop])
            if count == 0:
                expected = [0, 0, 0, 0]
                naive_all = [expected]
            else:
                sizes = np.bincount(labels.ravel())[1:]
                expected = naive_all[int(np.argmax(sizes))]
            assert fast[n, t].tolist() == expected
            mine = comps.boxes[(comps.image_index == n) & (comps.threshold_index == t)]
            assert sorted(mine.tolist()) == sorted(naive_all)


# ---------------------------------------------------------------- wsolevaluation reproduction


def test_wsol_boxes_reproduce_wsolevaluation_tests() -> None:
    # UNIMODAL, u8 values 102 (0.4), 153 (0.6), 204 (0.8), 255; cut = int(t * 255) = 0, 51, 102, 153, 204
    # and mask = u8 > cut. E.g. t = 0.4: pixels > 102 are (x, y) = (4, 1), (2..4, 2), (4, 3): one
    # component x 2..4, y 1..3 -> (2, 1, min(5, 4), min(4, 3)) = (2, 1, 4, 3).
    unimodal = wsol_largest_contour_boxes(UNIMODAL[None], STEP_02)[0].tolist()
    assert unimodal == [[1, 1, 4, 3], [1, 1, 4, 3], [2, 1, 4, 3], [2, 2, 4, 3], [2, 2, 3, 3]]
    # MULTIMODAL at t = 0.2 (mask > 51): A = (0,0), (0,1), (1,1) [x, y], an L whose contour is a
    # triangle of area 0.5; B = (3,1), (3,2), (2,3), (1,3), (0,3), 5 pixels but a thin path of area 0.
    # cv2.contourArea prefers A: (0, 0, 2, 2). At t = 0.6 (mask > 153): two single pixels (0, 3) and
    # (2, 3), area 0 each; cv2 lists the later one first and max() keeps it: (2, 3, 3, 3).
    multimodal = wsol_largest_contour_boxes(MULTIMODAL[None], STEP_02)[0].tolist()
    assert multimodal == [[0, 0, 4, 3], [0, 0, 2, 2], [0, 3, 3, 3], [2, 3, 3, 3], [0, 3, 1, 3]]
    # The paper mode counts pixels instead: at t = 0.3 (the same mask) B (5 pixels) wins.
    assert largest_component_boxes(MULTIMODAL[None], [0.3])[0, 0].tolist() == [0, 1, 4, 4]
    # Degenerate all-zero map: no contour at any threshold.
    assert wsol_largest_contour_boxes(np.zeros((1, 3, 3)), STEP_02)[0].tolist() == [[0, 0, 0, 0]] * 5


def test_wsol_multi_contour_includes_holes() -> None:
    ring = blank(8, 8)
    ring[0:7, 0:7] = 1.0
    ring[2:5, 2:5] = 0.0  # a 3 x 3 hole, ring 2 pixels thick
    contours = wsol_all_contour_boxes(ring[None], [0.5])
    # Outer border: pixels 0..6 -> (0, 0, 7, 7). Hole border: the pixels 4-adjacent to the hole, 1..5
    # -> boundingRect (1, 1, 5, 5) -> (1, 1, 6, 6).
    assert sorted(contours.boxes.tolist()) == [[0, 0, 7, 7], [1, 1, 6, 6]]
    assert all_component_boxes(ring[None], [0.5]).boxes.tolist() == [[0, 0, 7, 7]]  # paper: components only
    # Ground truth (1, 1, 5.x, 5.x) -> wsol integers (1, 1, 5, 5), 25 inclusive pixels. Largest contour
    # (0, 0, 7, 7): 25 / 64; the hole's box (1, 1, 6, 6): 25 / 36.
    counter = LocalizationCounter([0.5], mode="wsol")
    counter.accumulate(ring[None], np.array([[1.0, 1.0, 5.5, 5.5]]))
    result = counter.compute()
    assert result["accuracy"].tolist() == [0.0]
    assert result["maxboxacc_v2_per_iou"] == {0.3: 1.0, 0.5: 1.0, 0.7: 0.0}
    _, ious, _ = per_image_results(ring[None], np.array([[1.0, 1.0, 5.5, 5.5]]), [0.5], mode="wsol")
    np.testing.assert_allclose(ious, [[25 / 64]])


def test_wsol_iou_on_multimodal() -> None:
    # Ground truth (0, 0, 2, 2) covers inclusive pixels 0..2 x 0..2 (9). Boxes from the test above:
    # (0,0,4,3): 9 / 20; (0,0,2,2): 1; (0,3,3,3): no overlap; (2,3,3,3): 0; (0,3,1,3): 0.
    gt = np.array([[0.0, 0.0, 2.0, 2.0]])
    _, ious, correct = per_image_results(MULTIMODAL[None], gt, STEP_02, mode="wsol")
    np.testing.assert_allclose(ious[0], [9 / 20, 1.0, 0.0, 0.0, 0.0])
    assert correct[0].tolist() == [False, True, False, False, False]


# ---------------------------------------------------------------- IoU


def test_iou_hand_values_both_conventions() -> None:
    a, b = np.array([0, 0, 2, 2]), np.array([1, 1, 3, 3])
    assert box_iou(a, b) == pytest.approx(1 / 7)  # overlap 1, areas 4 + 4
    assert box_iou_inclusive(a, b) == pytest.approx(4 / 14)  # overlap 2 x 2, areas 9 + 9
    # wsolevaluation's realistic case: overlap x 3..4, y 2..5 = 8; areas 25 + 10 - 8 = 27.
    assert box_iou_inclusive(np.array([1, 2, 5, 6]), np.array([3, 1, 4, 5])) == pytest.approx(8 / 27)
    assert box_iou(np.array([1, 2, 5, 6]), np.array([3, 1, 4, 5])) == pytest.approx(3 / 17)  # 1x3 / (16+4-3)
    zero = np.zeros(4)
    assert box_iou(zero, zero) == 0.0  # empty boxes never match
    assert box_iou_inclusive(zero, zero) == 1.0  # one pixel each in wsolevaluation's convention
    preds, gts = np.array([[0, 0, 2, 2], [0, 0, 1, 1]]), np.array([[0, 0, 2, 2], [5, 5, 6, 6]])
    pairwise = box_iou(preds[:, None], gts)
    np.testing.assert_allclose(pairwise, [[1.0, 0.0], [0.25, 0.0]])


# ---------------------------------------------------------------- counters


def three_maps() -> tuple[np.ndarray, np.ndarray]:
    """A: a 2 x 2 peak (1.0) in a 4 x 4 plateau (0.5); B: a 3 x 3 block (0.7) and a lone 1.0 pixel;
    C: constant."""
    a = blank()
    a[0:4, 0:4] = 0.5
    a[1:3, 1:3] = 1.0
    b = blank()
    b[0:3, 0:3] = 0.7
    b[5, 5] = 1.0
    c = np.full((6, 6), 2.0)
    gt = np.array([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 3.0, 3.0], [0.0, 0.0, 6.0, 6.0]])
    return np.stack([a, b, c]), gt


def test_accuracy_per_threshold_on_three_maps() -> None:
    maps, gt = three_maps()
    thresholds = [0.3, 0.6, 0.9]
    # A: t=0.3 plateau (0,0,4,4) IoU 1; t=0.6, 0.9 peak (1,1,3,3) IoU 4/16.
    # B: t=0.3, 0.6 block (9 px) beats the lone pixel, IoU 1; t=0.9 lone pixel (5,5,6,6), IoU 0.
    # C: zeros after normalisation, empty masks, IoU 0.
    boxes, ious, correct = per_image_results(maps, gt, thresholds)
    assert boxes[0].tolist() == [[0, 0, 4, 4], [1, 1, 3, 3], [1, 1, 3, 3]]
    assert boxes[1].tolist() == [[0, 0, 3, 3], [0, 0, 3, 3], [5, 5, 6, 6]]
    np.testing.assert_allclose(ious, [[1.0, 0.25, 0.25], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert correct.sum(axis=0).tolist() == [2, 1, 0]
    counter = LocalizationCounter(thresholds)
    counter.accumulate(maps, gt)
    result = counter.compute()
    np.testing.assert_allclose(result["accuracy"], [2 / 3, 1 / 3, 0.0])
    assert result["best_threshold"] == 0.3 and result["best_accuracy"] == pytest.approx(2 / 3)
    assert result["maxboxacc_v2"] == pytest.approx(2 / 3)
    assert result["top1_loc_error"] is None
    assert result["n_images"] == 3


def test_upsampling_inside_the_counter() -> None:
    # 2 x 2 [[1, 0], [0, 0]] -> 4 x 4 bilinear: outer([1, .75, .25, 0], [1, .75, .25, 0]); >= 0.5 keeps
    # rows and columns 0..1 (0.75 * 0.75 = 0.5625) -> box (0, 0, 2, 2).
    counter = LocalizationCounter([0.5], input_size=4)
    counter.accumulate(np.array([[[1.0, 0.0], [0.0, 0.0]]]), np.array([[0.0, 0.0, 2.0, 2.0]]))
    assert counter.correct_largest.tolist() == [[1], [1], [1]]


def test_merge_equals_one_counter() -> None:
    rng = np.random.default_rng(3)
    maps = ndimage.gaussian_filter(rng.random((6, 12, 12)), (0, 1.5, 1.5))
    x0 = rng.uniform(0, 6, (6, 2))
    gt = np.concatenate([x0, x0 + rng.uniform(2, 6, (6, 2))], axis=1)
    right = rng.random(6) < 0.5
    for mode in ("paper", "wsol"):
        whole = LocalizationCounter(mode=mode)
        whole.accumulate(maps, gt, right)
        first, second = LocalizationCounter(mode=mode), LocalizationCounter(mode=mode)
        first.accumulate(maps[:2], gt[:2], right[:2])
        second.accumulate(maps[2:], gt[2:], right[2:])
        merged = first.merge(second)
        for name in ("correct_largest", "correct_any", "correct_class_and_box"):
            np.testing.assert_array_equal(getattr(merged, name), getattr(whole, name))
        assert merged.n_images == whole.n_images == 6 and merged.n_with_class == 6
        assert first.n_images == 2  # merge leaves its inputs alone
        assert merged.compute()["maxboxacc_v2"] == whole.compute()["maxboxacc_v2"]
    with pytest.raises(ValueError, match="cannot merge"):
        LocalizationCounter(mode="paper").merge(LocalizationCounter(mode="wsol"))


def test_distcam_top1_error_with_wrong_class() -> None:
    maps, gt = three_maps()
    counter = LocalizationCounter([0.3, 0.6, 0.9])
    # At t = 0.3 boxes are right for A and B; B's nearest prototype is the wrong class, so only A
    # counts: error 1 - 1/3. At 0.6 only B's box is right (wrong class): error 1. At 0.9: error 1.
    counter.accumulate(maps, gt, correct_class_mask=np.array([True, False, True]))
    result = counter.compute()
    assert result["top1_loc_error"] == pytest.approx(2 / 3)
    np.testing.assert_allclose(result["top1_loc_error_per_threshold"], [2 / 3, 1.0, 1.0])
    assert result["accuracy_at_threshold"] == pytest.approx(2 / 3)  # ground-truth-known accuracy
    counter.accumulate(maps, gt)  # a batch without class verdicts makes the error undefined
    with pytest.raises(ValueError, match="correct_class_mask"):
        counter.compute()


def test_threshold_chosen_on_held_out_images() -> None:
    maps, gt = three_maps()
    thresholds = [0.3, 0.6, 0.9]
    holdout = LocalizationCounter(thresholds)
    holdout.accumulate(maps[1:2], gt[1:2])  # B alone: right at 0.3 and 0.6, first on ties -> 0.3
    assert choose_threshold(holdout) == 0.3
    rest = LocalizationCounter(thresholds)
    rest.accumulate(maps[[0, 2]], gt[[0, 2]])  # A and C
    at_06 = rest.compute(threshold=0.6)
    assert at_06["threshold"] == 0.6 and at_06["accuracy_at_threshold"] == 0.0
    assert rest.compute(threshold=choose_threshold(holdout))["accuracy_at_threshold"] == 0.5
    with pytest.raises(ValueError, match="not on the counter's grid"):
        rest.compute(threshold=0.55)


def test_invalid_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="expected one of: paper, wsol"):
        LocalizationCounter(mode="cv2")
    with pytest.raises(ValueError, match="must contain 0.5"):
        LocalizationCounter(iou_thresholds=(0.3, 0.7))
    counter = LocalizationCounter([0.5])
    with pytest.raises(ValueError, match="gt_boxes must be"):
        counter.accumulate(np.zeros((2, 4, 4)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="x1 >= x0"):
        counter.accumulate(np.zeros((1, 4, 4)), np.array([[3.0, 0.0, 1.0, 2.0]]))
    with pytest.raises(ValueError, match="no images"):
        counter.compute()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        wsol_largest_contour_boxes(np.full((1, 2, 2), 2.0), [0.5])


def test_multiple_and_padded_ground_truth_boxes() -> None:
    m = blank()
    m[4:6, 4:6] = 1.0
    # Best over the image's boxes; a NaN row pads and an empty box (outside the crop) never matches.
    gt = np.array([[[0.0, 0.0, 1.0, 1.0], [4.0, 4.0, 6.0, 6.0], [np.nan] * 4],
                   [[2.0, 2.0, 2.0, 5.0], [np.nan] * 4, [np.nan] * 4]])
    _, ious, _ = per_image_results(np.stack([m, m]), gt, [0.5])
    np.testing.assert_allclose(ious, [[1.0], [0.0]])


# ---------------------------------------------------------------- fidelity (issue 14) and the one-pass sweep (issue 16)


def test_constant_map_is_decided_before_upsampling() -> None:
    # A constant 7 x 7 map upsampled to 20 x 20 (not a whole multiple) carries float ripples (~6e-8 bilinear
    # in float32, ~1e-15 bicubic in float64) that an exact span == 0 test misses and would stretch to
    # [0, 1]; wsolevaluation sees cv2's exact constant and gives zeros. Both modes must give zeros.
    constant = np.full((1, 7, 7), 0.3)
    for mode in ("paper", "wsol"):
        assert (score_maps(constant, 20, mode) == 0).all(), mode
    gt = np.array([[0.0, 0.0, 10.0, 10.0]])
    boxes, _, _ = per_image_results(constant, gt, [0.5], input_size=20)
    assert boxes[0, 0].tolist() == [0, 0, 0, 0]  # no evidence: empty mask above t = 0
    boxes, _, _ = per_image_results(constant, gt, [0.5], input_size=20, mode="wsol")
    assert boxes[0, 0].tolist() == [0, 0, 0, 0]


def test_paper_mode_counts_iou_greater_than_half() -> None:
    # Box (0, 0, 2, 4) (8 px) against ground truth (0, 0, 4, 4) (16 px): IoU exactly 0.5. TIP Sec. VI-A:
    # correct when IoU is *greater than* 0.5, so not correct; wsolevaluation (>=) and the option count it.
    m = blank()
    m[0:4, 0:2] = 1.0
    gt = np.array([[0.0, 0.0, 4.0, 4.0]])
    _, ious, correct = per_image_results(m[None], gt, [0.5])
    assert ious[0, 0] == 0.5 and not correct[0, 0]
    assert per_image_results(m[None], gt, [0.5], iou_rule="at_least")[2][0, 0]
    counter = LocalizationCounter([0.5])
    counter.accumulate(m[None], gt, correct_class_mask=np.array([True]))
    result = counter.compute()
    assert result["accuracy"].tolist() == [0.0]
    assert result["maxboxacc_v2_per_iou"][0.5] == 1.0  # MaxBoxAccV2 keeps Choe et al.'s >=
    assert result["top1_loc_error"] == 0.0  # dist-cam: wrong only when IoU is lower than 0.5
    with pytest.raises(ValueError, match="wsolevaluation"):
        LocalizationCounter([0.5], mode="wsol", iou_rule="greater")


def test_paper_mode_normalises_by_relu_then_max() -> None:
    # 1 x 4 map [-1, 0, 0.2, 1]. The authors: ReLU then / max -> [0, 0, 0.2, 1]; at t = 0.5 only x = 3.
    # Min-max -> [0, 0.5, 0.6, 1]: negative evidence lifts x = 1..2 over the threshold.
    m = np.array([[[-1.0, 0.0, 0.2, 1.0]]])
    np.testing.assert_allclose(score_maps(m)[0, 0], [0.0, 0.0, 0.2, 1.0])
    np.testing.assert_allclose(score_maps(m, normalise="minmax")[0, 0], [0.0, 0.5, 0.6, 1.0])
    gt = np.array([[3.0, 0.0, 4.0, 1.0]])
    boxes, ious, _ = per_image_results(m, gt, [0.5])
    assert boxes[0, 0].tolist() == [3, 0, 4, 1] and ious[0, 0] == 1.0
    assert per_image_results(m, gt, [0.5], normalise="minmax")[0][0, 0].tolist() == [1, 0, 4, 1]
    # The authors normalise at map resolution, then upsample: 1 x 2 [-1, 1] -> [0, 1] -> 1 x 4 bilinear.
    np.testing.assert_allclose(score_maps(np.array([[[-1.0, 1.0]]]), (1, 4))[0, 0], [0.0, 0.25, 0.75, 1.0])
    assert (score_maps(np.array([[[-2.0, -1.0]]])) == 0).all()  # no positive evidence at all


def test_mode_grids() -> None:
    # wsolevaluation's cam_curve_interval default is 0.001; the paper grid always holds Table I's thresholds.
    assert LocalizationCounter(mode="wsol").thresholds.size == 1000
    np.testing.assert_array_equal(LocalizationCounter().thresholds, threshold_grid(0.01))
    coarse = mode_threshold_grid("paper", 0.02)
    assert coarse.size == 51 and np.isclose(coarse, 0.15).sum() == 1 and (np.diff(coarse) > 0).all()
    assert all(np.isclose(coarse, t).any() for t in PAPER_THRESHOLDS)
    assert mode_threshold_grid("wsol", 0.02).size == 50  # wsol: the grid as wsolevaluation builds it
    assert LocalizationCounter(coarse).threshold_index(0.15) == 8


def test_pipeline_grid_and_threshold_column() -> None:
    from dml_ray.config import LocalizeConfig
    from dml_ray.io.schemas import METRICS_SCHEMA
    from pipelines.localize import _counters, metrics_rows

    holdout, rest = _counters(LocalizeConfig(threshold_interval=0.02), 6)
    assert np.isclose(holdout.thresholds, 0.15).any()
    assert _counters(LocalizeConfig(mode="wsol"), 6)[0].thresholds.size == 1000
    assert METRICS_SCHEMA.field("threshold").nullable
    # A 0.005 grid: 200 thresholds, which threshold x 100 in ``k`` collapsed into 101 values.
    grid = threshold_grid(0.005)
    maps, gt = three_maps()
    counters = []
    for part in (slice(0, 1), slice(1, 3)):
        counter = LocalizationCounter(grid)
        counter.accumulate(maps[part], gt[part])
        counters.append(counter)
    rows = metrics_rows({("test", "neighbor", "decomposition"): tuple(counters)}, "r").to_pylist()
    curve = [r for r in rows if r["metric"].startswith("loc_acc/")]
    assert len(curve) == 200 and len({r["threshold"] for r in curve}) == 200
    np.testing.assert_allclose(sorted(r["threshold"] for r in curve), grid)
    assert all(r["k"] is None for r in curve)
    assert all(r["threshold"] is None for r in rows if not r["metric"].startswith("loc_acc/"))


def test_metrics_views_with_and_without_the_threshold_column(tmp_path) -> None:
    import pyarrow as pa

    from dml_ray.io.query import connect
    from dml_ray.io.tables import read_table, staging_uri, table_uri, write_table

    root = str(tmp_path)
    old = pa.table({"run_id": ["r"], "stage": ["evaluate"], "split": ["test"], "metric": ["recall"],
                    "k": pa.array([1], pa.int32()), "value": [0.5]})  # a part written before the column
    write_table(old, table_uri(root, "r", "metrics", "evaluate"), staging_uri(root, "r", "metrics", "evaluate"))
    from pipelines.localize import metrics_rows

    maps, gt = three_maps()
    pair = LocalizationCounter([0.3, 0.35]), LocalizationCounter([0.3, 0.35])
    pair[0].accumulate(maps[:1], gt[:1])
    pair[1].accumulate(maps[1:], gt[1:])
    new = metrics_rows({("test", "neighbor", "decomposition"): pair}, "r")
    write_table(new, table_uri(root, "r", "metrics", "localize"), staging_uri(root, "r", "metrics", "localize"))
    con, _ = connect(root, "r")
    thresholds = con.sql("SELECT threshold FROM metrics WHERE metric LIKE 'loc_acc/%' ORDER BY threshold").fetchall()
    np.testing.assert_allclose([t for (t,) in thresholds], [0.3, 0.35])
    assert con.sql("SELECT threshold FROM metrics WHERE metric = 'recall'").fetchall() == [(None,)]
    table = read_table(table_uri(root, "r", "metrics"))
    assert table.num_rows == 1 + new.num_rows and table.column("threshold").null_count == table.num_rows - 2


def test_wsol_frame_is_resize_without_crop() -> None:
    # wsolevaluation evaluates on Resize((224, 224)) with no crop; mode wsol takes that frame by default.
    from dml_ray.config import DataConfig, RunConfig
    from dml_ray.data.transforms import display_view
    from PIL import Image

    cfg = RunConfig(localize={"mode": "wsol"}, data={"resize": 256, "image_size": 224})
    assert cfg.data.frame == "resize" and cfg.data.input_resize() == (224, 224)
    assert RunConfig().data.frame == "resize_crop" and RunConfig().data.input_resize() == 256
    # A 400 x 300 image: x scales by 224 / 400, y by 224 / 300, nothing cropped.
    box = box_to_input_frame([100.0, 50.0, 200.0, 100.0], (400, 300), cfg.data.input_resize(), cfg.data.image_size)
    np.testing.assert_allclose(box, [56.0, 50 * 224 / 300, 168.0, 150 * 224 / 300])
    pixels = np.zeros((300, 400, 3), dtype=np.uint8)
    pixels[:, :4] = 255  # a stripe at the left edge survives (a centre crop of the resize frame would cut it)
    view = display_view(Image.fromarray(pixels), cfg.data.input_resize(), cfg.data.image_size).numpy()
    assert view.shape == (224, 224, 3) and view[112, 0, 0] > 200
    assert DataConfig(frame="resize", resize=256, image_size=64).input_resize() == (64, 64)


def _naive_largest_and_all(m: np.ndarray, thresholds: np.ndarray) -> tuple[list, list]:
    largest, every = [], []
    for thr in thresholds:
        labels, count = ndimage.label(m >= thr, structure=np.ones((3, 3)))
        boxes = [[sl[1].start, sl[0].start, sl[1].stop, sl[0].stop] for sl in ndimage.find_objects(labels)]
        if count == 0:
            largest.append([0, 0, 0, 0])
            every.append([[0, 0, 0, 0]])
            continue
        largest.append(boxes[int(np.argmax(np.bincount(labels.ravel())[1:]))])
        every.append(sorted(boxes))
    return largest, every


def test_one_pass_sweep_equals_per_threshold_labelling() -> None:
    rng = np.random.default_rng(11)
    plateau = np.zeros((12, 15))
    plateau[2:6, 2:6] = 0.5
    plateau[7:11, 8:12] = 0.5  # two equal plateaus: a size tie, the first in raster order wins
    plateau[3, 3] = 1.0
    ties = np.zeros((9, 9))
    ties[0:3, 6:9] = 1.0  # 9 px, first in raster order
    ties[6:9, 0:3] = 1.0  # 9 px, later
    ties[4, 4] = 0.7  # a lone pixel two steps from both blocks: a third component, never joined
    blobs = np.zeros((16, 16))
    for y, x, r in ((3, 3, 2), (3, 12, 3), (12, 5, 2), (11, 12, 1)):
        yy, xx = np.mgrid[0:16, 0:16]
        blobs = np.maximum(blobs, np.clip(1 - np.hypot(yy - y, xx - x) / (r + 1), 0, None))
    maps = [rng.random((10, 11)), np.round(rng.random((13, 9)) * 4) / 4, plateau, ties, blobs,
            ndimage.gaussian_filter(rng.random((17, 19)), 1.0), np.zeros((5, 5))]
    thresholds = np.concatenate([np.linspace(0, 1, 21), [0.5, 0.15, 1.2]])  # unsorted, duplicate, above max
    for m in maps:
        m = m.astype(np.float32)
        expected_largest, expected_all = _naive_largest_and_all(m, thresholds)
        assert largest_component_boxes(m[None], thresholds)[0].tolist() == expected_largest
        comps = all_component_boxes(m[None], thresholds)
        for t in range(thresholds.size):
            assert sorted(comps.boxes[comps.threshold_index == t].tolist()) == expected_all[t]


def _wsol_largest_per_threshold(score: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """wsolevaluation's scoremap2bbox, one threshold at a time with OpenCV (largest contour only)."""
    import cv2

    u8 = (score * 255).astype(np.uint8)
    out = []
    for t in thresholds:
        _, mask = cv2.threshold(u8, int(t * np.max(u8)), 255, cv2.THRESH_BINARY)
        contours = cv2.findContours(mask, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
        if not contours:
            out.append([0, 0, 0, 0])
            continue
        x, y, w, h = cv2.boundingRect(max(contours, key=cv2.contourArea))
        out.append([x, y, min(x + w, score.shape[1] - 1), min(y + h, score.shape[0] - 1)])
    return np.array(out)


def test_opencv_and_emulated_contours_agree() -> None:
    from dml_ray.metrics.localization.wsol import _wsol_image_boxes, cv2

    if cv2 is None:
        pytest.fail("opencv-python-headless is a dependency; install it")
    rng = np.random.default_rng(5)
    grid = np.arange(0, 1, 0.05)
    for i in range(60):
        h, w = rng.integers(3, 24, 2)
        m = [rng.random((h, w)), ndimage.gaussian_filter(rng.random((h, w)), 1.5),
             np.round(rng.random((h, w)) * 3) / 3][i % 3]
        m = minmax_normalise(m[None])[0]
        opencv, emulated = _wsol_image_boxes(m, grid, use_opencv=True), _wsol_image_boxes(m, grid, use_opencv=False)
        np.testing.assert_array_equal(opencv[0], emulated[0])
        fine = mode_threshold_grid("wsol")  # 1,000 thresholds, each cut once only where the mask changes
        np.testing.assert_array_equal(_wsol_image_boxes(m, fine)[0], _wsol_largest_per_threshold(m, fine))
        for t in range(grid.size):
            assert sorted(opencv[1][opencv[2] == t].tolist()) == sorted(emulated[1][emulated[2] == t].tolist())
    for case in (UNIMODAL, MULTIMODAL):
        for use_opencv in (True, False):
            np.testing.assert_array_equal(_wsol_image_boxes(case, STEP_02, use_opencv)[0],
                                          wsol_largest_contour_boxes(case[None], STEP_02)[0])


def test_centre_baseline_keeps_its_peak_under_relu_max() -> None:
    # The centred-box baseline was -distance^2 (all <= 0): ReLU-then-max made it all zeros, i.e. the whole
    # frame at t = 0 and nothing above. It must stay a centred peak under both normalisations.
    from pipelines.localize import baseline_maps

    maps = baseline_maps(["a", "b"], (7, 7), seed=0)
    for normalise in ("relu_max", "minmax"):
        centre = score_maps(maps["baseline_center"], normalise=normalise)
        assert centre[0, 3, 3] == 1.0 and centre[0, 0, 0] == 0.0, normalise
        assert largest_component_boxes(centre, [0.75])[0, 0].tolist() == [1, 1, 6, 6]  # distance^2 <= 4.5
        random = score_maps(maps["baseline_random"], normalise=normalise)
        assert random.max() == 1.0 and random.min() >= 0.0
