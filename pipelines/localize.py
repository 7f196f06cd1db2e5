"""Weakly supervised localization of every stored activation map, as Ray tasks over the table's files.

Each task reads a share of the committed ``activation_maps`` files, joins the ground-truth boxes
(transformed into the model-input frame), writes its rows of the ``localization`` table and returns
per-threshold counters (wsolevaluation style: accumulate per shard, merge by addition). The driver
merges the counters into ``metrics`` rows: accuracy per threshold (paper Table I), the best threshold
(Table II), a threshold chosen on a held-out part of the split, MaxBoxAccV2 and the Dist-CAM top-1
localization error for prototype references.
"""
from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from dml_ray import console
from dml_ray.config import DataConfig, LocalizeConfig
from dml_ray.io.schemas import LOCALIZATION_SCHEMA, METRICS_SCHEMA
from dml_ray.io.run import Run
from dml_ray.metrics.localization import LocalizationCounter, box_to_input_frame, choose_threshold, mode_threshold_grid

log = logging.getLogger(__name__)

Key = tuple[str, str, str]  # (split, reference_kind, method)
BASELINES = ("baseline_random", "baseline_center")


@dataclass(frozen=True)
class LocalizeResult:
    rows: int
    metrics: pa.Table
    seconds: float


def ground_truth(images: pa.Table, data: DataConfig) -> dict[str, np.ndarray]:
    """Image id -> its box (x0, y0, x1, y1) in the model-input frame (``data.frame``: resize then center crop,
    or wsolevaluation's Resize((S, S)) without a crop)."""
    with_box = images.filter(pc.and_(pc.is_valid(images.column("bbox")), pc.is_valid(images.column("width"))))
    box = with_box.column("bbox").combine_chunks()
    xywh = np.stack([box.field(n).to_numpy(zero_copy_only=False) for n in ("x", "y", "w", "h")], axis=1)
    wh = np.stack([with_box.column("width").to_numpy(), with_box.column("height").to_numpy()], axis=1)
    frame = box_to_input_frame(xywh, wh, data.input_resize(), data.image_size)
    return dict(zip(with_box.column("image_id").to_pylist(), frame))


def in_holdout(image_ids: list[str], fraction: float) -> np.ndarray:
    """Deterministic held-out membership by a hash of the image id."""
    return np.array([zlib.crc32(i.encode()) % 10_000 < fraction * 10_000 for i in image_ids], dtype=bool)


def baseline_maps(image_ids: list[str], grid: tuple[int, int], seed: int) -> dict[str, np.ndarray]:
    """Random maps (seeded per image, uniform in [0, 1)) and a centred peak, at feature-map resolution. The peak
    is non-negative with minimum 0 at the corners, so ReLU-then-max and min-max give the same score map."""
    h, w = grid
    rows, cols = np.mgrid[0:h, 0:w]
    distance2 = (rows - (h - 1) / 2) ** 2 + (cols - (w - 1) / 2) ** 2
    centre = (distance2.max() - distance2).astype(np.float32)
    random = np.stack([np.random.default_rng((seed, zlib.crc32(i.encode()))).random((h, w), dtype=np.float32)
                       for i in image_ids])
    return {"baseline_random": random, "baseline_center": np.broadcast_to(centre, (len(image_ids), h, w))}


def _counters(cfg: LocalizeConfig, size: int) -> tuple[LocalizationCounter, LocalizationCounter]:
    grid = mode_threshold_grid(cfg.mode, cfg.threshold_interval)
    options = {"mode": cfg.mode, "input_size": size, "normalise": cfg.normalise, "iou_rule": cfg.iou_rule}
    return LocalizationCounter(grid, **options), LocalizationCounter(grid, **options)


def _rows(run_id: str, image_ids: list[str], kind: str, method: str, thresholds: np.ndarray, boxes: np.ndarray,
          ious: np.ndarray, correct: np.ndarray) -> pa.Table:
    n, t = ious.shape
    return pa.table({
        "run_id": pa.array([run_id] * (n * t), pa.string()),
        "image_id": pa.array(np.repeat(np.asarray(image_ids, dtype=object), t), pa.string()),
        "method": pa.array([method] * (n * t), pa.string()),
        "reference_kind": pa.array([kind] * (n * t), pa.string()),
        "threshold": pa.array(np.tile(thresholds, n).astype(np.float32)),
        "box": pa.FixedSizeListArray.from_arrays(pa.array(boxes.reshape(-1).astype(np.float32)), 4),
        "iou": pa.array(ious.reshape(-1).astype(np.float32)),
        "correct": pa.array(correct.reshape(-1)),
    }, schema=LOCALIZATION_SCHEMA)


def localize_groups(maps: pa.Table, gt: dict[str, np.ndarray], labels: dict[str, int], splits: dict[str, str],
                    cfg: LocalizeConfig, size: int, run_id: str) -> tuple[pa.Table, dict[Key, tuple]]:
    """Localization rows and (holdout, rest) counters per (split, reference kind, method) of activation-map rows."""
    maps = maps.filter(pc.is_in(maps.column("image_id"), pa.array(list(gt))))
    maps = maps.append_column("split", pa.array([splits[i] for i in maps.column("image_id").to_pylist()], pa.string()))
    counters: dict[Key, tuple] = {}
    tables = []
    keys = set(zip(*(maps.column(c).to_pylist() for c in ("split", "reference_kind", "method"))))
    for split, kind, method in sorted(keys):
        group = maps.filter(pc.and_(pc.and_(pc.equal(maps.column("split"), split),
                                            pc.equal(maps.column("reference_kind"), kind)),
                                    pc.equal(maps.column("method"), method)))
        ids = group.column("image_id").to_pylist()
        h, w = group.column("map_h")[0].as_py(), group.column("map_w")[0].as_py()
        values = group.column("map").combine_chunks().flatten().to_numpy().reshape(len(ids), h, w)
        class_ok = None
        if kind == "prototype":
            ref_labels = [int(r.split(":", 1)[1]) for r in group.column("reference_id").to_pylist()]
            class_ok = np.array([labels[i] == r for i, r in zip(ids, ref_labels)])
        tables.append(_accumulate(counters, (split, kind, method), ids, values, gt, class_ok, cfg, size, run_id))
    return (pa.concat_tables(tables) if tables else LOCALIZATION_SCHEMA.empty_table()), counters


def _accumulate(counters, key, ids, values, gt, class_ok, cfg, size, run_id) -> pa.Table:
    holdout = in_holdout(ids, cfg.holdout_fraction)
    pair = counters.setdefault(key, _counters(cfg, size))
    gt_boxes = np.stack([gt[i] for i in ids])
    out = []
    for part, counter in zip((holdout, ~holdout), pair):
        if part.any():
            boxes, ious, correct = counter.accumulate(values[part], gt_boxes[part],
                                                      None if class_ok is None else class_ok[part])
            out.append(_rows(run_id, [i for i, p in zip(ids, part) if p], *key[1:], counter.thresholds, boxes, ious,
                             correct))
    return pa.concat_tables(out)


@ray.remote(num_cpus=1)
def _localize_shard(run: Run, files: list[str], shard: int, gt, labels, splits, cfg, size, staging,
                    baseline_ids: Optional[list[str]], grid: Optional[tuple[int, int]]):
    run_id = run.run_id
    tables = []
    for f in files:
        with run.fs.open(f, "rb") as handle:
            tables.append(pq.read_table(handle, columns=["image_id", "reference_id", "reference_kind", "method",
                                                         "map_h", "map_w", "map"]))
    maps = pa.concat_tables(tables) if tables else None
    maps = maps.filter(pc.not_equal(maps.column("method"), "point_to_point")) if maps is not None else None
    rows, counters = localize_groups(maps, gt, labels, splits, cfg, size, run_id) if maps is not None else (None, {})
    parts = [] if rows is None else [rows]
    for split in sorted({splits[i] for i in baseline_ids or []}):
        ids = [i for i in baseline_ids if splits[i] == split]
        for method, values in baseline_maps(ids, grid, cfg.seed).items():
            parts.append(_accumulate(counters, (split, "none", method), ids, values, gt, None, cfg, size, run_id))
    run.write_part(staging, pa.concat_tables(parts), shard)
    console.advance("localize", 0 if maps is None else maps.num_rows)
    return counters


def metrics_rows(counters: dict[Key, tuple], run_id: str) -> pa.Table:
    """``metrics`` rows from merged counters: Table I per threshold, Table II, held-out threshold, MaxBoxAccV2,
    top-1 localization error."""
    rows = []
    for (split, kind, method), (holdout, rest) in sorted(counters.items()):
        whole = holdout.merge(rest).compute()
        name = f"{kind}/{method}"

        def row(metric, value, threshold=None):
            rows.append({"run_id": run_id, "stage": "localize", "split": split, "metric": f"{metric}/{name}",
                         "k": None, "value": float(value), "threshold": threshold})

        for t, acc in zip(whole["thresholds"], whole["accuracy"]):
            row("loc_acc", acc, float(t))
        row("loc_best_threshold", whole["best_threshold"])
        row("loc_best_acc", whole["best_accuracy"])
        row("maxboxacc_v2", whole["maxboxacc_v2"])
        if holdout.n_images and rest.n_images:
            chosen = choose_threshold(holdout)
            row("loc_holdout_threshold", chosen)
            row("loc_holdout_acc", rest.compute(threshold=chosen)["accuracy_at_threshold"])
        if whole["top1_loc_error"] is not None:
            row("top1_loc_error", whole["top1_loc_error"])
        row("n_images", whole["n_images"])
    return pa.Table.from_pylist(rows, schema=METRICS_SCHEMA)


def run_localize(run: Run, data: DataConfig, cfg: LocalizeConfig) -> LocalizeResult:
    """Commit the ``localization`` table; return the ``metrics`` rows (stage localize)."""
    start = time.perf_counter()
    images = run.read("images")
    gt = ground_truth(images, data)
    if not gt:
        raise ValueError("localize: no image has a bounding box")
    labels = dict(zip(images.column("image_id").to_pylist(), images.column("label").to_pylist()))
    splits = dict(zip(images.column("image_id").to_pylist(), images.column("split").to_pylist()))
    files = run.files("activation_maps")
    ids_grid = run.read("activation_maps", columns=["image_id", "map_h", "map_w", "method"])
    ids_grid = ids_grid.filter(pc.not_equal(ids_grid.column("method"), "point_to_point"))
    explained = sorted(set(ids_grid.column("image_id").to_pylist()) & set(gt))
    grid = (ids_grid.column("map_h")[0].as_py(), ids_grid.column("map_w")[0].as_py())
    n_shards = max(1, min(cfg.shards, len(files)))
    staging = run.staging("localization")
    refs = ray.put(gt), ray.put(labels), ray.put(splits)
    futures = []
    console.expect("localize", ids_grid.num_rows, unit="maps")
    for shard in range(n_shards):
        baseline_ids = explained[shard::n_shards] if cfg.baselines else None
        futures.append(_localize_shard.remote(run, files[shard::n_shards], shard, *refs, cfg, data.image_size,
                                              staging, baseline_ids, grid))
    merged: dict[Key, tuple] = {}
    for counters in ray.get(futures):
        for key, (h, r) in counters.items():
            merged[key] = (h, r) if key not in merged else (merged[key][0].merge(h), merged[key][1].merge(r))
    metrics = metrics_rows(merged, run.run_id)
    marker = run.commit("localization", staging, replace=True)
    seconds = time.perf_counter() - start
    log.info("localize: %d rows, %d metric rows in %.1f s", marker["rows"], metrics.num_rows, seconds)
    return LocalizeResult(marker["rows"], metrics, seconds)
