"""Map-threshold grids: the thresholds every map is cut at."""
from __future__ import annotations

import numpy as np

from dml_ray.metrics.localization.modes import Thresholds


def threshold_grid(interval: float = 0.01) -> np.ndarray:
    """Map thresholds ``np.arange(0, 1, interval)``: wsolevaluation's grid for ``cam_curve_interval``
    (0.01 in its evaluation.py command line and tests) and the grid search of
    activation-decomposition-tip2021 Sec. VI-A."""
    if not 0 < interval < 1:
        raise ValueError(f"threshold interval must be in (0, 1); got {interval}")
    return np.arange(0, 1, interval)


def _check_thresholds(thresholds: Thresholds) -> np.ndarray:
    grid = threshold_grid() if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0 or not np.isfinite(grid).all():
        raise ValueError(f"thresholds must be a non-empty 1-D finite array; got shape {grid.shape}")
    return grid
