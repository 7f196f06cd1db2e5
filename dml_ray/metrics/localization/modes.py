"""Evaluation modes and the IoU criteria shared by every part of the localization protocol."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

Mode = Literal["paper", "wsol"]
MODES: tuple[str, ...] = ("paper", "wsol")
# activation-decomposition-tip2021 Sec. VI-A (Tables I, II, IV); dist-cam Sec. 3 (Table 1).
LOCALIZATION_IOU = 0.5
# MaxBoxAccV2 (Choe et al. CVPR 2020): mean over these IoU thresholds.
MAXBOXACC_IOUS: tuple[float, ...] = (0.3, 0.5, 0.7)

ArrayLike = np.ndarray | torch.Tensor
Thresholds = ArrayLike | Sequence[float] | None


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"localization mode {mode!r} is unknown; expected one of: {', '.join(MODES)}")
