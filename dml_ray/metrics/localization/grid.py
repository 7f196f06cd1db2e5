"""Map-threshold grids: the thresholds every map is cut at, and each mode's default grid."""
from __future__ import annotations

import numpy as np

from dml_ray.metrics.localization.modes import Thresholds, _check_mode

# activation-decomposition-tip2021 Table I: the thresholds the paper reports (0.15 is Grad-CAM's best).
PAPER_THRESHOLDS: tuple[float, ...] = (0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
# Default grid steps: the paper mode's np.arange(0, 1, 0.01) (holds every paper threshold); wsolevaluation's
# cam_curve_interval default (config.py, inference.py CAMComputer) is 0.001.
DEFAULT_INTERVAL: dict[str, float] = {"paper": 0.01, "wsol": 0.001}


def threshold_grid(interval: float = 0.01) -> np.ndarray:
    """Map thresholds ``np.arange(0, 1, interval)``: wsolevaluation's grid for ``cam_curve_interval``
    (0.001 by default; 0.01 in its evaluation.py command line and tests) and the grid search of
    activation-decomposition-tip2021 Sec. VI-A."""
    if not 0 < interval < 1:
        raise ValueError(f"threshold interval must be in (0, 1); got {interval}")
    return np.arange(0, 1, interval)


def paper_threshold_grid(interval: float = DEFAULT_INTERVAL["paper"]) -> np.ndarray:
    """``threshold_grid(interval)`` with the paper's Table I thresholds added where the grid misses them
    (a threshold within 1e-9 of a grid point counts as present), sorted: the best threshold of a coarse
    grid is then never worse than the paper's own grid search."""
    grid = threshold_grid(interval)
    missing = [t for t in PAPER_THRESHOLDS if not np.isclose(grid, t, rtol=0, atol=1e-9).any()]
    return np.sort(np.concatenate([grid, missing]))


def mode_threshold_grid(mode: str, interval: float | None = None) -> np.ndarray:
    """The default grid of ``mode``: "paper" -> ``paper_threshold_grid(interval or 0.01)``; "wsol" ->
    ``threshold_grid(interval or 0.001)`` (wsolevaluation's grid, nothing added)."""
    _check_mode(mode)
    step = DEFAULT_INTERVAL[mode] if interval is None else interval
    return paper_threshold_grid(step) if mode == "paper" else threshold_grid(step)


def _check_thresholds(thresholds: Thresholds, mode: str = "paper") -> np.ndarray:
    grid = mode_threshold_grid(mode) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0 or not np.isfinite(grid).all():
        raise ValueError(f"thresholds must be a non-empty 1-D finite array; got shape {grid.shape}")
    return grid
