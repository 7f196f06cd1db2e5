"""The k1-NN graph (dml_ray.retrieval.knn_graph): exact rows under ties, approximate indexes, shards."""
from __future__ import annotations

import numpy as np
import pytest

from dml_ray.retrieval.knn_graph import (
    build_ann_index,
    knn_graph,
    knn_graph_rows,
    knn_recall,
    shard_bounds,
)


def brute_force_graph(x: np.ndarray, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """Squared L2 graph by numpy: the item first, then by (distance, index)."""
    sq = (x * x).sum(axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0).astype(np.float32)
    n = len(x)
    not_self = ~np.eye(n, dtype=bool)
    order = np.lexsort((np.broadcast_to(np.arange(n), (n, n)), dist, not_self), axis=1)[:, : k1 + 1]
    return order, np.where(order == np.arange(n)[:, None], 0.0, np.take_along_axis(dist, order, axis=1))


def clustered(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(10, d))
    return (centres[rng.integers(10, size=n)] + rng.normal(size=(n, d))).astype(np.float32)


def test_exact_graph_breaks_ties_by_index_and_puts_the_item_first() -> None:
    # Integer coordinates: exact distances with many ties, and 30 copies of one point, more than
    # a row holds, so faiss's own choice among the ties would show.
    rng = np.random.default_rng(0)
    x = rng.integers(-2, 3, size=(300, 3)).astype(np.float32)
    x[100:130] = x[7]
    neighbor_idx, distances = knn_graph(x, 10, metric="euclidean")
    expected_idx, expected_dist = brute_force_graph(x, 10)
    np.testing.assert_array_equal(neighbor_idx, expected_idx)
    np.testing.assert_array_equal(distances, expected_dist)
    copies = np.flatnonzero((x == x[7]).all(axis=1))
    assert len(copies) > 11
    np.testing.assert_array_equal(neighbor_idx[120], [120, *copies[copies != 120][:10]])
    assert neighbor_idx.dtype == np.int64 and distances.dtype == np.float32


def test_cosine_distances_and_small_databases() -> None:
    x = np.array([[1, 0], [0, 1], [1, 1], [-1, 0]], dtype=np.float32)
    neighbor_idx, distances = knn_graph(x, 10)  # k1 capped at N - 1
    np.testing.assert_array_equal(neighbor_idx[0], [0, 2, 1, 3])
    np.testing.assert_allclose(distances[0], [0, 1 - np.sqrt(0.5), 1, 2], atol=1e-6)


def test_shards_of_rows_equal_the_whole_graph() -> None:
    x = clustered(500)
    whole = knn_graph(x, 12, metric="euclidean")
    for start, stop in shard_bounds(len(x), 3):
        rows = np.arange(start, stop)
        part = knn_graph_rows(x[rows], rows, x, 12, metric="euclidean")
        np.testing.assert_array_equal(part[0], whole[0][rows])
        np.testing.assert_array_equal(part[1], whole[1][rows])


@pytest.mark.parametrize(
    ("index", "params"), [("ivf", {"nlist": 20, "nprobe": 6}), ("hnsw", {"M": 16, "efSearch": 64})]
)
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_approximate_graphs(index: str, params: dict, metric: str) -> None:
    x = clustered(2000, d=16)
    exact_idx, _ = knn_graph(x, 15, metric=metric)
    approx_idx, approx_dist = knn_graph(x, 15, metric=metric, index=index, index_params=params)
    assert approx_idx.shape == (2000, 16)
    np.testing.assert_array_equal(approx_idx[:, 0], np.arange(2000))
    assert (approx_dist[:, 0] == 0).all() and (np.diff(approx_dist, axis=1) >= 0).all()
    assert knn_recall(approx_idx[:, 1:], exact_idx[:, 1:]) > 0.9


def test_rows_an_index_cannot_fill_are_searched_exactly() -> None:
    # 200 uniform vectors in 100 lists, one list probed: far fewer results than the 31 a row needs.
    x = np.random.default_rng(1).random((200, 8)).astype(np.float32)
    ann = build_ann_index(x, "euclidean", "ivf", {"nlist": 100, "nprobe": 1})
    approx = knn_graph_rows(x, np.arange(200), x, 30, metric="euclidean", ann_index=ann)
    exact = knn_graph(x, 30, metric="euclidean")
    np.testing.assert_array_equal(approx[0], exact[0])
    np.testing.assert_array_equal(approx[1], exact[1])


class _IndexWithoutSelf:
    """An 'approximate index' that never returns the query itself, and orders ties badly."""

    def __init__(self, x: np.ndarray) -> None:
        self.ntotal, self.d, self.x = len(x), x.shape[1], x

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        dist = ((xq[:, None, :] - self.x[None, :, :]) ** 2).sum(-1)
        dist[dist == 0] = np.inf  # never the query itself
        descending_index = np.broadcast_to(-np.arange(self.ntotal), dist.shape)
        idx = np.lexsort((descending_index, dist), axis=1)[:, :k]
        return np.take_along_axis(dist, idx, axis=1).astype(np.float32), idx


def test_a_missing_query_is_inserted_first_and_ties_are_reordered() -> None:
    x = np.array([[0.0], [1.0], [-1.0], [2.0], [3.0]], dtype=np.float32)
    ann = _IndexWithoutSelf(x)
    neighbor_idx, distances = knn_graph_rows(x, np.arange(5), x, 2, metric="euclidean", ann_index=ann)
    # Row 0: the index returns 2 then 1 (both at distance 1); the query goes first, then index order.
    np.testing.assert_array_equal(neighbor_idx, [[0, 1, 2], [1, 0, 3], [2, 0, 1], [3, 1, 4], [4, 3, 1]])
    np.testing.assert_array_equal(distances, [[0, 1, 1], [0, 1, 1], [0, 1, 4], [0, 1, 1], [0, 1, 4]])


def test_knn_recall_and_shard_bounds() -> None:
    approx = np.array([[0, 1, 2], [1, 5, -1]])
    exact = np.array([[0, 2, 3], [1, 0, 5]])
    assert knn_recall(approx, exact) == pytest.approx(4 / 6)
    assert knn_recall(np.empty((0, 3)), np.empty((0, 3))) == 1.0
    assert shard_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert shard_bounds(2, 5) == [(0, 1), (1, 2)]
    assert shard_bounds(0, 4) == []


def test_input_errors() -> None:
    x = clustered(50)
    with pytest.raises(ValueError, match="unknown index"):
        knn_graph(x, 5, index="lsh")
    with pytest.raises(ValueError, match="unknown ivf index parameter"):
        knn_graph(x, 5, index="ivf", index_params={"n_list": 4})
    with pytest.raises(ValueError, match="takes no index_params"):
        knn_graph(x, 5, index_params={"nprobe": 4})
    with pytest.raises(ValueError, match="unknown metric"):
        knn_graph(x, 5, metric="manhattan")
    with pytest.raises(ValueError, match="query_rows"):
        knn_graph_rows(x[:3], np.arange(4), x, 5)
