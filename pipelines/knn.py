"""The kNN graph and reciprocal-kNN batches (intra-batch-mpn-reproduction Sec. 3.4) as Ray tasks.

The embedding matrix of a split goes into the object store once; query rows are sharded over tasks
for the search and again for the reciprocal sets and batches, which need the whole graph (also in the
object store) but never an N x N matrix.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from dml_ray.config import KnnConfig
from dml_ray.io.schemas import NEIGHBORS_SCHEMA
from dml_ray.retrieval.knn_graph import build_ann_index, knn_graph_rows, shard_bounds
from dml_ray.retrieval.prototypes import fixed_list_to_numpy
from pipelines.evaluate import by_image_id
from pipelines.search_tasks import batch_shard, graph_shard

log = logging.getLogger(__name__)


def knn_graph_sharded(x: np.ndarray, cfg: KnnConfig) -> tuple[np.ndarray, np.ndarray]:
    """The (N, k1 + 1) graph of ``x``: exact search sharded over Ray tasks, or an approximate index."""
    if cfg.index != "exact":
        index = build_ann_index(x, cfg.metric, cfg.index, cfg.index_params or None)
        return knn_graph_rows(x, np.arange(len(x)), x, cfg.k1, cfg.metric, ann_index=index)
    ref = ray.put(x)
    parts = ray.get([graph_shard.remote(ref, a, b, cfg.k1, cfg.metric) for a, b in shard_bounds(len(x), cfg.shards)])
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def split_neighbors(embeddings: pa.Table, split: str, cfg: KnnConfig, run_id: str) -> pa.Table:
    """``neighbors`` rows of one split: kNN lists with distances, expanded reciprocal sets and batches."""
    # image_id order first, as the evaluate stage: ties in the search then break the same way however the
    # embeddings were written (Ray Data's block order varies from run to run)
    rows = by_image_id(embeddings.filter(pc.equal(embeddings.column("split"), split)))
    if rows.num_rows < 2:
        raise ValueError(f"knn: split {split!r} has fewer than 2 embeddings")
    x = fixed_list_to_numpy(rows.column("embedding"))
    ids = np.asarray(rows.column("image_id").to_pylist(), dtype=object)
    neighbor_idx, distances = knn_graph_sharded(x, cfg)
    k = min(cfg.k or cfg.k1, neighbor_idx.shape[1] - 1)
    batch_size = min(cfg.batch_size, neighbor_idx.shape[1])
    refs = [ray.put(v) for v in (neighbor_idx, distances, x)]
    parts = ray.get([batch_shard.remote(*refs, a, b, k, batch_size, cfg.metric)
                     for a, b in shard_bounds(len(x), cfg.shards)])
    # each shard pads its reciprocal sets to its own longest set: keep rows, not one matrix
    reciprocal = [row for p in parts for row in p[0]]
    batches = [row for p in parts for row in p[1]]

    def id_lists(index) -> pa.Array:
        return pa.array([list(ids[r[r >= 0]]) for r in index], pa.list_(pa.string()))

    n = len(ids)
    return pa.table({
        "run_id": pa.array([run_id] * n, pa.string()), "image_id": pa.array(list(ids), pa.string()),
        "split": pa.array([split] * n, pa.string()), "neighbor_ids": id_lists(neighbor_idx),
        "distances": pa.array(list(distances.astype(np.float32)), pa.list_(pa.float32())),
        "reciprocal_ids": id_lists(reciprocal), "batch_ids": id_lists(batches),
    }, schema=NEIGHBORS_SCHEMA)


def run_knn(embeddings: pa.Table, splits: list[str], cfg: KnnConfig, run_id: str) -> pa.Table:
    """The ``neighbors`` table over the given splits (each split is its own database)."""
    start = time.perf_counter()
    table = pa.concat_tables([split_neighbors(embeddings, s, cfg, run_id) for s in splits])
    log.info("knn: %d rows in %.1f s", table.num_rows, time.perf_counter() - start)
    return table
