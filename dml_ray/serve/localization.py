"""The explorer's localization view: a run's ``localization`` rows (pipelines/localize.py) for one method, reference
kind and threshold, each with the ground-truth box it was scored against, best or worst IoU first.

Nothing is computed here: predicted boxes, IoU and correctness are the table's; the ground-truth box is the images
table's ``bbox`` carried into the model-input frame exactly as the localize stage carries it
(``metrics.localization.box_to_input_frame`` with the run's ``data`` config); the default threshold is the
``metrics`` table's ``loc_best_threshold``. Boxes are (x0, y0, x1, y1) in model-input pixels.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, Optional

import numpy as np
import pyarrow.compute as pc

from dml_ray.config import DataConfig
from dml_ray.io.run import Run
from dml_ray.metrics.localization import box_to_input_frame

log = logging.getLogger(__name__)

Order = Literal["best", "worst"]


@dataclass(frozen=True)
class LocalizationGroup:
    """The rows of one (method, reference kind), sorted by (threshold, IoU descending, image id)."""

    image_ids: list[str]
    thresholds: np.ndarray  # float32, per row
    boxes: np.ndarray  # N x 4 float32
    ious: np.ndarray  # float32
    correct: np.ndarray  # bool


def run_frame(run: Run, fallback: Optional[DataConfig] = None) -> DataConfig:
    """The run's ``data`` config (input frame: resize, crop), with the frame its localize mode implies when unset
    (as ``RunConfig`` fills it); ``fallback`` (else the defaults) for a run whose manifest has no config."""
    config = run.manifest.get("config") or {}
    if "data" not in config and fallback is not None:
        return fallback
    data = DataConfig.model_validate(config.get("data") or {})
    if data.frame is None:
        mode = (config.get("localize") or {}).get("mode", "paper")
        data = data.model_copy(update={"frame": "resize" if mode == "wsol" else "resize_crop"})
    return data


class LocalizationView:
    """Read-only access to a run's localization results for the explorer (groups read on demand, a few cached)."""

    def __init__(self, run: Run, cached_groups: int = 4, fallback: Optional[DataConfig] = None) -> None:
        self.run = run
        self.data = run_frame(run, fallback)
        self._group = lru_cache(maxsize=cached_groups)(self._read_group)
        self._gt: Optional[dict[str, np.ndarray]] = None
        self._options: Optional[list[dict[str, Any]]] = None

    @property
    def available(self) -> bool:
        return self.run.committed("localization")

    def _require(self) -> None:
        if not self.available:
            raise KeyError("the run has no localization table (stage localize)")

    def options(self) -> list[dict[str, Any]]:
        """Every (method, reference kind) of the table, with its best threshold from ``metrics`` (None without)."""
        self._require()
        if self._options is None:
            metrics = self._localize_metrics()
            best = {(m, k): value for (name, m, k), value in metrics.items() if name == "loc_best_threshold"}
            pairs = {(m, k) for (name, m, k) in metrics if name == "n_images"}
            if not pairs:  # no localize metrics: the distinct pairs of the table itself
                t = self.run.read("localization", columns=["method", "reference_kind"])
                joined = pc.unique(pc.binary_join_element_wise(t.column("method"), t.column("reference_kind"), "\0"))
                pairs = {tuple(v.split("\0")) for v in joined.to_pylist()}
            self._options = [{"method": m, "reference_kind": k, "best_threshold": best.get((m, k))}
                             for m, k in sorted(pairs)]
        return self._options

    def _localize_metrics(self) -> dict[tuple[str, str, str], float]:
        """(metric, method, reference kind) -> value of the metrics table's localize rows (the test split's when
        there are several), e.g. ``loc_best_threshold``."""
        if not self.run.committed("metrics", "localize"):
            return {}
        m = self.run.read("metrics", "localize", columns=["split", "metric", "value", "threshold"])
        m = m.filter(pc.is_null(m.column("threshold")))
        out: dict[tuple[str, str, str], float] = {}
        for row in sorted(m.to_pylist(), key=lambda r: r["split"] != "test"):
            name, kind, method = row["metric"].split("/", 2)
            out.setdefault((name, method, kind), float(row["value"]))
        return out

    def _read_group(self, method: str, reference_kind: str) -> LocalizationGroup:
        t = self.run.read("localization", columns=["image_id", "threshold", "box", "iou", "correct"],
                          filter=(pc.field("method") == method) & (pc.field("reference_kind") == reference_kind))
        if t.num_rows == 0:
            raise KeyError(f"no localization rows for method {method!r}, reference kind {reference_kind!r}")
        ids = np.asarray(t.column("image_id").to_pylist(), dtype=object)
        thresholds = t.column("threshold").to_numpy().astype(np.float32)
        ious = t.column("iou").to_numpy().astype(np.float32)
        order = np.lexsort((ids, -ious, thresholds))
        boxes = t.column("box").combine_chunks().flatten().to_numpy().reshape(-1, 4)
        return LocalizationGroup(ids[order].tolist(), thresholds[order], boxes[order], ious[order],
                                 t.column("correct").to_numpy(zero_copy_only=False)[order])

    def ground_truth(self, image_id: str) -> Optional[list[float]]:
        """The image's ground-truth box in the model-input frame (the localize stage's), None without one."""
        if self._gt is None:
            images = self.run.read("images", columns=["image_id", "bbox", "width", "height"])
            images = images.filter(pc.and_(pc.is_valid(images.column("bbox")), pc.is_valid(images.column("width"))))
            box = images.column("bbox").combine_chunks()
            xywh = np.stack([box.field(n).to_numpy(zero_copy_only=False) for n in ("x", "y", "w", "h")], axis=1)
            wh = np.stack([images.column("width").to_numpy(), images.column("height").to_numpy()], axis=1)
            frame = box_to_input_frame(xywh, wh, self.data.input_resize(), self.data.image_size) if len(wh) else []
            self._gt = dict(zip(images.column("image_id").to_pylist(), frame))
        box = self._gt.get(image_id)
        return None if box is None else [float(v) for v in box]

    def rows(self, method: str, reference_kind: str, threshold: Optional[float] = None, order: Order = "worst",
             offset: int = 0, limit: int = 24) -> dict[str, Any]:
        """One page of the rows at ``threshold`` (default: the best threshold of ``metrics``, else the middle of
        the grid), ``order`` "best" (IoU descending) or "worst" (ascending), ties by image id."""
        self._require()
        if order not in ("best", "worst"):
            raise ValueError(f"order: expected best or worst, got {order!r}")
        group = self._group(method, reference_kind)
        grid = np.unique(group.thresholds)
        if threshold is None:
            best = {(o["method"], o["reference_kind"]): o["best_threshold"] for o in self.options()}
            default = best.get((method, reference_kind))
            t = np.float32(grid[len(grid) // 2] if default is None else default)
        else:
            t = np.float32(threshold)
        lo, hi = np.searchsorted(group.thresholds, t, "left"), np.searchsorted(group.thresholds, t, "right")
        if lo == hi:
            raise ValueError(f"threshold {threshold}: not on the table's grid for {reference_kind}/{method}")
        page: list[int] = list(range(lo, hi))  # IoU descending, ties by image id
        if order == "worst":
            page.sort(key=lambda i: (float(group.ious[i]), group.image_ids[i]))
        page = page[offset:offset + limit]
        return {"method": method, "reference_kind": reference_kind, "threshold": float(t),
                "thresholds": [float(v) for v in grid], "order": order, "total": int(hi - lo), "offset": offset,
                "frame": [self.data.image_size, self.data.image_size],
                "rows": [{"image_id": group.image_ids[i], "box": [float(v) for v in group.boxes[i]],
                          "gt": self.ground_truth(group.image_ids[i]), "iou": float(group.ious[i]),
                          "correct": bool(group.correct[i])} for i in page]}


def input_view_png(image: bytes, data: DataConfig) -> bytes:
    """An image as the model saw it (the eval transform's resize and centre crop, no normalisation), as PNG: the
    frame the localization boxes are in."""
    import io

    from PIL import Image

    from dml_ray.data.transforms import decode_image, display_view

    view = display_view(decode_image(image), data.input_resize(), data.image_size).numpy()
    buf = io.BytesIO()
    Image.fromarray(view).save(buf, format="PNG")
    return buf.getvalue()
