"""Ray tasks of the sharded searches (evaluation, kNN graph, reciprocal batches), in a module that imports only
NumPy, SciPy, faiss and the metrics.

A Ray worker imports the module that defines a task before running it: defined next to their stages
(pipelines/evaluate.py imports torch and scikit-learn, pipelines/knn.py torch through the prototypes) every
fresh worker paid 5-20 s of imports on this machine before its first search.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import ray

from dml_ray import console
from dml_ray.metrics.retrieval import query_statistics
from dml_ray.retrieval.knn_graph import knn_graph_rows
from dml_ray.retrieval.reciprocal import reciprocal_batches


@ray.remote
def statistics_shard(query_emb: np.ndarray, start: int, stop: int, query_rows: np.ndarray, query_labels: np.ndarray,
                     n_relevant: Optional[np.ndarray], db_emb: np.ndarray, db_labels: np.ndarray, width: int,
                     max_k: int, metric: str, block_size: int, num_threads: int):
    """``query_statistics`` of the queries ``query_emb[start:stop]`` with ``num_threads`` faiss threads (the task's
    CPU reservation). ``query_emb`` is the whole query matrix, shared through the object store (the database's
    own when a split is searched against itself), so the shards add no copy of it."""
    import faiss

    faiss.omp_set_num_threads(num_threads)
    stats = query_statistics(query_emb[start:stop], query_rows, query_labels, n_relevant, db_emb, db_labels, width,
                             max_k, metric, block_size)
    console.advance("evaluate", stop - start)
    return stats


@ray.remote(num_cpus=1)
def graph_shard(database: np.ndarray, a: int, b: int, k1: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``a:b`` of the exact kNN graph of ``database`` (intra-batch-mpn-reproduction Sec. 3.4)."""
    return knn_graph_rows(database[a:b], np.arange(a, b), database, k1, metric)


@ray.remote(num_cpus=1)
def batch_shard(neighbor_idx: np.ndarray, distances: np.ndarray, database: np.ndarray, a: int, b: int, k: int,
                batch_size: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The reciprocal-kNN batches seeded by rows ``a:b`` (intra-batch-mpn-reproduction Sec. 3.4)."""
    return reciprocal_batches(neighbor_idx, distances, database, k, batch_size, metric, rows=np.arange(a, b))
