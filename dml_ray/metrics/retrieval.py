"""Retrieval metrics: Recall@K, MAP@R, NMI (DESIGN.md "Evaluation protocols").

Hand-written rather than pytorch-metric-learning's ``AccuracyCalculator``: PML finds the query's
self-match by position (PML 2.x: query row i is taken to be reference row i; older releases dropped
the first neighbour), which holds only when the query set *is* the reference set in the same order,
and the first-neighbour rule breaks under ties and exact duplicates. Here the self-match is removed by
id (``dml_ray.retrieval.search.self_excluded_columns``), so a slice of queries can be searched
against the whole database.

The search and the metrics are split so the search shards: each shard calls
``neighbor_labels_for`` on a slice of queries (width ``search_width(ks, n_relevant)``), and the
driver concatenates the label matrices and calls ``metrics_from_neighbors``. ``evaluate_retrieval``
does both in one process.

Metric rows are dicts ``{"metric": str, "k": int | None, "value": float}`` (the ``metrics`` table
of DESIGN.md "Tables" without run_id / stage / split, which the caller adds).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import faiss
import numpy as np
from sklearn.metrics import normalized_mutual_info_score

from dml_ray.retrieval.search import locate_ids, search_excluding_self

logger = logging.getLogger(__name__)


def _as_labels(name: str, labels: np.ndarray, n: int | None = None) -> np.ndarray:
    """``labels`` as a 1-D array, of length ``n`` when given."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or (n is not None and len(labels) != n):
        expected = "(n,)" if n is None else f"({n},)"
        raise ValueError(f"{name}: expected shape {expected}, got {labels.shape}")
    return labels


def _neighbor_matrix(query_labels: np.ndarray, neighbor_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(query_labels (nq,), neighbor_labels (nq, w))`` with nq >= 1."""
    neighbor_labels = np.asarray(neighbor_labels)
    if neighbor_labels.ndim != 2:
        raise ValueError(f"neighbor_labels: expected a 2-D (nq, k) array, got shape {neighbor_labels.shape}")
    query_labels = _as_labels("query_labels", query_labels, neighbor_labels.shape[0])
    if len(query_labels) == 0:
        raise ValueError("retrieval metrics: no queries")
    return query_labels, neighbor_labels


def _validated_ks(ks: Sequence[int]) -> list[int]:
    """``ks`` as a sorted list of distinct positive ints."""
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks: expected a non-empty list of positive ints, got {ks}")
    return ks


def recall_at_k(query_labels: np.ndarray, neighbor_labels: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Recall@K: fraction of queries with a same-label item among their first K neighbours.

    ``R@K = (1/nq) sum_q 1[exists i <= K: y(n_q,i) = y_q]`` (Song et al., "Deep Metric Learning via
    Lifted Structured Feature Embedding", CVPR 2016; the protocol of the papers in ``papers/``).
    Every query counts: one with no same-label item in the database is a miss at every K.

    Args:
        query_labels: (nq,) labels.
        neighbor_labels: (nq, >= max(ks)) labels of each query's neighbours, nearest first,
            the query itself excluded.
        ks: the K values.
    """
    query_labels, neighbor_labels = _neighbor_matrix(query_labels, neighbor_labels)
    ks = _validated_ks(ks)
    if neighbor_labels.shape[1] < ks[-1]:
        raise ValueError(
            f"recall_at_k: neighbor_labels has {neighbor_labels.shape[1]} columns, K={ks[-1]} needs that many"
        )
    hits = neighbor_labels[:, : ks[-1]] == query_labels[:, None]
    first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1), ks[-1])
    return {k: float((first_hit < k).mean()) for k in ks}


def map_at_r(
    query_labels: np.ndarray, neighbor_labels: np.ndarray, n_relevant: np.ndarray
) -> tuple[float, int]:
    """MAP@R of Musgrave, Belongie, Lim, "A Metric Learning Reality Check" (ECCV 2020).

    For a query with R relevant database items (same label, query itself excluded):
    ``AP@R = (1/R) sum_{i=1..R} P(i) rel(i)``, with ``P(i)`` the precision among the first i
    neighbours and ``rel(i) = 1`` when neighbour i is relevant; MAP@R is its mean over queries.
    Queries with R = 0 have no defined AP@R and are left out.

    Args:
        query_labels: (nq,) labels.
        neighbor_labels: (nq, >= max R) neighbour labels, nearest first, query itself excluded.
        n_relevant: (nq,) R of each query (``relevant_counts``, possibly capped by the caller).

    Returns:
        ``(MAP@R, number of queries left out because R = 0)``; MAP@R is NaN when all are.
    """
    query_labels, neighbor_labels = _neighbor_matrix(query_labels, neighbor_labels)
    r = np.asarray(n_relevant)
    if r.shape != query_labels.shape or (r < 0).any():
        raise ValueError(
            f"map_at_r: n_relevant must be ({len(query_labels)},) non-negative counts, got shape {r.shape}"
        )
    valid = r > 0
    n_excluded = int((~valid).sum())
    if not valid.any():
        return float("nan"), n_excluded
    r, query_labels, neighbor_labels = r[valid], query_labels[valid], neighbor_labels[valid]
    max_r = int(r.max())
    if neighbor_labels.shape[1] < max_r:
        raise ValueError(
            f"map_at_r: neighbor_labels has {neighbor_labels.shape[1]} columns, "
            f"the largest R={max_r} needs that many"
        )
    rank = np.arange(1, max_r + 1)
    relevant = (neighbor_labels[:, :max_r] == query_labels[:, None]) & (rank[None, :] <= r[:, None])
    precision = np.cumsum(relevant, axis=1, dtype=np.int64) / rank[None, :]
    average_precision = np.where(relevant, precision, 0.0).sum(axis=1) / r
    return float(average_precision.mean()), n_excluded


def relevant_counts(
    query_labels: np.ndarray, query_ids: np.ndarray, db_labels: np.ndarray, db_ids: np.ndarray
) -> np.ndarray:
    """R of each query: database items with its label, minus the query itself when it is in the database.

    Returns:
        (nq,) int64 counts.
    """
    query_labels = _as_labels("query_labels", query_labels)
    query_ids = _as_labels("query_ids", query_ids, len(query_labels))
    db_labels = _as_labels("db_labels", db_labels)
    db_ids = _as_labels("db_ids", db_ids, len(db_labels))
    classes, class_sizes = np.unique(db_labels, return_counts=True)
    # locate_ids gives -1 for a label absent from the database: index the appended 0.
    counts = np.append(class_sizes, 0)[locate_ids(query_labels, classes)]
    self_row = locate_ids(query_ids, db_ids)
    in_db = self_row >= 0
    if (db_labels[self_row[in_db]] != query_labels[in_db]).any():
        raise ValueError("relevant_counts: some query ids occur in the database with a different label")
    return counts.astype(np.int64) - in_db


def search_width(ks: Sequence[int], n_relevant: np.ndarray | None = None, max_r: int | None = None) -> int:
    """Neighbours to retrieve per query: ``max(max(ks), max R)``, with R capped at ``max_r``.

    MAP@R needs the full R neighbours of every query; for very large classes pass ``max_r`` (the
    metric is then reported as ``map_at_r_capped`` with ``k = max_r``). ``n_relevant=None``: no MAP@R.
    """
    width = _validated_ks(ks)[-1]
    if n_relevant is not None and len(n_relevant) > 0:
        r = int(np.max(n_relevant))
        width = max(width, r if max_r is None else min(r, max_r))
    return width


def neighbor_labels_for(
    query_emb: np.ndarray,
    query_ids: np.ndarray,
    db_emb: np.ndarray,
    db_labels: np.ndarray,
    db_ids: np.ndarray,
    k: int,
    metric: str = "cosine",
    block_size: int = 4096,
    use_gpu: bool | None = None,
) -> np.ndarray:
    """(nq, k) labels of each query's k nearest database items, the query itself excluded by id.

    The search half of ``evaluate_retrieval``, run per query shard; see
    ``dml_ray.retrieval.search.search_excluding_self`` for metric and score conventions.
    """
    db_labels = _as_labels("db_labels", db_labels, len(db_emb))
    _, indices = search_excluding_self(query_emb, query_ids, db_emb, db_ids, k, metric, block_size, use_gpu)
    if indices.shape[1] < k:
        raise ValueError(
            f"neighbor_labels_for: only {indices.shape[1]} database candidates per query, fewer than "
            f"k={k}; use smaller ks (or max_r) for this database"
        )
    return db_labels[indices]


def metrics_from_neighbors(
    query_labels: np.ndarray,
    neighbor_labels: np.ndarray,
    n_relevant: np.ndarray | None,
    ks: Sequence[int],
    max_r: int | None = None,
) -> list[dict]:
    """Metric rows from the neighbour label matrix of all queries (the driver half of the evaluation).

    Rows: ``recall`` (k = K) for each K (``recall_at_k``); unless ``n_relevant`` is None,
    ``map_at_r`` (k = None; ``map_at_r`` formula) or, with ``max_r``, ``map_at_r_capped``
    (k = max_r; R replaced by min(R, max_r)), and ``map_at_r_excluded_queries`` (queries with R = 0);
    ``n_queries``.

    Args:
        query_labels: (nq,) labels.
        neighbor_labels: (nq, search_width(ks, n_relevant, max_r)) from ``neighbor_labels_for``.
        n_relevant: (nq,) from ``relevant_counts``, or None to skip MAP@R.
        ks: Recall@K values.
        max_r: optional cap on R for MAP@R.
    """
    rows = [
        {"metric": "recall", "k": k, "value": value}
        for k, value in recall_at_k(query_labels, neighbor_labels, ks).items()
    ]
    if n_relevant is not None:
        if max_r is not None and max_r < 1:
            raise ValueError(f"max_r: expected a positive int or None, got {max_r}")
        r = np.asarray(n_relevant) if max_r is None else np.minimum(n_relevant, max_r)
        value, n_excluded = map_at_r(query_labels, neighbor_labels, r)
        rows.append(
            {"metric": "map_at_r" if max_r is None else "map_at_r_capped", "k": max_r, "value": value}
        )
        rows.append({"metric": "map_at_r_excluded_queries", "k": None, "value": float(n_excluded)})
    rows.append({"metric": "n_queries", "k": None, "value": float(len(query_labels))})
    return rows


def nmi(
    embeddings: np.ndarray, labels: np.ndarray, n_clusters: int | None = None, seed: int = 0, niter: int = 20
) -> float:
    """NMI between class labels and k-means clusters of ``embeddings``.

    ``NMI(Y, C) = I(Y; C) / ((H(Y) + H(C)) / 2)`` (arithmetic mean, sklearn's default; Manning et al.,
    "Introduction to Information Retrieval", 2008, Sec. 16.3), with C from faiss k-means on all
    points (no subsampling), k = number of classes unless ``n_clusters`` is given, seeded.
    """
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ValueError(f"nmi: embeddings must be a finite 2-D (n, d) array, got shape {x.shape}")
    labels = _as_labels("labels", labels, len(x))
    n_clusters = len(np.unique(labels)) if n_clusters is None else n_clusters
    if not 1 <= n_clusters <= len(x):
        raise ValueError(f"nmi: n_clusters must be in [1, {len(x)}] (number of points), got {n_clusters}")
    kmeans = faiss.Kmeans(
        x.shape[1],
        n_clusters,
        niter=niter,
        seed=seed,
        min_points_per_centroid=1,
        max_points_per_centroid=len(x),
    )
    kmeans.train(x)
    _, clusters = kmeans.index.search(x, 1)
    return float(normalized_mutual_info_score(labels, clusters[:, 0]))


def evaluate_retrieval(
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    query_ids: np.ndarray,
    db_emb: np.ndarray,
    db_labels: np.ndarray,
    db_ids: np.ndarray,
    ks: Sequence[int],
    metric: str = "cosine",
    with_map_at_r: bool = True,
    with_nmi: bool = True,
    block_size: int = 4096,
    seed: int = 0,
    max_r: int | None = None,
    use_gpu: bool | None = None,
) -> list[dict]:
    """Recall@K, MAP@R, NMI of one query / database split in one process.

    Equals ``neighbor_labels_for`` on all queries followed by ``metrics_from_neighbors``, plus an
    ``nmi`` row (k = None) computed on the evaluation set: the queries and the database items that
    are not queries, L2-normalised first when ``metric="cosine"``. For CUB / Cars / SOP pass the
    test set as both queries and database; for In-Shop the query and gallery sets.
    """
    query_labels = _as_labels("query_labels", query_labels, len(query_emb))
    db_labels = _as_labels("db_labels", db_labels, len(db_emb))
    n_relevant = relevant_counts(query_labels, query_ids, db_labels, db_ids) if with_map_at_r else None
    width = search_width(ks, n_relevant, max_r)
    logger.info(
        "evaluate_retrieval: %d queries, %d database items, %d neighbours each",
        len(query_labels),
        len(db_labels),
        width,
    )
    neighbor_labels = neighbor_labels_for(
        query_emb, query_ids, db_emb, db_labels, db_ids, width, metric, block_size, use_gpu
    )
    rows = metrics_from_neighbors(query_labels, neighbor_labels, n_relevant, ks, max_r)
    if with_nmi:
        db_only = locate_ids(db_ids, query_ids) < 0
        embeddings = np.concatenate([np.asarray(query_emb), np.asarray(db_emb)[db_only]]).astype(np.float32)
        if metric == "cosine":
            embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
        labels = np.concatenate([query_labels, db_labels[db_only]])
        rows.append({"metric": "nmi", "k": None, "value": nmi(embeddings, labels, seed=seed)})
    return rows
