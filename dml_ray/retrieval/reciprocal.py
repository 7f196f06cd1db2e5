"""Test-time MPN batches from reciprocal k-nearest neighbours (intra-batch-mpn-reproduction Sec. 3.4).

Definitions, on the graph of ``dml_ray.retrieval.knn_graph`` (row q: q itself, then its nearest
items by ascending (distance, index)):

- N(q, k): the first ``k + 1`` entries of row q, i.e. q and its k nearest other items, as in the
  authors' code (``sorted_dist[i, :k1 + 1]``, k = k1 = 30) and the k-reciprocal re-ranking code
  it follows.
- R(q, k) = {u in N(q, k) : q in N(u, k)} (Sec. 3.4, first equation). q is always in it.
- half(k) = round(k / 2), rounding halves to even: Python's ``round`` and the authors'
  ``int(np.around(k1 / 2))`` agree (k = 30 -> 15, 5 -> 2, 7 -> 4).
- The expanded set: R(q, k) united with R(g, half(k)) for every g in R(q, k) with
  |R(q, k) & R(g, half(k))| > alpha |R(g, half(k))|, alpha = 2/3 (Sec. 3.4, second equation).
  The candidates g and the overlap both use R(q, k) itself, never the set expanded so far
  (the equation's union runs over g in N_r,q^k). The comparison is strict, as in DESIGN.md and
  the authors' and re-ranking code; the paper's equation prints ">=".
- The batch of q: the expanded set sorted by distance to q, cut to ``batch_size``, then padded
  with q's nearest neighbours not yet in it, in graph order (the authors' ``KReciprocalSampler``).
  Ties in distance go to the smaller index, and q itself comes first.

Expanded members outside q's graph row have no stored distance to q; it is computed from the
embeddings with the graph's metric (``1 - cos`` or squared L2 from float32 row-wise dot
products, which may differ from faiss's GEMM result in the last bits).

Everything is computed from the graph as sparse matrices (scipy CSR), never an N x N dense
matrix: with A the 0/1 adjacency of the lists N(., k), R = A * A^T (element-wise); with Rh the
same for half(k), which is symmetric, the overlaps are the entries of R @ Rh on the pattern of R,
and the expanded sets are the pattern of R + Accept @ Rh. Query rows are processed in blocks, and
any subset of rows can be asked for (a Ray task's shard), given the whole graph.
"""
from __future__ import annotations

import logging
from functools import cached_property

import numpy as np
import scipy.sparse as sp

from dml_ray.retrieval.search import METRICS, _as_matrix

logger = logging.getLogger(__name__)

ALPHA = 2.0 / 3.0  # mpn-reproduction Sec. 3.4: "The authors set alpha to 2/3"
_PAIR_CHUNK = 1 << 12  # pairs per chunk of the embedding-based distance computation


def half_k(k: int) -> int:
    """round(k / 2) with halves to even, the size of the expansion sets (mpn-reproduction Sec. 3.4)."""
    return round(k / 2)


def _validated_graph(neighbor_idx: np.ndarray, k: int) -> np.ndarray:
    """``neighbor_idx`` checked as a knn_graph table (N, >= k+1): in range, self first, no repeats."""
    table = np.asarray(neighbor_idx)
    if table.ndim != 2 or not np.issubdtype(table.dtype, np.integer):
        raise ValueError(
            f"reciprocal kNN: neighbor_idx must be a 2-D integer array, got {table.dtype} {table.shape}"
        )
    n, width = table.shape
    if k < 1 or width < k + 1:
        raise ValueError(
            f"reciprocal kNN: need 1 <= k <= {width - 1} for a graph with {width} columns, got k={k}; "
            f"build the graph with k1 >= k"
        )
    if n and (table.min() < 0 or table.max() >= n):
        raise ValueError(f"reciprocal kNN: neighbor_idx holds indices outside [0, {n}) (or -1 padding)")
    if not np.array_equal(table[:, 0], np.arange(n)):
        raise ValueError("reciprocal kNN: column 0 of neighbor_idx must be the row itself (use knn_graph)")
    ordered = np.sort(table, axis=1)
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        raise ValueError("reciprocal kNN: a row of neighbor_idx lists the same item twice")
    return table.astype(np.int64, copy=False)


def _validated_rows(rows: np.ndarray | None, n: int) -> np.ndarray:
    """Query rows as int64 indices into the graph (default: all)."""
    if rows is None:
        return np.arange(n, dtype=np.int64)
    rows = np.asarray(rows)
    if rows.ndim != 1 or not (np.issubdtype(rows.dtype, np.integer) or rows.size == 0):
        raise ValueError(f"reciprocal kNN: rows must be a 1-D integer array, got {rows.dtype} {rows.shape}")
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"reciprocal kNN: rows must index the {n} graph rows")
    return rows.astype(np.int64, copy=False)


def _adjacency(lists: np.ndarray, n_cols: int, data: np.ndarray) -> sp.csr_matrix:
    """CSR matrix with row i holding ``data[i, j]`` at column ``lists[i, j]``; canonical (sorted)."""
    n, width = lists.shape
    matrix = sp.csr_matrix(
        (data.ravel(), lists.ravel(), np.arange(0, n * width + 1, width)), shape=(n, n_cols)
    )
    matrix.sort_indices()
    return matrix


class _ReciprocalGraph:
    """The sparse matrices of Sec. 3.4 for one graph and one k, shared by all row blocks."""

    def __init__(self, table: np.ndarray, k: int) -> None:
        n, width = len(table), k + 1
        # A: data = 1 + position in the row, so reciprocal entries keep their list position.
        positions = np.broadcast_to(np.arange(1, width + 1, dtype=np.int32), (n, width))
        self.lists = _adjacency(table[:, :width], n, positions)
        self.lists_t = self.lists.T.tocsr()
        self.lists_t.data[:] = 1
        self._half_lists = table[:, : half_k(k) + 1]

    @cached_property
    def half(self) -> sp.csr_matrix:
        """R(., half(k)) as a symmetric 0/1 N x N matrix."""
        n, half_width = self._half_lists.shape
        half = _adjacency(self._half_lists, n, np.ones((n, half_width), np.int32))
        return half.multiply(half.T.tocsr()).tocsr()

    @cached_property
    def half_sizes(self) -> np.ndarray:
        """|R(g, half(k))| for every item g."""
        return np.diff(self.half.indptr)

    def reciprocal(self, rows: np.ndarray) -> sp.csr_matrix:
        """R(q, k) of ``rows`` (len(rows) x N); data = 1 + the member's position in N(q, k)."""
        return self.lists[rows].multiply(self.lists_t[rows]).tocsr()

    def expanded(self, recip: sp.csr_matrix, alpha: float) -> sp.csr_matrix:
        """0/1 pattern of the expanded sets of the rows of ``recip`` (Sec. 3.4, second equation)."""
        recip = recip.copy()
        recip.data[:] = 1
        overlap = (recip @ self.half).multiply(recip).tocsr()  # |R(q,k) & R(g,half)| for g in R(q,k)
        accept = overlap.data > alpha * self.half_sizes[overlap.indices]
        overlap.data = accept.astype(np.int32)
        overlap.eliminate_zeros()
        expanded = (recip + overlap @ self.half).tocsr()
        expanded.sum_duplicates()
        expanded.data[:] = 1
        return expanded


def reciprocal_sets(neighbor_idx: np.ndarray, k: int, rows: np.ndarray | None = None) -> np.ndarray:
    """R(q, k) = {u in N(q, k) : q in N(u, k)} for each query row (mpn-reproduction Sec. 3.4).

    Args:
        neighbor_idx: (N, W) graph from ``knn_graph``, W >= k + 1 (the whole graph, also when
            asking for a shard of rows).
        k: neighbourhood size, the query excluded (N(q, k) has k + 1 entries).
        rows: query rows (default: all N).

    Returns:
        (len(rows), k + 1) int64: the members in graph order (q first), padded with -1.
    """
    table = _validated_graph(neighbor_idx, k)
    rows = _validated_rows(rows, len(table))
    recip = _ReciprocalGraph(table, k).reciprocal(rows).tocoo()
    member = np.zeros((len(rows), k + 1), dtype=bool)
    member[recip.row, recip.data - 1] = True
    # Stable order keeps members in graph order, non-members (-1) after them.
    order = np.argsort(~member, axis=1, kind="stable")
    lists = np.where(member, table[rows, : k + 1], -1)
    return np.take_along_axis(lists, order, axis=1)


def _pair_distances(embeddings: np.ndarray, a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """Distance between rows ``a[i]`` and ``b[i]`` of ``embeddings``, with knn_graph's conventions."""
    out = np.empty(len(a), np.float32)
    for start in range(0, len(a), _PAIR_CHUNK):
        xa = embeddings[a[start : start + _PAIR_CHUNK]]
        xb = embeddings[b[start : start + _PAIR_CHUNK]]
        if metric == "cosine":
            norms = np.sqrt(np.einsum("ij,ij->i", xa, xa) * np.einsum("ij,ij->i", xb, xb))
            if not norms.all():
                raise ValueError("reciprocal_batches: zero embedding(s); cosine distance is undefined for them")
            dist = 1.0 - np.einsum("ij,ij->i", xa, xb) / norms
        else:
            diff = xa - xb
            dist = np.einsum("ij,ij->i", diff, diff)
        out[start : start + len(xa)] = np.maximum(dist, 0.0)
    return out


def _padded(row: np.ndarray, values: np.ndarray, n_rows: int, width: int) -> np.ndarray:
    """(n_rows, width) -1-padded array of ``values``, which are grouped by ``row`` (ascending)."""
    out = np.full((n_rows, width), -1, dtype=np.int64)
    starts = np.searchsorted(row, np.arange(n_rows))
    out[row, np.arange(len(row)) - starts[row]] = values
    return out


def _batch_block(
    graph: _ReciprocalGraph, table: np.ndarray, distances: np.ndarray, embeddings: np.ndarray,
    rows: np.ndarray, batch_size: int, metric: str, alpha: float,
) -> tuple[np.ndarray, np.ndarray]:
    """``reciprocal_batches`` for one block of query rows."""
    n, width = len(rows), table.shape[1]
    graph_rows = table[rows]
    expanded = graph.expanded(graph.reciprocal(rows), alpha)
    # Position of each expanded member in q's graph row: add the 1-based positions of the whole
    # row on top of an offset that marks the expanded members.
    offset = width + 1
    positions = np.broadcast_to(np.arange(1, width + 1, dtype=np.int32), (n, width))
    mixed = (expanded * offset + _adjacency(graph_rows, table.shape[0], positions)).tocsr()
    mixed.sort_indices()  # members ascending within each row: the index tie-break below relies on it
    row = np.repeat(np.arange(n), np.diff(mixed.indptr))
    keep = mixed.data >= offset
    row, member, position = row[keep], mixed.indices[keep].astype(np.int64), mixed.data[keep] - offset
    dist = np.empty(len(member), np.float32)
    stored = position > 0
    dist[stored] = distances[rows[row[stored]], position[stored] - 1]
    outside = ~stored
    if outside.any():
        dist[outside] = _pair_distances(embeddings, rows[row[outside]], member[outside], metric)
    # Sort within each row: q first, then by (distance, index). One uint64 key: row, not-q bit,
    # the bits of the distance (monotone for floats >= 0; "+ 0" turns -0.0 into 0.0); a stable
    # sort keeps the ascending member order among equal keys.
    key = (row.astype(np.uint64) << np.uint64(33)) | ((member != rows[row]).astype(np.uint64) << np.uint64(32))
    key |= (dist + np.float32(0)).view(np.uint32).astype(np.uint64)
    order = np.argsort(key, kind="stable")
    row, member = row[order], member[order]
    counts = np.bincount(row, minlength=n)
    recip_ids = _padded(row, member, n, int(counts.max(initial=0)))

    batch = np.full((n, batch_size), -1, dtype=np.int64)
    take = min(batch_size, recip_ids.shape[1])
    batch[:, :take] = recip_ids[:, :take]
    filled = np.minimum(counts, batch_size)
    # Pad with q's nearest neighbours not yet in the batch, in graph order.
    free = ~(graph_rows[:, :, None] == batch[:, None, :]).any(axis=2)
    rank = np.cumsum(free, axis=1)
    chosen = free & (rank <= (batch_size - filled)[:, None])
    r, c = np.nonzero(chosen)
    batch[r, filled[r] + rank[r, c] - 1] = graph_rows[r, c]
    return recip_ids, batch


def reciprocal_batches(
    neighbor_idx: np.ndarray,
    distances: np.ndarray,
    embeddings: np.ndarray,
    k: int,
    batch_size: int,
    metric: str = "cosine",
    alpha: float = ALPHA,
    rows: np.ndarray | None = None,
    block_size: int = 65536,
) -> tuple[np.ndarray, np.ndarray]:
    """Expanded reciprocal kNN sets and test-time MPN batches (mpn-reproduction Sec. 3.4).

    Args:
        neighbor_idx: (N, W) graph from ``knn_graph`` (the whole graph, also for a shard of rows).
        distances: (N, W) its distances (only the query rows are read).
        embeddings: (N, d) the vectors the graph was built from, for distances between a query and
            expanded members outside its graph row.
        k: reciprocal neighbourhood size (paper: k1 = 30), 1 <= k <= W - 1.
        batch_size: items per batch, 1 <= batch_size <= W (padding comes from the graph row).
        metric: the graph's metric, ``"cosine"`` or ``"euclidean"``.
        alpha: overlap needed to add R(g, half(k)) (paper: 2/3).
        rows: query rows (default: all N).
        block_size: query rows per sparse computation (bounds memory).

    Returns:
        ``(reciprocal_ids, batch_ids)``: int64 arrays with one row per query row.
        ``reciprocal_ids`` (len(rows), m) is the expanded set sorted by distance to q (q first),
        padded with -1 to the longest set; ``batch_ids`` (len(rows), batch_size) is the batch.
    """
    table = _validated_graph(neighbor_idx, k)
    n_items, width = table.shape
    distances = np.asarray(distances)
    if distances.shape != table.shape:
        raise ValueError(f"reciprocal_batches: distances must have shape {table.shape}, got {distances.shape}")
    x = _as_matrix("embeddings", embeddings)
    if len(x) != n_items:
        raise ValueError(f"reciprocal_batches: {len(x)} embeddings for a graph of {n_items} rows")
    if metric not in METRICS:
        raise ValueError(f"reciprocal_batches: unknown metric {metric!r}; expected one of: {', '.join(METRICS)}")
    if not 1 <= batch_size <= width:
        raise ValueError(
            f"reciprocal_batches: batch_size must be in [1, {width}] for a graph with {width} columns "
            f"(padding comes from the graph row); got {batch_size}: build the graph with k1 >= batch_size - 1"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"reciprocal_batches: alpha must be in [0, 1], got {alpha}")
    if block_size < 1:
        raise ValueError(f"reciprocal_batches: block_size must be >= 1, got {block_size}")
    rows = _validated_rows(rows, n_items)
    graph = _ReciprocalGraph(table, k)
    recip_blocks, batch_blocks = [], []
    for start in range(0, len(rows), block_size):
        recip_ids, batch_ids = _batch_block(
            graph, table, distances, x, rows[start : start + block_size], batch_size, metric, alpha
        )
        recip_blocks.append(recip_ids)
        batch_blocks.append(batch_ids)
    longest = max((b.shape[1] for b in recip_blocks), default=0)
    recip = np.full((len(rows), longest), -1, dtype=np.int64)
    start = 0
    for block in recip_blocks:
        recip[start : start + len(block), : block.shape[1]] = block
        start += len(block)
    batches = np.concatenate(batch_blocks) if batch_blocks else np.empty((0, batch_size), np.int64)
    logger.info("reciprocal_batches: %d rows, expanded sets of up to %d items", len(rows), longest)
    return recip, batches
