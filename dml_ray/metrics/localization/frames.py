"""The model input frame: where resize and centre crop put the ground-truth boxes."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dml_ray.metrics.localization.modes import ArrayLike


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
