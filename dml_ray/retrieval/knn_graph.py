"""The k1-nearest-neighbour graph behind reciprocal kNN batches (intra-batch-mpn-reproduction Sec. 3.4).

Row ``q`` of the graph lists ``q`` itself at column 0 and then its ``k1`` nearest other items, as
the paper's N_q^k does (the k-reciprocal sets and the reference code take ``k1 + 1`` entries,
the query included). Every row is ordered by ``(distance, index)``, so ties in distance go to the
smaller index and the graph does not depend on the order in which faiss happens to return tied
items. The query is placed first even when an exact duplicate (distance 0) has a smaller index.

Distances (ascending, float32, clamped at 0):

- ``metric="cosine"``: ``1 - cos`` of the L2-normalised vectors.
- ``metric="euclidean"``: squared L2 distance.

Indexes: ``"exact"`` (faiss brute force through ``knn_search``; on the GPU when faiss sees one),
``"ivf"`` (``faiss.IndexIVFFlat``; GPU when present) or ``"hnsw"`` (``faiss.IndexHNSWFlat``, CPU).
Exact rows are complete under ties: when the last kept distance equals the last distance faiss
returned, tied items may have been cut off, and such rows are searched again with a larger k.
Approximate rows miss some neighbours (measure with ``knn_recall``); a row in which the index
found too few items is searched exactly.

Sharding over Ray tasks (the pipeline's job): split the query rows with ``shard_bounds``, build an
approximate index once with ``build_ann_index`` (ship it with ``faiss.serialize_index``, after
``faiss.index_gpu_to_cpu`` for a GPU index), and call ``knn_graph_rows`` on each shard against the
whole (``ray.put``, zero-copy) database.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import faiss
import numpy as np

from dml_ray.retrieval.search import (
    METRICS,
    _as_matrix,
    _l2_normalised,
    _resolve_use_gpu,
    knn_search,
)

logger = logging.getLogger(__name__)

INDEX_KINDS = ("exact", "ivf", "hnsw")

# Default parameters of the approximate indexes; ``index_params`` overrides them.
# ivf: nlist (None: 4 sqrt(N)), nprobe, train_size (None: 40 nlist, at most N; faiss's k-means
# wants >= 39 points per centroid), seed of the training sample. hnsw: M, efConstruction, efSearch.
IVF_DEFAULTS: dict[str, Any] = {"nlist": None, "nprobe": 64, "train_size": None, "seed": 0}
HNSW_DEFAULTS: dict[str, Any] = {"M": 32, "efConstruction": 80, "efSearch": 128}

_NO_INDEX = np.iinfo(np.int64).max  # sort key of a missing result: after every real index


def _index_params(index: str, index_params: dict[str, Any] | None) -> dict[str, Any]:
    """``index_params`` merged over the defaults of ``index``; unknown keys are an error."""
    defaults = IVF_DEFAULTS if index == "ivf" else HNSW_DEFAULTS
    params = dict(index_params or {})
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(
            f"knn_graph: unknown {index} index parameter(s) {unknown}; expected some of: {', '.join(defaults)}"
        )
    return {**defaults, **params}


def _prepared(name: str, x: np.ndarray, metric: str) -> np.ndarray:
    """``x`` validated as float32 (n, d), L2-normalised for the cosine metric."""
    if metric not in METRICS:
        raise ValueError(f"knn_graph: unknown metric {metric!r}; expected one of: {', '.join(METRICS)}")
    x = _as_matrix(name, x)
    return _l2_normalised(name, x) if metric == "cosine" else x


def _scores_to_distances(scores: np.ndarray, metric: str) -> np.ndarray:
    """faiss scores as ascending float32 distances >= 0 (``1 - cos``, or squared L2)."""
    dist = 1.0 - scores if metric == "cosine" else scores
    return np.maximum(dist, 0.0).astype(np.float32, copy=False)


def build_ann_index(
    database: np.ndarray,
    metric: str = "cosine",
    index: str = "ivf",
    index_params: dict[str, Any] | None = None,
    use_gpu: bool | None = None,
) -> faiss.Index:
    """An approximate faiss index over ``database`` for ``knn_graph_rows`` (mpn-reproduction Sec. 3.4).

    Args:
        database: (N, d) vectors; L2-normalised copies are indexed for the cosine metric.
        metric: ``"cosine"`` or ``"euclidean"``.
        index: ``"ivf"``: ``IndexIVFFlat`` with ``nlist`` lists (default ``4 sqrt(N)``), k-means
            trained on a random sample of ``train_size`` rows (default ``40 nlist``), searched with
            ``nprobe`` lists; on the GPU when faiss sees one (``use_gpu=None``).
            ``"hnsw"``: ``IndexHNSWFlat`` with ``M`` links per node, ``efConstruction`` and
            ``efSearch``; CPU only.
        index_params: overrides of ``IVF_DEFAULTS`` / ``HNSW_DEFAULTS``.
        use_gpu: as in ``knn_search``.

    Returns:
        The populated index, its search parameters set.
    """
    if index not in ("ivf", "hnsw"):
        raise ValueError(f"build_ann_index: unknown index {index!r}; expected one of: ivf, hnsw")
    params = _index_params(index, index_params)
    xb = _prepared("database", database, metric)
    n, d = xb.shape
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    if index == "hnsw":
        if use_gpu:
            raise ValueError("build_ann_index: faiss has no GPU HNSW index; use index='ivf' or use_gpu=None")
        ann = faiss.IndexHNSWFlat(d, int(params["M"]), faiss_metric)
        ann.hnsw.efConstruction = int(params["efConstruction"])
        ann.hnsw.efSearch = int(params["efSearch"])
        ann.add(xb)
        logger.info("build_ann_index: HNSW over %d vectors (M=%d)", n, params["M"])
        return ann

    nlist = int(params["nlist"] or min(n, max(1, round(4 * math.sqrt(n)))))
    if not 1 <= nlist <= n:
        raise ValueError(f"build_ann_index: nlist must be in [1, {n}] for {n} vectors, got {nlist}")
    train_size = min(n, int(params["train_size"] or 40 * nlist))
    quantizer = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
    ann = faiss.IndexIVFFlat(quantizer, d, nlist, faiss_metric)
    if _resolve_use_gpu(use_gpu):
        resources = faiss.StandardGpuResources()
        ann = faiss.index_cpu_to_gpu(resources, 0, ann)
        ann.referenced_objects = [resources]  # the GPU index must not outlive its resources
    sample = np.random.default_rng(params["seed"]).choice(n, size=train_size, replace=False)
    ann.train(xb[np.sort(sample)])
    ann.add(xb)
    ann.nprobe = int(params["nprobe"])
    logger.info("build_ann_index: IVF over %d vectors (nlist=%d, nprobe=%d, trained on %d)",
                n, nlist, ann.nprobe, train_size)
    return ann


def _ordered(
    idx: np.ndarray, dist: np.ndarray, query_rows: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Search results as graph rows: the query first, then by (distance, index), cut to ``width``.

    ``idx`` may hold -1 (nothing found). A query missing from its results is inserted at column 0
    (its last kept neighbour drops out). Returns ``(idx, dist, n_valid)``, ``n_valid`` being the
    number of real entries kept per row.
    """
    n = len(idx)
    idx = np.concatenate([query_rows[:, None], idx], axis=1)
    dist = np.concatenate([np.zeros((n, 1), np.float32), dist], axis=1)
    is_self = idx == query_rows[:, None]
    is_self[:, 0] = False
    missing = (idx < 0) | is_self  # the query's own search result is replaced by column 0
    key_idx = np.where(missing, _NO_INDEX, idx)
    key_dist = np.where(missing, np.inf, dist)
    not_first = np.ones(idx.shape, dtype=bool)
    not_first[:, 0] = False
    order = np.lexsort((key_idx, key_dist, not_first), axis=1)[:, :width]
    out_idx = np.take_along_axis(np.where(missing, -1, idx), order, axis=1)
    out_dist = np.take_along_axis(key_dist, order, axis=1).astype(np.float32)
    return out_idx, out_dist, (out_idx >= 0).sum(axis=1)


def _exact_rows(
    xq: np.ndarray, query_rows: np.ndarray, xb: np.ndarray, width: int, metric: str,
    block_size: int, use_gpu: bool | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact graph rows, searched again with a doubled k where ties may cross the cut.

    ``xq`` and ``xb`` are raw (``knn_search`` normalises them for the cosine metric).
    """
    nb = len(xb)
    out_idx = np.empty((len(xq), width), np.int64)
    out_dist = np.empty((len(xq), width), np.float32)
    todo = np.arange(len(xq))
    k_search = min(nb, 2 * width)
    while len(todo):
        queries = xq if len(todo) == len(xq) else xq[todo]
        scores, idx = knn_search(queries, xb, k_search, metric, block_size, use_gpu)
        dist = _scores_to_distances(scores, metric)
        row_idx, row_dist, _ = _ordered(idx, dist, query_rows[todo], width)
        out_idx[todo], out_dist[todo] = row_idx, row_dist
        if k_search == nb:
            break
        # Items beyond the k_search returned are at least dist[:, -1] away: rows whose cut falls
        # on that distance may have lost a tied item with a smaller index.
        unresolved = (width > 1) & (row_dist[:, -1] >= dist[:, -1])
        todo = todo[unresolved]
        if len(todo):
            logger.info("knn_graph: %d row(s) with ties at the cut; searching them with k=%d",
                        len(todo), min(nb, 2 * k_search))
        k_search = min(nb, 2 * k_search)
    return out_idx, out_dist


def knn_graph_rows(
    queries: np.ndarray,
    query_rows: np.ndarray,
    database: np.ndarray,
    k1: int,
    metric: str = "cosine",
    ann_index: faiss.Index | None = None,
    block_size: int = 4096,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``query_rows`` of the k1-NN graph of ``database`` (mpn-reproduction Sec. 3.4, N_q^k).

    A shard of the graph: the queries are searched against the whole database.

    Args:
        queries: (n, d) vectors, ``database[query_rows]``.
        query_rows: (n,) row of each query in ``database``; it is put first in its own row.
        database: (N, d) vectors.
        k1: neighbours per row besides the query itself.
        metric: ``"cosine"`` or ``"euclidean"`` (module docstring).
        ann_index: an index from ``build_ann_index`` over ``database``; ``None`` searches exactly.
        block_size: queries per faiss call (exact search).
        use_gpu: as in ``knn_search`` (exact search; the index decides for itself).

    Returns:
        ``(neighbor_idx, distances)``: int64 and float32, (n, min(k1 + 1, N)), the query at column
        0 with distance 0, then by ascending (distance, index).
    """
    if k1 < 0:
        raise ValueError(f"knn_graph: k1 must be >= 0, got {k1}")
    if metric not in METRICS:
        raise ValueError(f"knn_graph: unknown metric {metric!r}; expected one of: {', '.join(METRICS)}")
    xq = _as_matrix("queries", queries)
    xb = _as_matrix("database", database)
    query_rows = np.asarray(query_rows, dtype=np.int64)
    if query_rows.shape != (len(xq),):
        raise ValueError(f"knn_graph: query_rows must have shape ({len(xq)},), got {query_rows.shape}")
    if len(xb) == 0:
        raise ValueError("knn_graph: database is empty")
    if len(query_rows) and (query_rows.min() < 0 or query_rows.max() >= len(xb)):
        raise ValueError(f"knn_graph: query_rows must index the {len(xb)} database rows")
    if xq.shape[1] != xb.shape[1]:
        raise ValueError(f"knn_graph: queries have dimension {xq.shape[1]} but database has {xb.shape[1]}")
    width = min(k1 + 1, len(xb))
    if ann_index is None:
        return _exact_rows(xq, query_rows, xb, width, metric, block_size, use_gpu)
    if ann_index.ntotal != len(xb) or ann_index.d != xb.shape[1]:
        raise ValueError(
            f"knn_graph: ann_index holds {ann_index.ntotal} vectors of dimension {ann_index.d}, "
            f"but the database is {xb.shape}"
        )
    scores, idx = ann_index.search(_prepared("queries", xq, metric), width)
    dist = _scores_to_distances(scores, metric)
    out_idx, out_dist, n_valid = _ordered(idx, np.where(idx < 0, np.inf, dist), query_rows, width)
    short = np.flatnonzero(n_valid < width)
    if len(short):
        logger.info("knn_graph: the index found fewer than %d items for %d row(s); searching them exactly",
                    width, len(short))
        out_idx[short], out_dist[short] = _exact_rows(
            xq[short], query_rows[short], xb, width, metric, block_size, use_gpu
        )
    return out_idx, out_dist


def knn_graph(
    embeddings: np.ndarray,
    k1: int,
    metric: str = "cosine",
    index: str = "exact",
    index_params: dict[str, Any] | None = None,
    block_size: int = 4096,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k1-NN graph of ``embeddings`` with each item first in its own row (mpn-reproduction Sec. 3.4).

    Args:
        embeddings: (N, d) vectors, the queries and the database.
        k1: neighbours per row besides the item itself (paper and DESIGN.md default: 30).
        metric: ``"cosine"`` or ``"euclidean"`` (module docstring).
        index: ``"exact"``, ``"ivf"`` or ``"hnsw"`` (``build_ann_index``).
        index_params: parameters of an approximate index (``IVF_DEFAULTS`` / ``HNSW_DEFAULTS``).
        block_size: queries per faiss call (exact search).
        use_gpu: faiss GPU for exact and IVF search; ``None``: when faiss sees a GPU.

    Returns:
        ``(neighbor_idx, distances)``: int64 and float32, (N, min(k1 + 1, N)); see ``knn_graph_rows``.
    """
    if index not in INDEX_KINDS:
        raise ValueError(f"knn_graph: unknown index {index!r}; expected one of: {', '.join(INDEX_KINDS)}")
    if index == "exact" and index_params:
        raise ValueError(f"knn_graph: index='exact' takes no index_params, got {sorted(index_params)}")
    x = _as_matrix("embeddings", embeddings)
    ann = None if index == "exact" else build_ann_index(x, metric, index, index_params, use_gpu)
    return knn_graph_rows(x, np.arange(len(x)), x, k1, metric, ann, block_size, use_gpu)


def knn_recall(approx_idx: np.ndarray, exact_idx: np.ndarray) -> float:
    """Fraction of the exact neighbours that an approximate graph found (mpn-reproduction Sec. 3.4).

    Rows are matched by position (row i of both is the same query); -1 entries are ignored. Pass
    columns ``1:`` of both graphs to leave out the query itself, which every row contains.

    Args:
        approx_idx: (n, ka) neighbours from an approximate index.
        exact_idx: (n, ke) neighbours from exact search.

    Returns:
        ``sum_i |A_i & E_i| / sum_i |E_i|``; 1.0 when there is no exact neighbour.
    """
    approx_idx = np.asarray(approx_idx)
    exact_idx = np.asarray(exact_idx)
    if approx_idx.ndim != 2 or exact_idx.ndim != 2 or len(approx_idx) != len(exact_idx):
        raise ValueError(
            f"knn_recall: expected two 2-D arrays with the same number of rows, got {approx_idx.shape} "
            f"and {exact_idx.shape}"
        )
    valid = exact_idx >= 0
    found = (exact_idx[:, :, None] == approx_idx[:, None, :]).any(axis=2) & valid
    total = int(valid.sum())
    return float(found.sum() / total) if total else 1.0


def shard_bounds(n: int, n_shards: int) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges splitting ``n`` rows into at most ``n_shards`` near-equal shards.

    For sharding the queries of ``knn_graph_rows`` / ``reciprocal_batches`` over Ray tasks
    (RAY_NOTES.md "Distributed kNN"); no shard is empty and sizes differ by at most one.
    """
    if n < 0 or n_shards < 1:
        raise ValueError(f"shard_bounds: need n >= 0 and n_shards >= 1, got n={n}, n_shards={n_shards}")
    n_shards = min(n_shards, n)
    if n_shards == 0:
        return []
    edges = [n * i // n_shards for i in range(n_shards + 1)]
    return list(zip(edges[:-1], edges[1:]))
