"""Recall@K, MAP@R, NMI (dml_ray.metrics.retrieval): hand-computed values and a naive reference."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from dml_ray.metrics.retrieval import (
    evaluate_retrieval,
    map_at_r,
    metrics_from_neighbors,
    neighbor_labels_for,
    nmi,
    recall_at_k,
    relevant_counts,
    search_width,
)

# Six points on the x axis (euclidean): a=0, b=1, c=2.5, d=10, e=11, f=30; f's class is a singleton.
LINE_X = np.array([0.0, 1.0, 2.5, 10.0, 11.0, 30.0])
LINE_EMB = np.stack([LINE_X, np.zeros(6)], axis=1).astype(np.float32)
LINE_LABELS = np.array([0, 1, 0, 1, 1, 2])
LINE_IDS = np.array(["a", "b", "c", "d", "e", "f"])


def _rows_by_name(rows: list[dict]) -> dict[tuple[str, int | None], float]:
    return {(row["metric"], row["k"]): row["value"] for row in rows}


def test_recall_hand_computed() -> None:
    query_labels = np.array([0, 1, 2])
    neighbor_labels = np.array([[0, 1, 1], [0, 1, 2], [1, 0, 0]])  # first hits at ranks 1, 2, never
    expected = {1: 1 / 3, 2: 2 / 3, 3: 2 / 3}
    assert recall_at_k(query_labels, neighbor_labels, [1, 2, 3]) == pytest.approx(expected)


def test_map_at_r_hand_computed() -> None:
    # R = 10, relevant at ranks 1, 2, 4: (1/10) (1/1 + 2/2 + 3/4) = 0.275.
    row_r10 = np.array([7, 7, 0, 7, 0, 0, 0, 0, 0, 0])
    # R = 3, relevant at ranks 1 and 3 (rank 4 lies beyond R and does not count): (1/3) (1 + 2/3) = 5/9.
    row_r3 = np.array([7, 0, 7, 7, 0, 0, 0, 0, 0, 0])
    # R = 1, wrong first neighbour: 0.  R = 0: left out and counted.
    row_r1 = np.array([0, 7, 7, 7, 7, 7, 7, 7, 7, 7])
    neighbor_labels = np.stack([row_r10, row_r3, row_r1, row_r1])
    value, n_excluded = map_at_r(np.full(4, 7), neighbor_labels, np.array([10, 3, 1, 0]))
    assert value == pytest.approx((0.275 + 5 / 9 + 0.0) / 3)
    assert n_excluded == 1
    assert map_at_r(np.full(1, 7), row_r10[None, :], np.array([10])) == (pytest.approx(0.275), 0)


def test_map_at_r_all_queries_excluded_is_nan() -> None:
    value, n_excluded = map_at_r(np.array([1, 2]), np.array([[3], [4]]), np.array([0, 0]))
    assert np.isnan(value) and n_excluded == 2


def test_relevant_counts_hand_computed() -> None:
    db_labels, db_ids = np.array([0, 0, 0, 1, 2]), np.array(["a", "b", "c", "d", "e"])
    counts = relevant_counts(np.array([0, 1, 0, 3]), np.array(["a", "d", "z", "y"]), db_labels, db_ids)
    np.testing.assert_array_equal(counts, [2, 0, 3, 0])  # a: b, c; d: none; z: a, b, c; label 3 absent


def test_evaluate_hand_computed() -> None:
    # Neighbours, self excluded (labels): a: b c d -> 1 0 1; b: a c -> 0 0; c: b a -> 1 0;
    # d: e c -> 1 0; e: d c -> 1 0; f: e d -> 1 1.  R: a 1, b 2, c 1, d 2, e 2, f 0.
    rows = evaluate_retrieval(
        LINE_EMB, LINE_LABELS, LINE_IDS, LINE_EMB, LINE_LABELS, LINE_IDS, ks=[1, 2], metric="euclidean"
    )
    values = _rows_by_name(rows)
    assert values[("recall", 1)] == pytest.approx(2 / 6)  # d, e
    assert values[("recall", 2)] == pytest.approx(4 / 6)  # a, c, d, e
    assert values[("map_at_r", None)] == pytest.approx((0 + 0 + 0 + 0.5 + 0.5) / 5)
    assert values[("map_at_r_excluded_queries", None)] == 1
    assert values[("n_queries", None)] == 6
    assert values[("nmi", None)] == pytest.approx(nmi(LINE_EMB, LINE_LABELS))
    assert [row["metric"] for row in rows] == [
        "recall", "recall", "map_at_r", "map_at_r_excluded_queries", "n_queries", "nmi"
    ]


def test_evaluate_with_capped_r_and_without_optional_metrics() -> None:
    # max_r = 1: every R becomes 1; AP: a 0, b 0, c 0, d 1, e 1.
    rows = evaluate_retrieval(
        LINE_EMB, LINE_LABELS, LINE_IDS, LINE_EMB, LINE_LABELS, LINE_IDS, ks=[1], metric="euclidean", max_r=1,
        with_nmi=False,
    )
    assert _rows_by_name(rows)[("map_at_r_capped", 1)] == pytest.approx(2 / 5)
    rows = evaluate_retrieval(
        LINE_EMB, LINE_LABELS, LINE_IDS, LINE_EMB, LINE_LABELS, LINE_IDS, ks=[1], metric="euclidean",
        with_map_at_r=False, with_nmi=False,
    )
    assert [row["metric"] for row in rows] == ["recall", "n_queries"]


def test_exact_duplicates_retrieve_each_other() -> None:
    # Two identical vectors (ids p, q) of class 0; each must find the other, not be blocked by itself.
    emb = np.array([[1, 0], [1, 0], [0, 1], [0, 1.1], [-1, 0], [-1, 0.1]], dtype=np.float32)
    labels, ids = np.array([0, 0, 1, 1, 2, 2]), np.array(["p", "q", "r", "s", "t", "u"])
    values = _rows_by_name(evaluate_retrieval(emb, labels, ids, emb, labels, ids, ks=[1], with_nmi=False))
    assert values[("recall", 1)] == 1.0
    assert values[("map_at_r", None)] == 1.0


def test_singleton_classes_are_excluded_from_map_at_r_and_counted() -> None:
    emb = np.array([[1, 0], [1, 0.1], [0, 1], [-1, 0]], dtype=np.float32)
    labels, ids = np.array([0, 0, 1, 2]), np.array(["a", "b", "c", "d"])
    values = _rows_by_name(evaluate_retrieval(emb, labels, ids, emb, labels, ids, ks=[1], with_nmi=False))
    assert values[("map_at_r", None)] == 1.0  # a and b only
    assert values[("map_at_r_excluded_queries", None)] == 2
    assert values[("recall", 1)] == 0.5  # c and d can never hit: counted as misses


def test_nmi_is_one_for_separated_clusters_and_ignores_label_names() -> None:
    rng = np.random.default_rng(0)
    centers = np.array([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
    labels = np.repeat([0, 1, 2], 20)
    emb = centers[labels] + 0.01 * rng.normal(size=(60, 3))
    assert nmi(emb, labels) == pytest.approx(1.0)
    assert nmi(emb, np.array([5, 9, 7])[labels]) == pytest.approx(1.0)


def test_sharded_search_equals_single_process() -> None:
    emb, labels, ids = _clustered(300, n_classes=15, seed=1)
    ks = [1, 2, 4, 8]
    single = evaluate_retrieval(emb, labels, ids, emb, labels, ids, ks, with_nmi=False)
    n_relevant = relevant_counts(labels, ids, labels, ids)
    width = search_width(ks, n_relevant)
    shards = [slice(0, 100), slice(100, 170), slice(170, 300)]
    neighbor_labels = np.concatenate(
        [neighbor_labels_for(emb[s], ids[s], emb, labels, ids, width, block_size=32) for s in shards]
    )
    assert metrics_from_neighbors(labels, neighbor_labels, n_relevant, ks) == single


def _clustered(n: int, n_classes: int, seed: int, d: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noisy class clusters plus three singleton classes; ids are strings."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([rng.integers(0, n_classes, n - 3), [100, 101, 102]])
    _, class_index = np.unique(labels, return_inverse=True)
    centers = 1.5 * rng.normal(size=(class_index.max() + 1, d))
    emb = (centers[class_index] + rng.normal(size=(n, d))).astype(np.float32)
    return emb, labels, np.array([f"img{i}" for i in range(n)])


def _naive_metrics(
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    query_ids: np.ndarray,
    db_emb: np.ndarray,
    db_labels: np.ndarray,
    db_ids: np.ndarray,
    ks: list[int],
    metric: str,
) -> dict[tuple[str, int | None], float]:
    """Dense distance matrix, argsort and a loop over queries: the reference implementation."""
    if metric == "cosine":
        q = query_emb / np.linalg.norm(query_emb, axis=1, keepdims=True)
        b = db_emb / np.linalg.norm(db_emb, axis=1, keepdims=True)
        distance = -(q.astype(np.float64) @ b.T.astype(np.float64))
    else:
        distance = ((query_emb[:, None, :].astype(np.float64) - db_emb[None, :, :]) ** 2).sum(axis=2)
    hits = {k: 0 for k in ks}
    average_precisions, n_excluded = [], 0
    for i in range(len(query_emb)):
        order = [j for j in np.argsort(distance[i], kind="stable") if db_ids[j] != query_ids[i]]
        relevant = [db_labels[j] == query_labels[i] for j in order]
        for k in ks:
            hits[k] += any(relevant[:k])
        r = sum(relevant)
        if r == 0:
            n_excluded += 1
            continue
        n_correct, total = 0, 0.0
        for rank in range(1, r + 1):
            if relevant[rank - 1]:
                n_correct += 1
                total += n_correct / rank
        average_precisions.append(total / r)
    values = {("recall", k): hits[k] / len(query_emb) for k in ks}
    values[("map_at_r", None)] = float(np.mean(average_precisions))
    values[("map_at_r_excluded_queries", None)] = n_excluded
    values[("n_queries", None)] = len(query_emb)
    return values


def _naive_nmi(labels: np.ndarray, clusters: np.ndarray) -> float:
    """NMI from the contingency table: I(Y; C) / ((H(Y) + H(C)) / 2)."""
    _, y = np.unique(labels, return_inverse=True)
    _, c = np.unique(clusters, return_inverse=True)
    joint = np.zeros((y.max() + 1, c.max() + 1))
    np.add.at(joint, (y, c), 1.0)
    joint /= joint.sum()
    p_y, p_c = joint.sum(axis=1), joint.sum(axis=0)
    nz = joint > 0
    mutual_information = (joint[nz] * np.log(joint[nz] / np.outer(p_y, p_c)[nz])).sum()
    entropy_y, entropy_c = -(p_y * np.log(p_y)).sum(), -(p_c * np.log(p_c)).sum()
    return mutual_information / ((entropy_y + entropy_c) / 2)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_matches_naive_reference_same_set(metric: str) -> None:
    emb, labels, ids = _clustered(300, n_classes=12, seed=2)
    ks = [1, 2, 4, 8, 16]
    got = _rows_by_name(
        evaluate_retrieval(emb, labels, ids, emb, labels, ids, ks, metric=metric, with_nmi=False)
    )
    expected = _naive_metrics(emb, labels, ids, emb, labels, ids, ks, metric)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert expected[("map_at_r_excluded_queries", None)] == 3
    assert 0.05 < expected[("map_at_r", None)] < 0.95  # the data are neither trivial nor random


def test_matches_naive_reference_query_gallery() -> None:
    emb, labels, ids = _clustered(300, n_classes=10, seed=3)
    q, g = slice(0, 100), slice(100, 300)
    ks = [1, 10, 20]
    got = _rows_by_name(
        evaluate_retrieval(emb[q], labels[q], ids[q], emb[g], labels[g], ids[g], ks, with_nmi=False)
    )
    expected = _naive_metrics(emb[q], labels[q], ids[q], emb[g], labels[g], ids[g], ks, "cosine")
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_nmi_matches_naive_reference() -> None:
    emb, labels, _ = _clustered(300, n_classes=12, seed=4)
    kmeans = faiss.Kmeans(8, 15, niter=20, seed=0, min_points_per_centroid=1, max_points_per_centroid=300)
    kmeans.train(emb)
    clusters = kmeans.index.search(emb, 1)[1][:, 0]
    assert nmi(emb, labels) == pytest.approx(_naive_nmi(labels, clusters), abs=1e-9)
    assert nmi(emb, labels, seed=0) == nmi(emb, labels, seed=0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: recall_at_k([0, 1], [[0, 1]], [1]), r"query_labels: expected shape \(1,\)"),
        (lambda: recall_at_k([0], [[0, 1]], [3]), "2 columns, K=3"),
        (lambda: recall_at_k([0], [[0, 1]], []), "non-empty list of positive ints"),
        (lambda: recall_at_k([0], [[0, 1]], [0, 1]), "positive ints"),
        (lambda: recall_at_k([], np.zeros((0, 2)), [1]), "no queries"),
        (lambda: map_at_r([0], [[0, 1]], [3]), "largest R=3"),
        (lambda: map_at_r([0], [[0, 1]], [1, 1]), "n_relevant must be"),
        (lambda: nmi(np.ones((3, 2)), [0, 1, 2], n_clusters=4), r"n_clusters must be in \[1, 3\]"),
        (lambda: nmi(np.full((2, 2), np.nan), [0, 1]), "finite 2-D"),
        (lambda: relevant_counts([0], ["a"], [1], ["a"]), "different label"),
        (
            lambda: evaluate_retrieval(
                LINE_EMB, LINE_LABELS, LINE_IDS, LINE_EMB, LINE_LABELS, LINE_IDS, ks=[6], metric="euclidean"
            ),
            "only 5 database candidates per query, fewer than k=6",
        ),
        (lambda: metrics_from_neighbors([0], [[0]], [1], [1], max_r=0), "max_r"),
    ],
)
def test_bad_inputs_raise_one_line_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def _tied_and_overlapping(n: int = 400, seed: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Overlapping noisy classes (k-means has several local optima) plus exact duplicates across classes
    (distance ties whose order decides Recall@K and MAP@R unless ties are broken by id)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    emb = (0.6 * rng.normal(size=(10, 6))[labels] + rng.normal(size=(n, 6))).astype(np.float32)
    emb[n // 2 : n // 2 + 40] = emb[:40]  # duplicates, mostly with another label
    return emb, labels, np.array([f"img{i:04d}" for i in range(n)])


def test_metrics_do_not_depend_on_row_order() -> None:
    # issue 11 item 11: NMI changed between identical runs because rows arrived in another order
    emb, labels, ids = _tied_and_overlapping()
    ks = [1, 2, 4, 8]
    expected = evaluate_retrieval(emb, labels, ids, emb, labels, ids, ks)
    for seed in range(3):
        p = np.random.default_rng(seed).permutation(len(ids))
        q = np.random.default_rng(seed + 10).permutation(len(ids))
        assert evaluate_retrieval(emb[p], labels[p], ids[p], emb[q], labels[q], ids[q], ks) == expected
        assert nmi(emb[p], labels[p], ids=ids[p]) == nmi(emb, labels, ids=ids)
