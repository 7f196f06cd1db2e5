"""What the names in the ``metrics`` table mean for display: which metrics count things (printed as integers)."""
from __future__ import annotations

import re
from typing import Optional, Union

# metrics whose value is a number of items or an epoch index (stored as float64 like every metric value)
COUNT_METRICS = frozenset({"n_queries", "n_images", "map_at_r_excluded_queries", "selected_epoch"})
_LEARNER_SUFFIX = re.compile(r"_scale\d+$")  # DeML's per-scale copies of a metric (pipelines/evaluate.py)


def is_count_metric(metric: str) -> bool:
    """Whether ``metric`` counts something: a name of ``COUNT_METRICS`` or starting ``n_``, also with a
    ``/<reference>/<method>`` qualifier (localize rows) or a ``_scale<i>`` suffix (DeML rows)."""
    base = _LEARNER_SUFFIX.sub("", metric.split("/", 1)[0])
    return base in COUNT_METRICS or base.startswith("n_")


def display_value(metric: str, value: Optional[float]) -> Union[int, float, None]:
    """``value`` as an int when ``metric`` is a count (and the value is finite), else unchanged."""
    if value is not None and is_count_metric(metric) and value == value and abs(value) != float("inf"):
        return int(round(value))
    return value
