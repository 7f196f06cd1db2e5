"""Exact k-nearest-neighbour search with faiss, and removal of each query's own entry.

Everything here works on in-memory NumPy arrays and never builds a queries x database matrix:
queries are searched in blocks of ``block_size`` rows, so memory is ``block_size x nb`` at most
(faiss itself tiles that further). The Ray pipeline shards queries over tasks by calling these
functions on query slices against the whole database.

Score conventions (every function returns them as faiss computes them):

- ``metric="cosine"``: cosine similarity of the L2-normalised vectors, sorted **descending**.
- ``metric="euclidean"``: **squared** L2 distance, sorted **ascending**.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

import faiss
import numpy as np

logger = logging.getLogger(__name__)

METRICS = ("cosine", "euclidean")

# faiss GPU brute-force k-selection supports k <= 2048 (faiss/gpu/utils/DeviceDefs.cuh).
GPU_MAX_K = 2048


def _as_matrix(name: str, x: np.ndarray) -> np.ndarray:
    """``x`` as a C-contiguous float32 (n, d) array, validated (2-D, finite)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (n, d) array, got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        n_bad = int((~np.isfinite(x).all(axis=1)).sum())
        raise ValueError(f"{name}: {n_bad} row(s) contain NaN or infinite values")
    return x


def _l2_normalised(name: str, x: np.ndarray) -> np.ndarray:
    """A row-wise L2-normalised copy of ``x``; zero rows have no direction and are rejected."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    n_zero = int((norms == 0).sum())
    if n_zero:
        raise ValueError(f"{name}: {n_zero} zero vector(s); cosine similarity is undefined for them")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def _resolve_use_gpu(use_gpu: bool | None) -> bool:
    """``use_gpu`` with ``None`` meaning: a GPU when faiss sees one."""
    n_gpus = faiss.get_num_gpus()
    if use_gpu is None:
        return n_gpus > 0
    if use_gpu and n_gpus == 0:
        raise ValueError("use_gpu=True but faiss sees no GPU (install faiss-gpu, or pass use_gpu=None)")
    return use_gpu


def knn_blocks(
    queries: np.ndarray,
    database: np.ndarray,
    k: int,
    metric: str = "cosine",
    block_size: int = 4096,
    use_gpu: bool | None = None,
) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """``knn_search`` one block of ``block_size`` queries at a time: yields ``(rows, scores, indices)``.

    The inputs are validated and normalised once; a caller that reduces each block (to per-query
    statistics, say) never holds the (nq, k) result matrices.
    """
    if metric not in METRICS:
        raise ValueError(f"knn_search: unknown metric {metric!r}; expected one of: {', '.join(METRICS)}")
    if k < 1:
        raise ValueError(f"knn_search: k must be >= 1, got {k}")
    if block_size < 1:
        raise ValueError(f"knn_search: block_size must be >= 1, got {block_size}")
    xq = _as_matrix("queries", queries)
    xb = _as_matrix("database", database)
    if xq.shape[1] != xb.shape[1]:
        raise ValueError(f"knn_search: queries have dimension {xq.shape[1]} but database has {xb.shape[1]}")
    if xb.shape[0] == 0:
        raise ValueError("knn_search: database is empty")
    if metric == "cosine":
        xq = _l2_normalised("queries", xq)
        xb = _l2_normalised("database", xb)
        faiss_metric = faiss.METRIC_INNER_PRODUCT
    else:
        faiss_metric = faiss.METRIC_L2

    k = min(k, xb.shape[0])
    gpu = _resolve_use_gpu(use_gpu)
    if gpu and k > GPU_MAX_K:
        logger.info("knn_search: k=%d exceeds the faiss GPU limit %d; searching on CPU", k, GPU_MAX_K)
        gpu = False
    resources = faiss.StandardGpuResources() if gpu else None
    for start in range(0, xq.shape[0], block_size):
        block = xq[start : start + block_size]
        if resources is not None:
            d, i = faiss.knn_gpu(resources, block, xb, k, metric=faiss_metric)
        else:
            d, i = faiss.knn(block, xb, k, metric=faiss_metric)
        yield slice(start, start + len(block)), d, i


def knn_search(
    queries: np.ndarray,
    database: np.ndarray,
    k: int,
    metric: str = "cosine",
    block_size: int = 4096,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of every query in ``database``.

    Args:
        queries: (nq, d) query vectors.
        database: (nb, d) database vectors, nb >= 1.
        k: number of neighbours; capped at nb.
        metric: ``"cosine"`` (inner product of L2-normalised copies; the inputs are not modified)
            or ``"euclidean"`` (squared L2).
        block_size: queries searched per faiss call.
        use_gpu: faiss GPU brute force (``faiss.knn_gpu``); ``None`` uses it when faiss sees a GPU.
            For k > GPU_MAX_K the CPU is used.

    Returns:
        ``(scores, indices)``, both (nq, min(k, nb)): float32 cosine similarities sorted descending,
        or float32 squared L2 distances sorted ascending; int64 row indices into ``database``.
    """
    width = min(k, len(database))
    scores = np.empty((len(queries), width), dtype=np.float32)
    indices = np.empty((len(queries), width), dtype=np.int64)
    for rows, d, i in knn_blocks(queries, database, k, metric, block_size, use_gpu):
        scores[rows] = d
        indices[rows] = i
    return scores, indices


def locate_ids(ids: np.ndarray, reference_ids: np.ndarray) -> np.ndarray:
    """Row of each of ``ids`` in ``reference_ids`` (unique), or -1 where absent.

    Works for string (object) and integer ids; O((n + m) log m).
    """
    ids = np.asarray(ids)
    reference_ids = np.asarray(reference_ids)
    positions = np.full(len(ids), -1, dtype=np.int64)
    if len(ids) == 0 or len(reference_ids) == 0:
        return positions
    order = np.argsort(reference_ids, kind="stable")
    sorted_ids = reference_ids[order]
    slot = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    found = sorted_ids[slot] == ids
    positions[found] = order[slot[found]]
    return positions


def self_excluded_columns(neighbor_ids: np.ndarray, query_ids: np.ndarray, k: int) -> np.ndarray:
    """Column positions (nq, k) that keep each row's first k+1 neighbours minus the query itself.

    The query's own entry is found by id, not by position: ties and exact duplicates can put it
    at any rank, or push it out of the list. The first entry whose id equals the query's id is
    removed; a row without it loses its last (k+1-th) column instead.

    Args:
        neighbor_ids: (nq, >= k+1) ids of the neighbours, nearest first.
        query_ids: (nq,) id of each query.
        k: neighbours to keep.
    """
    neighbor_ids = np.asarray(neighbor_ids)
    query_ids = np.asarray(query_ids)
    if neighbor_ids.ndim != 2 or query_ids.shape != (neighbor_ids.shape[0],):
        raise ValueError(
            f"self-exclusion: neighbor_ids must be (nq, >= k+1) and query_ids (nq,); "
            f"got {neighbor_ids.shape} and {query_ids.shape}"
        )
    if k < 0 or neighbor_ids.shape[1] < k + 1:
        raise ValueError(
            f"self-exclusion: need k >= 0 and k+1 neighbour columns; got k={k}, {neighbor_ids.shape[1]} columns"
        )
    is_self = neighbor_ids[:, : k + 1] == query_ids[:, None]
    self_position = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    columns = np.arange(k)[None, :]
    return columns + (columns >= self_position[:, None])


def exclude_self(neighbor_ids: np.ndarray, query_ids: np.ndarray, k: int) -> np.ndarray:
    """``neighbor_ids`` (nq, >= k+1) cut to (nq, k) without each query's own id.

    See ``self_excluded_columns`` for the rule (by id, at any rank; else drop the last column).
    """
    columns = self_excluded_columns(neighbor_ids, query_ids, k)
    return np.take_along_axis(np.asarray(neighbor_ids), columns, axis=1)


def self_rows(query_ids: np.ndarray, db_ids: np.ndarray) -> np.ndarray:
    """Database row of each query (-1 where the query is not in the database); ``db_ids`` must be unique."""
    query_ids = np.asarray(query_ids)
    db_ids = np.asarray(db_ids)
    if query_ids.ndim != 1 or db_ids.ndim != 1:
        raise ValueError(f"self rows: ids must be 1-D, got {query_ids.shape} and {db_ids.shape}")
    if len(np.unique(db_ids)) != len(db_ids):
        raise ValueError("search_excluding_self: db_ids contain duplicates; ids must be unique")
    return locate_ids(query_ids, db_ids)


def excluding_self_blocks(
    query_emb: np.ndarray,
    query_rows: np.ndarray,
    db_emb: np.ndarray,
    k: int,
    metric: str = "cosine",
    block_size: int = 4096,
    use_gpu: bool | None = None,
) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """``search_excluding_self`` one query block at a time, the queries given by their database row.

    Args:
        query_rows: (nq,) database row of each query (``self_rows``), -1 for a query not in it. A
            row is the query's id resolved once, so the self-match is still removed by id, at any
            rank, and the search compares integers instead of strings.

    Yields:
        ``(rows, scores, db_indices)`` per block, of the width ``search_excluding_self`` gives.
    """
    if k < 1:
        raise ValueError(f"search_excluding_self: k must be >= 1, got {k}")
    query_rows = np.asarray(query_rows, dtype=np.int64)
    if query_rows.shape != (len(query_emb),):
        raise ValueError(f"search_excluding_self: expected one database row per query, got {query_rows.shape} "
                         f"for {len(query_emb)} queries")
    if not (query_rows >= 0).any():
        yield from knn_blocks(query_emb, db_emb, k, metric, block_size, use_gpu)
        return
    k_out = min(k, len(db_emb) - 1)
    for rows, scores, indices in knn_blocks(query_emb, db_emb, k_out + 1, metric, block_size, use_gpu):
        columns = self_excluded_columns(indices, query_rows[rows], k_out)
        yield rows, np.take_along_axis(scores, columns, axis=1), np.take_along_axis(indices, columns, axis=1)


def search_excluding_self(
    query_emb: np.ndarray,
    query_ids: np.ndarray,
    db_emb: np.ndarray,
    db_ids: np.ndarray,
    k: int,
    metric: str = "cosine",
    block_size: int = 4096,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest database items of each query, never the query itself (matched by id).

    When any query id occurs in ``db_ids``, k+1 neighbours are searched and each query's own entry
    is removed with ``self_excluded_columns``; otherwise this is ``knn_search``.

    Args:
        query_emb: (nq, d) query embeddings; query_ids: (nq,) their ids.
        db_emb: (nb, d) database embeddings; db_ids: (nb,) their unique ids.
        k, metric, block_size, use_gpu: as in ``knn_search``.

    Returns:
        ``(scores, db_indices)`` as in ``knn_search``, of width min(k, nb - 1) when any query is in
        the database and min(k, nb) otherwise.
    """
    if k < 1:
        raise ValueError(f"search_excluding_self: k must be >= 1, got {k}")
    query_ids = np.asarray(query_ids)
    db_ids = np.asarray(db_ids)
    if query_ids.shape != (len(query_emb),) or db_ids.shape != (len(db_emb),):
        raise ValueError(
            f"search_excluding_self: ids must be 1-D with one id per row; got query_ids {query_ids.shape} "
            f"for {len(query_emb)} queries and db_ids {db_ids.shape} for {len(db_emb)} database rows"
        )
    blocks = list(excluding_self_blocks(query_emb, self_rows(query_ids, db_ids), db_emb, k, metric, block_size,
                                        use_gpu))
    if not blocks:
        width = min(k, len(db_emb))
        return np.empty((0, width), np.float32), np.empty((0, width), np.int64)
    return np.concatenate([b[1] for b in blocks]), np.concatenate([b[2] for b in blocks])
