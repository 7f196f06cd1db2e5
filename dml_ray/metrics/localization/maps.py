"""Score maps: raw maps upsampled to the input frame and normalised as each mode requires."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from dml_ray.metrics.localization.frames import _pair
from dml_ray.metrics.localization.modes import ArrayLike, Mode, Normalise, resolve_options


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


def relu_max_normalise(maps: ArrayLike) -> np.ndarray:
    """Per-map ``max(m, 0) / max(max(m, 0))`` into [0, 1]: what the activation-decomposition-tip2021
    authors' demo code does to every map ("Passing through ReLU", "scale 0 to 1.0"). Negative evidence
    becomes 0 instead of being stretched into weak positive evidence as min-max does. A map with no
    positive value becomes all zeros. Raises ValueError on NaN or infinite values."""
    arr = _as_maps(maps, None)
    if not np.isfinite(arr).all():
        raise ValueError("maps hold NaN or infinite values; cannot normalise")
    positive = np.maximum(arr, 0)
    peak = positive.max(axis=(1, 2), keepdims=True)
    return np.where(peak > 0, positive / np.where(peak > 0, peak, 1), 0).astype(arr.dtype)


def _constant(arr: np.ndarray) -> np.ndarray:
    """[N, 1, 1] True where a map holds one value: decided on the stored map, before upsampling, whose
    ~1e-15 ripples (a frame that is not a whole multiple of the map) would pass an exact test."""
    return arr.min(axis=(1, 2), keepdims=True) == arr.max(axis=(1, 2), keepdims=True)


def score_maps(maps: ArrayLike, size: int | Sequence[int] | None = None, mode: Mode = "paper",
               normalise: Normalise | None = None) -> np.ndarray:
    """The maps a mode thresholds, in [0, 1] in the input frame ``size`` (None: the maps are already there).

    A constant map (no localization evidence) becomes all zeros in every mode, decided on the stored map.
    ``"paper"`` (float32, non-finite -> ValueError): ``normalise="relu_max"`` (default) normalises at map
    resolution then upsamples bilinearly, as the TIP authors' code does (ReLU, / max, cv2.resize);
    ``"minmax"`` upsamples bilinearly then min-max normalises (DESIGN.md's original protocol).
    ``"wsol"`` (float64, as wsolevaluation handles np.float maps): bicubic upsampling, then min-max; a map
    holding NaN -> zeros (inference.py ``normalize_scoremap``)."""
    normalise, _ = resolve_options(mode, normalise)
    if mode == "paper":
        arr = _as_maps(maps, np.float32)
        if not np.isfinite(arr).all():
            raise ValueError("maps hold NaN or infinite values; cannot normalise")
        if normalise == "relu_max":
            scores = np.where(_constant(arr), 0, relu_max_normalise(arr)).astype(np.float32)
            return scores if size is None else upsample_maps(scores, size, "bilinear")
        constant = _constant(arr)
        scores = minmax_normalise(arr if size is None else upsample_maps(arr, size, "bilinear"))
        return np.where(constant, 0, scores).astype(np.float32)
    arr = _as_maps(maps, np.float64)
    arr = np.where(np.isnan(arr).any(axis=(1, 2), keepdims=True), 0.0, arr)
    constant = _constant(arr)
    if size is not None:
        arr = upsample_maps(arr, size, "bicubic")
    return np.where(constant, 0.0, minmax_normalise(arr))
