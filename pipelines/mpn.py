"""MPN inference over reciprocal-kNN batches (intra-batch-mpn-reproduction Sec. 3.4) as Ray tasks.

Each image's feature is refined by the trained MPN inside its own test-time batch (the ``batch_ids``
of the ``neighbors`` table); the refined, L2-normalised features form the ``mpn_embeddings`` table.
The split's backbone embeddings go into the object store once; rows are sharded over tasks.
"""
from __future__ import annotations

import logging
import time
import warnings
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from torch.nn import functional as F

from dml_ray.io.schemas import embeddings_schema
from dml_ray.models.checkpoint import load_checkpoint
from dml_ray.models.mpn import refine_over_batches
from dml_ray.objectives import load_mpn
from dml_ray.retrieval.knn_graph import shard_bounds
from dml_ray.retrieval.prototypes import fixed_list_to_numpy

log = logging.getLogger(__name__)


@ray.remote(num_cpus=1)
def _refine_shard(checkpoint_uri: str, storage_options: Optional[dict], features: np.ndarray, batches: np.ndarray,
                  rows: np.ndarray, num_threads: int) -> np.ndarray:
    torch.set_num_threads(num_threads)
    loaded = load_checkpoint(checkpoint_uri, storage_options)
    mpn = load_mpn(loaded.model_config, len(loaded.class_names), loaded.model.embedding_dim, loaded.objective_state)
    with warnings.catch_warnings():  # object-store arrays are read-only; nothing here writes to them
        warnings.simplefilter("ignore", UserWarning)
        features_t = torch.from_numpy(features)
    refined = refine_over_batches(mpn, features_t, torch.from_numpy(batches), torch.from_numpy(rows))
    return refined.numpy()


def _split_rows(embeddings: pa.Table, neighbors: pa.Table, split: str) -> tuple[pa.Table, np.ndarray, list]:
    emb = embeddings.filter(pc.equal(embeddings.column("split"), split))
    nb = neighbors.filter(pc.equal(neighbors.column("split"), split))
    ids = emb.column("image_id").to_pylist()
    index = {image_id: i for i, image_id in enumerate(ids)}
    missing = [i for i in nb.column("image_id").to_pylist() if i not in index]
    if missing or nb.num_rows != emb.num_rows:
        raise ValueError(f"mpn: the neighbors table of split {split!r} does not match its embeddings "
                         f"({nb.num_rows} vs {emb.num_rows} rows); re-run the knn stage")
    rows = np.array([index[i] for i in nb.column("image_id").to_pylist()], dtype=np.int64)
    batches = [[index[j] for j in batch] for batch in nb.column("batch_ids").to_pylist()]
    return emb, rows, batches


def refine_split(embeddings: pa.Table, neighbors: pa.Table, split: str, checkpoint_uri: str, shards: int,
                 num_threads: int, storage_options: Optional[dict]) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """(split's embeddings rows, row index of each refined feature, refined features) of one split."""
    emb, rows, batches = _split_rows(embeddings, neighbors, split)
    ref = ray.put(fixed_list_to_numpy(emb.column("embedding")))  # unit norm: the MPN maps them to node features
    futures, order = [], []
    for size in sorted({len(b) for b in batches}):  # batches have one size unless a split is tiny
        group = np.array([i for i, b in enumerate(batches) if len(b) == size])
        matrix = np.array([batches[i] for i in group], dtype=np.int64)
        for a, b in shard_bounds(len(group), shards):
            futures.append(_refine_shard.remote(checkpoint_uri, storage_options, ref, matrix[a:b],
                                                rows[group[a:b]], num_threads))
            order.append(rows[group[a:b]])
    return emb, np.concatenate(order), np.concatenate(ray.get(futures))


def run_mpn(embeddings: pa.Table, neighbors: pa.Table, splits: list[str], checkpoint_uri: str, model_id: str,
            run_id: str, shards: int = 4, num_threads: int = 1,
            storage_options: Optional[dict] = None) -> pa.Table:
    """The ``mpn_embeddings`` table: every image of ``splits`` refined by the MPN within its reciprocal batch."""
    start = time.perf_counter()
    parts = []
    for split in splits:
        emb, order, refined = refine_split(embeddings, neighbors, split, checkpoint_uri, shards, num_threads,
                                           storage_options)
        refined_t = torch.from_numpy(refined)
        norm = refined_t.norm(dim=1).numpy()
        unit = F.normalize(refined_t, dim=1).numpy()
        rows = emb.take(pa.array(order))
        dim = unit.shape[1]
        parts.append(pa.table({
            "run_id": pa.array([run_id] * len(order), pa.string()),
            "image_id": rows.column("image_id"), "label": rows.column("label"), "split": rows.column("split"),
            "model_id": pa.array([model_id] * len(order), pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(unit.reshape(-1), pa.float32()), dim),
            "norm": pa.array(norm, pa.float32()),
        }, schema=embeddings_schema(dim)))
    table = pa.concat_tables(parts)
    log.info("mpn: refined %d embeddings in %.1f s", table.num_rows, time.perf_counter() - start)
    return table
