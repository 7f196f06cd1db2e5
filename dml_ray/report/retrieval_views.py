"""The report's retrieval views, as pure functions of the evaluated split's arrays: each query's top-k under the
evaluate stage's protocol (the query itself excluded by id, ``retrieval.search.search_excluding_self``), the best
and worst queries, per-class Recall@1 and the most-confused class pairs.

Inputs are NumPy arrays in the evaluate stage's canonical row order (image_id order,
``pipelines.evaluate.by_image_id``), so distance ties resolve as they did for the stored metrics.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from dml_ray.metrics.retrieval import first_relevant_rank
from dml_ray.retrieval.search import search_excluding_self


@dataclass
class Neighbours:
    """Each query's nearest database rows, nearest first, itself excluded: ``indices`` (nq, k) into the database
    arrays and their ``scores`` (cosine similarity descending, or squared L2 distance ascending)."""

    indices: np.ndarray
    scores: np.ndarray
    labels: np.ndarray  # (nq, k) database labels of ``indices``


def query_neighbours(query_emb: np.ndarray, query_ids: np.ndarray, db_emb: np.ndarray, db_ids: np.ndarray,
                     db_labels: np.ndarray, k: int, metric: str = "cosine") -> Neighbours:
    """The top ``k`` database rows of every query, the query itself excluded by id (the evaluate stage's search)."""
    scores, indices = search_excluding_self(query_emb, np.asarray(query_ids), db_emb, np.asarray(db_ids), k, metric)
    return Neighbours(indices, scores, np.asarray(db_labels)[indices])


def query_quality(query_labels: np.ndarray, neighbor_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query: precision@k (share of the k neighbours with the query's label, k = the matrix width) and the
    0-based rank of the first same-label neighbour (k when none is among them)."""
    query_labels = np.asarray(query_labels)
    neighbor_labels = np.asarray(neighbor_labels)
    k = neighbor_labels.shape[1]
    precision = (neighbor_labels == query_labels[:, None]).mean(axis=1) if k else np.zeros(len(query_labels))
    return precision, first_relevant_rank(query_labels, neighbor_labels, k)


def best_and_worst(query_ids: np.ndarray, precision: np.ndarray, first_rank: np.ndarray, top1_score: np.ndarray,
                   n: int, higher_is_closer: bool = True,
                   query_labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the ``n`` best and ``n`` worst queries, disjoint (with fewer than 2n queries the best take half).

    Best: highest precision@k, then earliest first correct rank, then the closest top-1 neighbour. Worst: lowest
    precision@k, then latest first correct rank (none among the k counts as k), then the *closest* top-1
    neighbour (a confident mistake before a hesitant one). Remaining ties: image id order. With ``query_labels``
    each list takes one query per class, in that order, before a class repeats (so one easy class does not fill
    the best queries).
    """
    ids = np.asarray(query_ids)
    closeness = np.asarray(top1_score, np.float64) * (1 if higher_is_closer else -1)
    id_rank = np.argsort(np.argsort(ids, kind="stable"), kind="stable")
    # np.lexsort sorts by the last key first
    best = _classes_first(np.lexsort((id_rank, -closeness, first_rank, -precision)), query_labels)
    worst = _classes_first(np.lexsort((id_rank, -closeness, -first_rank, precision)), query_labels)
    chosen_best = best[:min(n, (len(ids) + 1) // 2)]
    taken = set(chosen_best.tolist())
    chosen_worst = np.array([r for r in worst if r not in taken][:n], dtype=np.int64)
    return chosen_best, chosen_worst


def _classes_first(order: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """``order`` re-ranked by each row's occurrence of its class (first of every class, then second, ...),
    stable within an occurrence; unchanged without labels."""
    if labels is None:
        return order
    ranked = np.asarray(labels)[order]
    _, inverse = np.unique(ranked, return_inverse=True)
    occurrence = np.zeros(len(order), np.int64)
    seen: dict[int, int] = {}
    for i, c in enumerate(inverse.tolist()):
        occurrence[i] = seen.get(c, 0)
        seen[c] = occurrence[i] + 1
    return order[np.argsort(occurrence, kind="stable")]


def per_class_recall_at_1(query_labels: np.ndarray, top1_labels: np.ndarray) -> pa.Table:
    """Recall@1 of each query class, worst first (then more queries first, then label): columns label,
    n_queries, n_correct, recall_at_1. The mean of recall_at_1 weighted by n_queries is the overall Recall@1
    (Song et al. CVPR 2016; ``metrics.retrieval.recall_at_k`` with K = 1)."""
    query_labels = np.asarray(query_labels)
    correct = query_labels == np.asarray(top1_labels)
    labels, inverse, counts = np.unique(query_labels, return_inverse=True, return_counts=True)
    n_correct = np.bincount(inverse.reshape(-1), weights=correct, minlength=len(labels)).astype(np.int64)
    recall = n_correct / counts
    order = np.lexsort((labels, -counts, recall))
    return pa.table({"label": pa.array(labels[order], pa.int64()), "n_queries": pa.array(counts[order], pa.int64()),
                     "n_correct": pa.array(n_correct[order], pa.int64()),
                     "recall_at_1": pa.array(recall[order], pa.float64())})


def confused_pairs(query_labels: np.ndarray, top1_labels: np.ndarray, top: int = 10) -> pa.Table:
    """The ``top`` most frequent (query class a, top-1 class b != a) pairs: columns label, retrieved_label,
    count (queries of class a whose nearest neighbour is of class b) and share (count / queries of class a);
    most frequent first, then by labels."""
    query_labels = np.asarray(query_labels, np.int64)
    top1_labels = np.asarray(top1_labels, np.int64)
    wrong = query_labels != top1_labels
    pairs, counts = np.unique(np.stack([query_labels[wrong], top1_labels[wrong]], axis=1), axis=0,
                              return_counts=True)
    pairs = pairs.reshape(-1, 2)
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -counts))[:top]
    classes, class_sizes = np.unique(query_labels, return_counts=True)
    size_of = dict(zip(classes.tolist(), class_sizes.tolist()))
    a, b, c = pairs[order, 0], pairs[order, 1], counts[order]
    return pa.table({"label": pa.array(a, pa.int64()), "retrieved_label": pa.array(b, pa.int64()),
                     "count": pa.array(c, pa.int64()),
                     "share": pa.array([n / size_of[x] for n, x in zip(c.tolist(), a.tolist())], pa.float64())})


def jpeg_thumbnail(data: bytes, size: int = 96, quality: int = 80) -> bytes:
    """The encoded image ``data`` as a JPEG whose longest side is at most ``size`` pixels (aspect kept)."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when it can
        thumb = image.convert("RGB")
    thumb.thumbnail((size, size))
    out = io.BytesIO()
    thumb.save(out, format="JPEG", quality=quality)
    return out.getvalue()
