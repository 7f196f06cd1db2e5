"""Evaluation modes, their defaults, and the IoU criteria shared by every part of the localization protocol."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

Mode = Literal["paper", "wsol"]
MODES: tuple[str, ...] = ("paper", "wsol")
# How a raw map becomes a score map in [0, 1]: "relu_max" = max(m, 0) / max(max(m, 0)) (the TIP authors'
# demo code), "minmax" = (m - min) / (max - min) (wsolevaluation normalize_scoremap, DESIGN.md before).
Normalise = Literal["relu_max", "minmax"]
NORMALISATIONS: tuple[str, ...] = ("relu_max", "minmax")
# When an IoU counts as correct at criterion d: "greater" IoU > d (activation-decomposition-tip2021 Sec.
# VI-A: "greater than 0.5"), "at_least" IoU >= d (wsolevaluation BoxEvaluator.accumulate).
IouRule = Literal["greater", "at_least"]
IOU_RULES: tuple[str, ...] = ("greater", "at_least")
# Each mode's defaults; mode "wsol" takes no other (it reproduces wsolevaluation exactly).
MODE_DEFAULTS: dict[str, dict[str, str]] = {
    "paper": {"normalise": "relu_max", "iou_rule": "greater"},
    "wsol": {"normalise": "minmax", "iou_rule": "at_least"},
}
# activation-decomposition-tip2021 Sec. VI-A (Tables I, II, IV); dist-cam Sec. 3 (Table 1).
LOCALIZATION_IOU = 0.5
# MaxBoxAccV2 (Choe et al. CVPR 2020): mean over these IoU thresholds, always IoU >= d (its definition).
MAXBOXACC_IOUS: tuple[float, ...] = (0.3, 0.5, 0.7)

ArrayLike = np.ndarray | torch.Tensor
Thresholds = ArrayLike | Sequence[float] | None


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"localization mode {mode!r} is unknown; expected one of: {', '.join(MODES)}")


def resolve_options(mode: str, normalise: str | None = None, iou_rule: str | None = None) -> tuple[str, str]:
    """(normalise, iou_rule) for ``mode``: None takes the mode's default (``MODE_DEFAULTS``); mode "wsol"
    accepts only its own (minmax, at_least), so it stays wsolevaluation's protocol."""
    _check_mode(mode)
    defaults = MODE_DEFAULTS[mode]
    chosen = {"normalise": normalise or defaults["normalise"], "iou_rule": iou_rule or defaults["iou_rule"]}
    for name, allowed in (("normalise", NORMALISATIONS), ("iou_rule", IOU_RULES)):
        if chosen[name] not in allowed:
            raise ValueError(f"localization {name} {chosen[name]!r} is unknown; expected one of: {', '.join(allowed)}")
        if mode == "wsol" and chosen[name] != defaults[name]:
            raise ValueError(f"localization mode 'wsol' reproduces wsolevaluation and takes {name}="
                             f"{defaults[name]!r} only; got {chosen[name]!r} (use mode 'paper' to change it)")
    return chosen["normalise"], chosen["iou_rule"]


def passes(iou: np.ndarray, criterion: float | np.ndarray, rule: str) -> np.ndarray:
    """``iou > criterion`` for rule "greater", ``iou >= criterion`` for "at_least"."""
    return iou > criterion if rule == "greater" else iou >= criterion
