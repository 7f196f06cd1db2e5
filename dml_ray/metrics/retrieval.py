"""Retrieval metrics: Recall@K, MAP@R, NMI (DESIGN.md "Evaluation protocols").

Hand-written rather than pytorch-metric-learning's ``AccuracyCalculator``: PML finds the query's
self-match by position (PML 2.x: query row i is taken to be reference row i; older releases dropped
the first neighbour), which holds only when the query set *is* the reference set in the same order,
and the first-neighbour rule breaks under ties and exact duplicates. Here the self-match is removed by
id (``dml_ray.retrieval.search.self_excluded_columns``), so a slice of queries can be searched
against the whole database.

The search and the metrics are split so the search shards: each shard calls ``query_statistics``
on a slice of queries (width ``search_width(ks, n_relevant)``), which reduces every block of
neighbours to two numbers per query as soon as it is found (rank of the first same-label neighbour,
AP@R), and the driver concatenates them and calls ``metrics_from_statistics``: the (nq, width)
neighbour matrices never exist as a whole. ``neighbor_labels_for`` + ``metrics_from_neighbors``
is the same computation from an explicit label matrix. ``evaluate_retrieval`` does it all in one
process.

Every metric is a function of the rows (id, embedding, label), not of their order: the rows are put
in id order first, so distance ties, k-means' seeded initialisation and float summation see the
same sequence whatever order the embeddings were written in.

Metric rows are dicts ``{"metric": str, "k": int | None, "value": float}`` (the ``metrics`` table
of DESIGN.md "Tables" without run_id / stage / split, which the caller adds).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import faiss
import numpy as np

from dml_ray.retrieval.search import excluding_self_blocks, locate_ids, search_excluding_self, self_rows

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
    _check_width("recall_at_k", neighbor_labels, ks[-1])
    return _recalls(first_relevant_rank(query_labels, neighbor_labels, ks[-1]), ks)


def first_relevant_rank(query_labels: np.ndarray, neighbor_labels: np.ndarray, max_k: int) -> np.ndarray:
    """(nq,) 0-based rank of each query's first same-label neighbour among its first ``max_k``; ``max_k`` if none."""
    hits = neighbor_labels[:, :max_k] == query_labels[:, None]
    return np.where(hits.any(axis=1), hits.argmax(axis=1), max_k)


def _recalls(first_rank: np.ndarray, ks: list[int]) -> dict[int, float]:
    return {k: float((first_rank < k).mean()) for k in ks}


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
    r = _checked_counts(n_relevant, len(query_labels))
    return _mean_average_precision(average_precision_at_r(query_labels, neighbor_labels, r))


def _checked_counts(n_relevant: np.ndarray, nq: int) -> np.ndarray:
    r = np.asarray(n_relevant)
    if r.shape != (nq,) or (r < 0).any():
        raise ValueError(f"map_at_r: n_relevant must be ({nq},) non-negative counts, got shape {r.shape}")
    return r


def _check_width(name: str, neighbor_labels: np.ndarray, k: int) -> None:
    if neighbor_labels.shape[1] < k:
        raise ValueError(f"{name}: neighbor_labels has {neighbor_labels.shape[1]} columns, K={k} needs that many")


def average_precision_at_r(query_labels: np.ndarray, neighbor_labels: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """(nq,) AP@R of each query (``map_at_r`` formula), NaN where R = 0."""
    average_precision = np.full(len(query_labels), np.nan)
    valid = n_relevant > 0
    if not valid.any():
        return average_precision
    r, query_labels, neighbor_labels = n_relevant[valid], query_labels[valid], neighbor_labels[valid]
    max_r = int(r.max())
    if neighbor_labels.shape[1] < max_r:
        raise ValueError(
            f"map_at_r: neighbor_labels has {neighbor_labels.shape[1]} columns, "
            f"the largest R={max_r} needs that many"
        )
    rank = np.arange(1, max_r + 1)
    relevant = (neighbor_labels[:, :max_r] == query_labels[:, None]) & (rank[None, :] <= r[:, None])
    precision = np.cumsum(relevant, axis=1, dtype=np.int64) / rank[None, :]
    average_precision[valid] = np.where(relevant, precision, 0.0).sum(axis=1) / r
    return average_precision


def _mean_average_precision(average_precision: np.ndarray) -> tuple[float, int]:
    """(MAP@R over the queries with R > 0, number of queries with R = 0)."""
    valid = ~np.isnan(average_precision)
    n_excluded = int((~valid).sum())
    return (float(average_precision[valid].mean()) if valid.any() else float("nan")), n_excluded


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


def query_statistics(
    query_emb: np.ndarray,
    query_rows: np.ndarray,
    query_labels: np.ndarray,
    n_relevant: np.ndarray | None,
    db_emb: np.ndarray,
    db_labels: np.ndarray,
    width: int,
    max_k: int,
    metric: str = "cosine",
    block_size: int = 4096,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-query statistics of a query shard, each search block reduced as soon as it is found.

    Args:
        query_emb: (nq, d); query_rows: (nq,) database row of each query or -1 (``self_rows``);
            query_labels: (nq,).
        n_relevant: (nq,) R of each query, already capped by the caller's ``max_r``; None: no MAP@R.
        db_emb, db_labels: the database.
        width: neighbours per query (``search_width``); max_k: the largest Recall@K.

    Returns:
        ``(first_rank, average_precision)``: ``first_relevant_rank`` over the first ``max_k``
        neighbours and ``average_precision_at_r`` (None without ``n_relevant``), both (nq,).
    """
    query_labels = _as_labels("query_labels", query_labels, len(query_emb))
    db_labels = _as_labels("db_labels", db_labels, len(db_emb))
    first_rank = np.empty(len(query_labels), dtype=np.int64)
    average_precision = None if n_relevant is None else np.empty(len(query_labels))
    for rows, _, indices in excluding_self_blocks(query_emb, query_rows, db_emb, width, metric, block_size, use_gpu):
        if indices.shape[1] < width:
            raise ValueError(
                f"retrieval metrics: only {indices.shape[1]} database candidates per query, fewer than "
                f"k={width}; use smaller ks (or max_r) for this database"
            )
        labels = db_labels[indices]
        first_rank[rows] = first_relevant_rank(query_labels[rows], labels, max_k)
        if average_precision is not None:
            average_precision[rows] = average_precision_at_r(query_labels[rows], labels, n_relevant[rows])
    return first_rank, average_precision


def metrics_from_statistics(
    first_rank: np.ndarray, average_precision: np.ndarray | None, ks: Sequence[int], max_r: int | None = None
) -> list[dict]:
    """Metric rows from the per-query statistics of all queries (``query_statistics``, shards concatenated).

    Rows: ``recall`` (k = K) for each K (``recall_at_k``); unless ``average_precision`` is None,
    ``map_at_r`` (k = None; ``map_at_r`` formula) or, with ``max_r``, ``map_at_r_capped``
    (k = max_r; R replaced by min(R, max_r)), and ``map_at_r_excluded_queries`` (queries with R = 0);
    ``n_queries``.
    """
    if len(first_rank) == 0:
        raise ValueError("retrieval metrics: no queries")
    rows = [{"metric": "recall", "k": k, "value": value} for k, value in _recalls(first_rank, _validated_ks(ks)).items()]
    if average_precision is not None:
        value, n_excluded = _mean_average_precision(average_precision)
        rows.append({"metric": "map_at_r" if max_r is None else "map_at_r_capped", "k": max_r, "value": value})
        rows.append({"metric": "map_at_r_excluded_queries", "k": None, "value": float(n_excluded)})
    rows.append({"metric": "n_queries", "k": None, "value": float(len(first_rank))})
    return rows


def capped_relevant_counts(n_relevant: np.ndarray | None, max_r: int | None) -> np.ndarray | None:
    """R of each query with the optional cap ``max_r`` applied (``search_width``)."""
    if n_relevant is None or max_r is None:
        return n_relevant
    if max_r < 1:
        raise ValueError(f"max_r: expected a positive int or None, got {max_r}")
    return np.minimum(n_relevant, max_r)


def metrics_from_neighbors(
    query_labels: np.ndarray,
    neighbor_labels: np.ndarray,
    n_relevant: np.ndarray | None,
    ks: Sequence[int],
    max_r: int | None = None,
) -> list[dict]:
    """Metric rows (``metrics_from_statistics``) from the neighbour label matrix of all queries.

    Args:
        query_labels: (nq,) labels.
        neighbor_labels: (nq, search_width(ks, n_relevant, max_r)) from ``neighbor_labels_for``.
        n_relevant: (nq,) from ``relevant_counts``, or None to skip MAP@R.
        ks: Recall@K values.
        max_r: optional cap on R for MAP@R.
    """
    query_labels, neighbor_labels = _neighbor_matrix(query_labels, neighbor_labels)
    ks = _validated_ks(ks)
    _check_width("recall_at_k", neighbor_labels, ks[-1])
    r = capped_relevant_counts(n_relevant, max_r)
    average_precision = None
    if r is not None:
        average_precision = average_precision_at_r(query_labels, neighbor_labels, _checked_counts(r, len(query_labels)))
    return metrics_from_statistics(first_relevant_rank(query_labels, neighbor_labels, ks[-1]), average_precision,
                                   ks, max_r)


def nmi(
    embeddings: np.ndarray,
    labels: np.ndarray,
    n_clusters: int | None = None,
    seed: int = 0,
    niter: int = 20,
    ids: np.ndarray | None = None,
) -> float:
    """NMI between class labels and k-means clusters of ``embeddings``.

    ``NMI(Y, C) = I(Y; C) / ((H(Y) + H(C)) / 2)`` (arithmetic mean, sklearn's default; Manning et al.,
    "Introduction to Information Retrieval", 2008, Sec. 16.3), with C from faiss k-means on all
    points (no subsampling), k = number of classes unless ``n_clusters`` is given, seeded.

    k-means' seeded initialisation picks rows by position, so the clusters depend on row order: pass
    ``ids`` (unique, one per row) and the rows are put in id order first, which makes the value a
    function of the (id, embedding, label) rows alone.
    """
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ValueError(f"nmi: embeddings must be a finite 2-D (n, d) array, got shape {x.shape}")
    labels = _as_labels("labels", labels, len(x))
    if ids is not None:
        ids = _as_labels("ids", ids, len(x))
        if not (ids[:-1] < ids[1:]).all():  # already in id order: no copy of the embeddings
            order = np.argsort(ids, kind="stable")
            x, labels = x[order], labels[order]
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
    # imported here: the search shards' Ray workers import this module, and sklearn costs them seconds each
    from sklearn.metrics import normalized_mutual_info_score


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

    Equals ``query_statistics`` on all queries followed by ``metrics_from_statistics``, plus an
    ``nmi`` row (k = None) computed on the evaluation set: the queries and the database items that
    are not queries, L2-normalised first when ``metric="cosine"``. For CUB / Cars / SOP pass the
    test set as both queries and database; for In-Shop the query and gallery sets.
    """
    query_labels = _as_labels("query_labels", query_labels, len(query_emb))
    query_ids = _as_labels("query_ids", query_ids, len(query_emb))
    db_labels = _as_labels("db_labels", db_labels, len(db_emb))
    db_ids = _as_labels("db_ids", db_ids, len(db_emb))
    # id order first: ties and k-means then see the same rows in the same order whatever order they came in
    q_order, db_order = np.argsort(query_ids, kind="stable"), np.argsort(db_ids, kind="stable")
    query_emb, query_labels, query_ids = np.asarray(query_emb)[q_order], query_labels[q_order], query_ids[q_order]
    db_emb, db_labels, db_ids = np.asarray(db_emb)[db_order], db_labels[db_order], db_ids[db_order]
    n_relevant = relevant_counts(query_labels, query_ids, db_labels, db_ids) if with_map_at_r else None
    width = search_width(ks, n_relevant, max_r)
    logger.info(
        "evaluate_retrieval: %d queries, %d database items, %d neighbours each",
        len(query_labels),
        len(db_labels),
        width,
    )
    first_rank, average_precision = query_statistics(
        query_emb, self_rows(query_ids, db_ids), query_labels, capped_relevant_counts(n_relevant, max_r), db_emb,
        db_labels, width, _validated_ks(ks)[-1], metric, block_size, use_gpu,
    )
    rows = metrics_from_statistics(first_rank, average_precision, ks, max_r)
    if with_nmi:
        db_only = locate_ids(db_ids, query_ids) < 0
        embeddings = np.concatenate([query_emb, db_emb[db_only]]).astype(np.float32)
        if metric == "cosine":
            embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
        labels = np.concatenate([query_labels, db_labels[db_only]])
        ids = np.concatenate([query_ids, db_ids[db_only]])
        rows.append({"metric": "nmi", "k": None, "value": nmi(embeddings, labels, seed=seed, ids=ids)})
    return rows
