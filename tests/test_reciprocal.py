"""Reciprocal kNN batches (dml_ray.retrieval.reciprocal) against a direct loop over the definition.

The reference below is intra-batch-mpn-reproduction Sec. 3.4 written with Python sets and loops
over a dense distance matrix (fine for a few hundred items); the vectorised, sparse
implementation must give identical sets and batches. Test data with exact float arithmetic
(small integers, +-1/4 sign vectors) makes every distance exact, so ties and exact duplicates are
real and are broken the same way (smaller index first, the query itself before everything).
"""
from __future__ import annotations

import numpy as np
import pytest

from dml_ray.retrieval.knn_graph import knn_graph
from dml_ray.retrieval.reciprocal import half_k, reciprocal_batches, reciprocal_sets
from dml_ray.retrieval.search import knn_search


def dense_distances(x: np.ndarray, metric: str) -> np.ndarray:
    """N x N float32 distances with knn_graph's conventions (1 - cos or squared L2, >= 0)."""
    x = x.astype(np.float32)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        return np.maximum(1.0 - x @ x.T, 0.0).astype(np.float32)
    sq = (x * x).sum(axis=1)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0).astype(np.float32)


def faiss_distances(x: np.ndarray, metric: str) -> np.ndarray:
    """N x N distances computed by the same faiss search knn_graph uses (for non-exact data)."""
    scores, idx = knn_search(x, x, len(x), metric)
    dist = np.empty((len(x), len(x)), np.float32)
    np.put_along_axis(dist, idx, np.maximum(1.0 - scores if metric == "cosine" else scores, 0.0), axis=1)
    return dist


def reference(dist: np.ndarray, k: int, batch_size: int, alpha: float = 2 / 3) -> tuple[list, list, list]:
    """Sec. 3.4 by the letter: (R(q,k) in graph order, expanded set sorted, batch) for every q."""
    n = len(dist)

    def ranking(q: int) -> list[int]:
        # q itself first, then by distance, ties to the smaller index.
        return sorted(range(n), key=lambda u: (u != q, dist[q, u], u))

    rankings = [ranking(q) for q in range(n)]

    def neighbours(q: int, kk: int) -> set[int]:
        return set(rankings[q][: kk + 1])

    def reciprocal(q: int, kk: int) -> set[int]:
        return {u for u in neighbours(q, kk) if q in neighbours(u, kk)}

    half = round(k / 2)
    recips, expanded_sets, batches = [], [], []
    for q in range(n):
        r_q = reciprocal(q, k)
        expanded = set(r_q)
        for g in r_q:
            r_g = reciprocal(g, half)
            if len(r_q & r_g) > alpha * len(r_g):
                expanded |= r_g
        ordered = sorted(expanded, key=lambda u: (u != q, dist[q, u], u))
        batch = ordered[:batch_size]
        for u in rankings[q]:
            if len(batch) == batch_size:
                break
            if u not in batch:
                batch.append(u)
        recips.append([u for u in rankings[q][: k + 1] if u in r_q])
        expanded_sets.append(ordered)
        batches.append(batch)
    return recips, expanded_sets, batches


def padded(lists: list[list[int]], width: int) -> np.ndarray:
    out = np.full((len(lists), width), -1, dtype=np.int64)
    for i, values in enumerate(lists):
        out[i, : len(values)] = values
    return out


def blobs(n: int, d: int, n_blobs: int, seed: int) -> np.ndarray:
    """Gaussian blobs."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(n_blobs, d))
    return centres[rng.integers(n_blobs, size=n)] + rng.normal(size=(n, d))


def integer_blobs(n: int, seed: int) -> np.ndarray:
    """Integer coordinates (exact squared distances, many ties) with some exact duplicates."""
    x = np.round(blobs(n, 6, 5, seed))
    dup = np.random.default_rng(seed + 1).choice(n, size=n // 10, replace=False)
    x[dup[: len(dup) // 2]] = x[dup[len(dup) // 2 :][: len(dup) // 2]]
    return x.astype(np.float32)


def sign_vectors(n: int, seed: int) -> np.ndarray:
    """+-1/4 in 16 dimensions: unit norm, cosines are multiples of 1/16, exact; clustered signs."""
    rng = np.random.default_rng(seed)
    centres = rng.choice([-1.0, 1.0], size=(6, 16))
    flips = rng.random((n, 16)) < 0.15
    x = centres[rng.integers(6, size=n)] * np.where(flips, -1.0, 1.0)
    return (x / 4).astype(np.float32)


CASES = [
    # data, metric, n, k1, k, batch_size
    ("integer", "euclidean", 150, 30, 30, 7),
    ("integer", "euclidean", 220, 12, 9, 13),
    ("integer", "euclidean", 90, 8, 5, 4),
    ("integer", "euclidean", 60, 3, 1, 2),
    ("signs", "cosine", 200, 20, 20, 21),
    ("signs", "cosine", 120, 10, 7, 1),
    ("float", "euclidean", 250, 15, 15, 10),
    ("float", "cosine", 180, 30, 11, 31),
]


@pytest.mark.parametrize(("data", "metric", "n", "k1", "k", "batch_size"), CASES)
def test_vectorised_equals_loop_reference(
    data: str, metric: str, n: int, k1: int, k: int, batch_size: int
) -> None:
    seed = n + k
    if data == "integer":
        x = integer_blobs(n, seed)
        dist = dense_distances(x, metric)
    elif data == "signs":
        x = sign_vectors(n, seed)
        dist = dense_distances(x, metric)
    else:
        x = blobs(n, 8, 4, seed).astype(np.float32)
        dist = faiss_distances(x, metric)
    recips, expanded_sets, batches = reference(dist, k, batch_size)

    neighbor_idx, distances = knn_graph(x, k1, metric=metric)
    np.testing.assert_array_equal(reciprocal_sets(neighbor_idx, k), padded(recips, k + 1))
    recip_ids, batch_ids = reciprocal_batches(neighbor_idx, distances, x, k, batch_size, metric=metric)
    np.testing.assert_array_equal(recip_ids, padded(expanded_sets, max(map(len, expanded_sets))))
    np.testing.assert_array_equal(batch_ids, np.array(batches))


def test_shards_of_rows_equal_the_whole() -> None:
    x = integer_blobs(200, 3)
    neighbor_idx, distances = knn_graph(x, 20, metric="euclidean")
    whole_recip, whole_batch = reciprocal_batches(neighbor_idx, distances, x, 20, 9, metric="euclidean")
    rows = np.random.default_rng(0).permutation(200)
    for shard in np.array_split(rows, 3):
        recip, batch = reciprocal_batches(neighbor_idx, distances, x, 20, 9, metric="euclidean", rows=shard)
        np.testing.assert_array_equal(batch, whole_batch[shard])
        np.testing.assert_array_equal(recip, whole_recip[shard][:, : recip.shape[1]])
        assert (whole_recip[shard][:, recip.shape[1] :] == -1).all()
        np.testing.assert_array_equal(reciprocal_sets(neighbor_idx, 20, rows=shard),
                                      reciprocal_sets(neighbor_idx, 20)[shard])
    small_blocks = reciprocal_batches(neighbor_idx, distances, x, 20, 9, metric="euclidean", block_size=17)
    np.testing.assert_array_equal(small_blocks[0], whole_recip)
    np.testing.assert_array_equal(small_blocks[1], whole_batch)


def test_expansion_reaches_beyond_the_graph_row() -> None:
    """Members outside q's k1 list get their distance from the embeddings (the tests above cover
    their order); check such members occur in one of the reference cases."""
    x = integer_blobs(150, 37)
    neighbor_idx, distances = knn_graph(x, 30, metric="euclidean")
    recip_ids, _ = reciprocal_batches(neighbor_idx, distances, x, 30, 7, metric="euclidean")
    outside = (recip_ids[:, :, None] != neighbor_idx[:, None, :]).all(axis=2) & (recip_ids >= 0)
    assert outside.any()


def test_hand_made_graph() -> None:
    # 0-1-2 mutual neighbours, 3 is nearest to 2 but 2 does not list 3 at k = 2.
    neighbor_idx = np.array([[0, 1, 2, 3], [1, 0, 2, 3], [2, 1, 0, 3], [3, 2, 1, 0]])
    distances = np.array([[0, 1, 2, 5], [0, 1, 1, 4], [0, 1, 2, 3], [0, 3, 4, 5]], dtype=np.float32)
    np.testing.assert_array_equal(
        reciprocal_sets(neighbor_idx, 2), [[0, 1, 2], [1, 0, 2], [2, 1, 0], [3, -1, -1]]
    )
    x = np.zeros((4, 2), np.float32)  # never read: every expanded member is in its query's row
    recip, batch = reciprocal_batches(neighbor_idx, distances, x, 2, 4, metric="euclidean")
    np.testing.assert_array_equal(recip, [[0, 1, 2], [1, 0, 2], [2, 1, 0], [3, -1, -1]])
    np.testing.assert_array_equal(batch, [[0, 1, 2, 3], [1, 0, 2, 3], [2, 1, 0, 3], [3, 2, 1, 0]])


def test_half_k_rounds_halves_to_even() -> None:
    assert [half_k(k) for k in (1, 2, 3, 5, 7, 9, 30)] == [0, 1, 2, 2, 4, 4, 15]
    assert [half_k(k) for k in (1, 3, 5, 7)] == [int(np.around(k / 2)) for k in (1, 3, 5, 7)]


def test_input_errors() -> None:
    x = integer_blobs(30, 0)
    neighbor_idx, distances = knn_graph(x, 5, metric="euclidean")
    with pytest.raises(ValueError, match="k1 >= k"):
        reciprocal_sets(neighbor_idx, 6)
    with pytest.raises(ValueError, match="batch_size must be in"):
        reciprocal_batches(neighbor_idx, distances, x, 5, 7, metric="euclidean")
    with pytest.raises(ValueError, match="column 0"):
        reciprocal_sets(neighbor_idx[:, ::-1].copy(), 3)
    with pytest.raises(ValueError, match="same item twice"):
        bad = neighbor_idx.copy()
        bad[:, 2] = bad[:, 1]
        reciprocal_sets(bad, 3)
    with pytest.raises(ValueError, match="distances must have shape"):
        reciprocal_batches(neighbor_idx, distances[:, :3], x, 5, 3, metric="euclidean")


def test_knn_stage_output_does_not_depend_on_row_order(ray_session) -> None:
    """Duplicate embeddings tie exactly; the stage puts rows in image_id order first, so a table written in
    another order (as Ray Data's blocks may be) gives the same neighbours, reciprocal sets and batches."""
    import pyarrow as pa

    from dml_ray.config import KnnConfig
    from dml_ray.io.schemas import embedding_type
    from pipelines.knn import run_knn

    rng = np.random.default_rng(0)
    base = rng.normal(size=(8, 16)).astype(np.float32)
    x = np.concatenate([base, base, base])  # every vector three times: exact ties everywhere
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"img{i:03d}" for i in range(len(x))]

    def table(order: np.ndarray) -> pa.Table:
        column = pa.FixedSizeListArray.from_arrays(pa.array(x[order].reshape(-1)), x.shape[1])
        return pa.table({"image_id": pa.array([ids[i] for i in order]), "split": pa.array(["test"] * len(x)),
                         "embedding": column.cast(embedding_type(x.shape[1]))})

    cfg = KnnConfig(k1=6, batch_size=4, shards=2)
    a = run_knn(table(np.arange(len(x))), ["test"], cfg, "r")
    b = run_knn(table(rng.permutation(len(x))), ["test"], cfg, "r")
    assert a.sort_by("image_id").to_pylist() == b.sort_by("image_id").to_pylist()
