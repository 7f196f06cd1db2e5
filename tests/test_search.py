"""Exact kNN search and self-exclusion by id (dml_ray.retrieval.search), on hand-made vectors."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from dml_ray.retrieval.search import (
    exclude_self,
    knn_search,
    locate_ids,
    search_excluding_self,
    self_excluded_columns,
)

DB = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]], dtype=np.float32)
QUERY = np.array([[2.0, 0.0]], dtype=np.float32)


def _random(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_cosine_hand_computed() -> None:
    # cos((2,0), db) = [1, 0, 1/sqrt(2), -1]: descending similarity.
    scores, indices = knn_search(QUERY, DB, k=4, metric="cosine")
    np.testing.assert_array_equal(indices, [[0, 2, 1, 3]])
    np.testing.assert_allclose(scores, [[1.0, 1 / np.sqrt(2), 0.0, -1.0]], atol=1e-6)


def test_euclidean_hand_computed() -> None:
    # |(2,0) - db|^2 = [1, 5, 2, 9]: ascending squared distance.
    scores, indices = knn_search(QUERY, DB, k=3, metric="euclidean")
    np.testing.assert_array_equal(indices, [[0, 2, 1]])
    np.testing.assert_allclose(scores, [[1.0, 2.0, 5.0]], atol=1e-6)


def test_k_is_capped_at_database_size_and_inputs_are_not_modified() -> None:
    query, db = QUERY.copy(), DB.copy()
    scores, indices = knn_search(query, db, k=10)
    assert scores.shape == indices.shape == (1, 4)
    assert indices.dtype == np.int64
    np.testing.assert_array_equal(query, QUERY)
    np.testing.assert_array_equal(db, DB)


def test_empty_query_block() -> None:
    scores, indices = knn_search(np.zeros((0, 2), dtype=np.float32), DB, k=2)
    assert scores.shape == indices.shape == (0, 2)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_blockwise_equals_single_block(metric: str) -> None:
    queries, db = _random(300, seed=1), _random(200, seed=2)
    s1, i1 = knn_search(queries, db, k=10, metric=metric, block_size=7)
    s2, i2 = knn_search(queries, db, k=10, metric=metric, block_size=4096)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-5)


def test_cosine_and_euclidean_rank_alike_on_normalised_vectors() -> None:
    x = _random(300)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cos, i_cos = knn_search(x, x, k=20, metric="cosine")
    sq_l2, i_l2 = knn_search(x, x, k=20, metric="euclidean")
    np.testing.assert_array_equal(i_cos, i_l2)
    np.testing.assert_allclose(sq_l2, 2 - 2 * cos, atol=1e-5)  # |a-b|^2 = 2 - 2 cos for unit vectors


def test_locate_ids() -> None:
    reference = np.array(["a", "b", "c"], dtype=object)
    np.testing.assert_array_equal(locate_ids(["c", "x", "a"], reference), [2, -1, 0])
    np.testing.assert_array_equal(locate_ids([5, 1], [1, 2]), [-1, 0])
    np.testing.assert_array_equal(locate_ids(["a"], []), [-1])


def test_exclude_self_by_id_at_any_rank() -> None:
    neighbor_ids = np.array(
        [
            ["a", "b", "c"],  # query a first: drop it
            ["a", "c", "b"],  # query b last (the k+1-th): drop it
            ["e", "c", "f"],  # query c in the middle (a tie or duplicate ranked above it)
            ["a", "b", "c"],  # query d absent: drop the last column
        ]
    )
    kept = exclude_self(neighbor_ids, np.array(["a", "b", "c", "d"]), k=2)
    np.testing.assert_array_equal(kept, [["b", "c"], ["a", "c"], ["e", "f"], ["a", "b"]])
    columns = self_excluded_columns(neighbor_ids, np.array(["a", "b", "c", "d"]), k=2)
    np.testing.assert_array_equal(columns, [[1, 2], [0, 1], [0, 2], [0, 1]])


def test_exact_duplicate_is_retrieved_not_blocked() -> None:
    # p and q are identical vectors with different ids: each must find the other at similarity 1.
    db = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.2]], dtype=np.float32)
    ids = np.array(["p", "q", "r", "s"])
    scores, indices = search_excluding_self(db[:2], ids[:2], db, ids, k=1)
    np.testing.assert_array_equal(ids[indices[:, 0]], ["q", "p"])
    np.testing.assert_allclose(scores, [[1.0], [1.0]], atol=1e-6)


def test_many_tied_duplicates_never_return_self() -> None:
    # Five identical vectors: with k=2, the self may fall outside the k+1 = 3 retrieved ties.
    db = np.vstack([np.ones((5, 3)), _random(20, d=3)]).astype(np.float32)
    ids = np.array([f"id{i}" for i in range(len(db))])
    scores, indices = search_excluding_self(db[:5], ids[:5], db, ids, k=2)
    assert indices.shape == (5, 2)
    assert not (indices == np.arange(5)[:, None]).any()
    assert set(indices.ravel()) <= set(range(5))
    np.testing.assert_allclose(scores, 1.0, atol=1e-6)


def test_query_shard_matches_full_search() -> None:
    db = _random(300, seed=3)
    ids = np.array([f"img{i}" for i in range(300)])
    s_all, i_all = search_excluding_self(db, ids, db, ids, k=5)
    s_part, i_part = search_excluding_self(db[120:170], ids[120:170], db, ids, k=5)
    np.testing.assert_array_equal(i_part, i_all[120:170])
    np.testing.assert_allclose(s_part, s_all[120:170], atol=1e-6)
    assert not (i_all == np.arange(300)[:, None]).any()


def test_disjoint_queries_are_plain_knn() -> None:
    queries, db = _random(30, seed=4), _random(50, seed=5)
    q_ids, db_ids = np.arange(30), np.arange(100, 150)
    s1, i1 = search_excluding_self(queries, q_ids, db, db_ids, k=50)
    s2, i2 = knn_search(queries, db, k=50)
    assert i1.shape == (30, 50)  # no query in the database: all nb candidates
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2)


def test_width_when_k_exceeds_candidates() -> None:
    ids = np.array(["a", "b", "c", "d"])
    _, indices = search_excluding_self(DB, ids, DB[[0, 1, 2, 3]], ids, k=10, metric="euclidean")
    assert indices.shape == (4, 3)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: knn_search(np.ones((2, 3)), np.ones((4, 2)), 1), "dimension 3 but database has 2"),
        (lambda: knn_search(np.array([[np.nan, 1.0]]), DB, 1), "NaN or infinite"),
        (lambda: knn_search(QUERY, np.array([[np.inf, 1.0]]), 1), "NaN or infinite"),
        (lambda: knn_search(np.ones(2), DB, 1), "2-D"),
        (lambda: knn_search(QUERY, DB, 1, metric="l2"), "unknown metric 'l2'"),
        (lambda: knn_search(QUERY, DB, 0), "k must be >= 1"),
        (lambda: knn_search(QUERY, DB, 1, block_size=0), "block_size"),
        (lambda: knn_search(QUERY, np.zeros((0, 2)), 1), "database is empty"),
        (lambda: knn_search(np.zeros((1, 2)), DB, 1), "zero vector"),
        (lambda: search_excluding_self(DB, ["a", "a", "b", "c"], DB, ["a", "a", "b", "c"], 1), "duplicates"),
        (lambda: search_excluding_self(DB, ["a"], DB, ["a", "b", "c", "d"], 1), "one id per row"),
        (lambda: exclude_self(np.array([["a", "b"]]), np.array(["a"]), k=2), "need k >= 0 and k\\+1"),
    ],
)
def test_bad_inputs_raise_one_line_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="checks the no-GPU error")
def test_use_gpu_without_gpu_is_an_error() -> None:
    with pytest.raises(ValueError, match="no GPU"):
        knn_search(QUERY, DB, 1, use_gpu=True)


@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="needs faiss-gpu and a GPU")
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_gpu_matches_cpu(metric: str) -> None:
    queries, db = _random(300, seed=6), _random(500, seed=7)
    s_gpu, i_gpu = knn_search(queries, db, k=10, metric=metric, block_size=128, use_gpu=True)
    s_cpu, i_cpu = knn_search(queries, db, k=10, metric=metric, use_gpu=False)
    np.testing.assert_array_equal(i_gpu, i_cpu)
    np.testing.assert_allclose(s_gpu, s_cpu, rtol=1e-4, atol=1e-4)
