"""Ray tasks of the sharded evaluation search, in a module that imports only NumPy, faiss and the metrics.

A Ray worker imports the module that defines a task before running it: defined next to the stage
(pipelines/evaluate.py, which imports torch and scikit-learn) every fresh worker paid 5-20 s of imports
on this machine before its first search.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import ray

from dml_ray import console
from dml_ray.metrics.retrieval import query_statistics


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
