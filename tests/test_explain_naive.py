"""The vectorised maps against naive loop implementations of their definitions, written here.

activation-decomposition-tip2021 Eq. 5 (point-to-point, overall maps, bias terms), Eq. 8 / Sec. V
(Grad-CAM, RGrad-CAM), Sec. VII-B (interactive retrieval); dist-cam Eq. 3-7 (CAM, Dist-CAM, prototypes).
"""
from __future__ import annotations

import math

import pytest
import torch

from dml_ray.explain import (
    bias_terms,
    box_coverage_mask,
    class_activation_map,
    class_prototypes,
    decomposition_bias_map,
    decomposition_map,
    dist_cam,
    dist_cam_weights,
    grad_cam,
    interpolate_equivalent_features,
    nearest_prototype,
    pair_scores,
    partial_query,
    point_specific_map,
    point_to_point_map,
    rank_gallery,
    rgrad_cam,
    similarity_gradients,
)
from dml_ray.models.heads import EmbeddingHead
from tests.heads import random_eval_head

C, GRID_Q = 4, (3, 2)
HEADS = {
    "gap-relu-bn": dict(pooling="gap", embedding_dim=5, hidden_dims=[7], bn=True),
    "gmp-fc": dict(pooling="gmp", embedding_dim=5),
    "flatten-relu-bn": dict(pooling="flatten", embedding_dim=5, hidden_dims=[7], bn=True),
}
TIGHT = dict(rtol=1e-9, atol=1e-10)


def make_head(name: str) -> EmbeddingHead:
    """A float64 eval-mode head with random FC biases and random BN statistics."""
    return random_eval_head(C, GRID_Q, seed=0, **HEADS[name])


def random_pairs(name: str, b: int = 3):
    """Per-pair (e, bias, raw) of query and reference for random non-negative feature maps."""
    head = make_head(name)
    g = torch.Generator().manual_seed(1)
    grid_r = GRID_Q if name.startswith("flatten") else (2, 4)
    a_q = torch.relu(torch.randn(b, C, *GRID_Q, generator=g, dtype=torch.float64) + 0.3)
    a_r = torch.relu(torch.randn(b, C, *grid_r, generator=g, dtype=torch.float64) + 0.3)
    with torch.no_grad():
        (e_q, b_q), (e_r, b_r) = head.equivalent_features(a_q), head.equivalent_features(a_r)
        raw_q, raw_r = head(a_q), head(a_r)
    # a single-FC head's bias is a view of the FC bias parameter, which requires grad even under no_grad
    b_q, b_r = b_q.detach(), b_r.detach()
    return head, a_q, a_r, (e_q, b_q, raw_q), (e_r, b_r, raw_r)


def naive_dot(u: torch.Tensor, v: torch.Tensor) -> float:
    return sum(float(u[k]) * float(v[k]) for k in range(len(u)))


def naive_norm(u: torch.Tensor) -> float:
    return math.sqrt(naive_dot(u, u))


@pytest.mark.parametrize("name", HEADS)
def test_point_to_point_and_overall_maps_match_loops(name):
    _, _, _, (e_q, b_q, raw_q), (e_r, b_r, raw_r) = random_pairs(name)
    bsz, h, w, _ = e_q.shape
    _, xs, ys, _ = e_r.shape
    p = torch.zeros(bsz, h, w, xs, ys, dtype=torch.float64)
    dec_q = torch.zeros(bsz, h, w, dtype=torch.float64)
    dec_bias_q = torch.zeros(bsz, h, w, dtype=torch.float64)
    terms = torch.zeros(3, bsz, dtype=torch.float64)
    for b in range(bsz):
        z = naive_norm(raw_q[b]) * naive_norm(raw_r[b])
        for i in range(h):
            for j in range(w):
                for x in range(xs):
                    for y in range(ys):
                        p[b, i, j, x, y] = naive_dot(e_q[b, i, j], e_r[b, x, y]) / z
                        dec_q[b, i, j] += p[b, i, j, x, y]
                dec_bias_q[b, i, j] = dec_q[b, i, j] + naive_dot(e_q[b, i, j], b_r[b]) / z
                terms[0, b] += naive_dot(e_q[b, i, j], b_r[b]) / z
        for x in range(xs):
            for y in range(ys):
                terms[1, b] += naive_dot(e_r[b, x, y], b_q[b]) / z
        terms[2, b] = naive_dot(b_q[b], b_r[b]) / z
    torch.testing.assert_close(point_to_point_map(e_q, e_r, raw_q, raw_r), p, **TIGHT)
    torch.testing.assert_close(decomposition_map(e_q, raw_q, raw_r, b_r), dec_q, **TIGHT)
    torch.testing.assert_close(decomposition_bias_map(e_q, raw_q, raw_r), dec_bias_q, **TIGHT)
    torch.testing.assert_close(torch.stack(list(bias_terms(e_q, b_q, e_r, b_r, raw_q, raw_r))), terms, **TIGHT)


@pytest.mark.parametrize("name", HEADS)
def test_point_specific_map_matches_a_loop_bilinear_interpolation(name):
    _, _, _, (e_q, _, raw_q), (e_r, _, raw_r) = random_pairs(name)
    bsz, h, w, d = e_q.shape
    positions = torch.tensor([[0.25, 0.5], [1.75, 0.0], [2.0, 1.0]], dtype=torch.float64)[:bsz]
    feature = torch.zeros(bsz, d, dtype=torch.float64)
    for b in range(bsz):
        r, c = float(positions[b, 0]), float(positions[b, 1])
        for i in range(h):
            for j in range(w):
                weight = max(0.0, 1 - abs(r - i)) * max(0.0, 1 - abs(c - j))
                feature[b] += weight * e_q[b, i, j]
    torch.testing.assert_close(interpolate_equivalent_features(e_q, positions), feature, **TIGHT)
    _, xs, ys, _ = e_r.shape
    expected = torch.zeros(bsz, xs, ys, dtype=torch.float64)
    for b in range(bsz):
        z = naive_norm(raw_q[b]) * naive_norm(raw_r[b])
        for x in range(xs):
            for y in range(ys):
                expected[b, x, y] = naive_dot(feature[b], e_r[b, x, y]) / z
    torch.testing.assert_close(point_specific_map(e_q, e_r, raw_q, raw_r, positions), expected, **TIGHT)


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("score", ["cosine", "dot", "product"])
def test_grad_cam_and_rgrad_cam_match_channel_loops(name, score):
    head, a_q, a_r, _, (_, _, raw_r) = random_pairs(name)
    batched = similarity_gradients(head, a_q, raw_r=raw_r, score=score)
    bsz, channels, h, w = a_q.shape
    for b in range(bsz):
        # the gradient of this pair alone, then Grad-CAM's channel weights and maps by loops
        a = a_q[b:b + 1].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(pair_scores(head(a), raw_r[b:b + 1], score).sum(), [a])
        weights = [sum(float(grad[0, k, i, j]) for i in range(h) for j in range(w)) / (h * w) for k in range(channels)]
        cam = torch.zeros(h, w, dtype=torch.float64)
        rcam = torch.zeros(h, w, dtype=torch.float64)
        for i in range(h):
            for j in range(w):
                cam[i, j] = max(0.0, sum(weights[k] * float(a_q[b, k, i, j]) for k in range(channels)))
                rcam[i, j] = sum(float(grad[0, k, i, j]) * float(a_q[b, k, i, j]) for k in range(channels))
        torch.testing.assert_close(grad_cam(a_q, batched.query)[b], cam, **TIGHT)
        torch.testing.assert_close(rgrad_cam(a_q, batched.query)[b], rcam, **TIGHT)


def test_dist_cam_matches_channel_loops():
    g = torch.Generator().manual_seed(2)
    q = torch.rand(3, 6, 4, 5, generator=g, dtype=torch.float64)
    ref = torch.rand(3, 6, generator=g, dtype=torch.float64)
    bsz, channels, h, w = q.shape
    expected_w = torch.zeros(bsz, channels, dtype=torch.float64)
    expected_map = torch.zeros(bsz, h, w, dtype=torch.float64)
    for b in range(bsz):
        recip = []
        for k in range(channels):
            gap = sum(float(q[b, k, i, j]) for i in range(h) for j in range(w)) / (h * w)
            recip.append(1.0 / abs(float(ref[b, k]) - gap))
        for k in range(channels):
            expected_w[b, k] = recip[k] / sum(recip)
            expected_map[b] += expected_w[b, k] * q[b, k]
    torch.testing.assert_close(dist_cam_weights(q.mean(dim=(2, 3)), ref), expected_w, **TIGHT)
    torch.testing.assert_close(dist_cam(q, ref), expected_map, **TIGHT)


def test_prototypes_and_nearest_prototype_match_loops():
    g = torch.Generator().manual_seed(3)
    feats = torch.rand(10, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([7, 2, 7, 5, 2, 2, 9, 5, 7, 9])
    classes, protos = class_prototypes(feats, labels)
    assert classes.tolist() == [2, 5, 7, 9]
    for c, proto in zip(classes.tolist(), protos):
        rows = [feats[n] for n in range(10) if int(labels[n]) == c]
        torch.testing.assert_close(proto, sum(rows) / len(rows), **TIGHT)
    queries = torch.rand(3, 4, generator=g, dtype=torch.float64)
    index, distance = nearest_prototype(queries, protos)
    for b in range(3):
        dists = [sum(abs(float(queries[b, k]) - float(p[k])) for k in range(4)) for p in protos]
        assert int(index[b]) == min(range(len(dists)), key=dists.__getitem__)
        assert float(distance[b]) == pytest.approx(min(dists), rel=1e-12)


def test_class_activation_map_matches_loops():
    g = torch.Generator().manual_seed(4)
    a = torch.rand(2, 3, 2, 3, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 3, generator=g, dtype=torch.float64)
    classes = torch.tensor([4, 1])
    expected = torch.zeros(2, 2, 3, dtype=torch.float64)
    for b in range(2):
        for k in range(3):
            expected[b] += float(weight[classes[b], k]) * a[b, k]
    torch.testing.assert_close(class_activation_map(a, weight, classes), expected, **TIGHT)


def test_box_coverage_and_partial_query_match_loops():
    image, grid = (40, 60), (4, 3)  # cells of 10 x 20 pixels
    boxes = torch.tensor([[5.0, 12.0, 30.0, 20.0], [0.0, 0.0, 60.0, 40.0], [59.0, 39.0, 5.0, 5.0]],
                         dtype=torch.float64)
    expected = torch.zeros(3, *grid, dtype=torch.float64)
    for b, (x, y, bw, bh) in enumerate(boxes.tolist()):
        for i in range(grid[0]):
            for j in range(grid[1]):
                top, left = i * 10, j * 20
                overlap_h = max(0.0, min(y + bh, top + 10) - max(y, top))
                overlap_w = max(0.0, min(x + bw, left + 20) - max(x, left))
                expected[b, i, j] = overlap_h * overlap_w / 200
    mask = box_coverage_mask(boxes, image, grid)
    torch.testing.assert_close(mask, expected, **TIGHT)
    g = torch.Generator().manual_seed(5)
    e_q = torch.randn(3, *grid, 6, generator=g, dtype=torch.float64)
    raw_q = torch.randn(3, 6, generator=g, dtype=torch.float64)
    expected_q = torch.zeros(3, 6, dtype=torch.float64)
    for b in range(3):
        for i in range(grid[0]):
            for j in range(grid[1]):
                expected_q[b] += float(mask[b, i, j]) * e_q[b, i, j]
        expected_q[b] /= naive_norm(raw_q[b])
    torch.testing.assert_close(partial_query(e_q, raw_q, mask), expected_q, **TIGHT)


@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_rank_gallery_matches_a_sorted_loop(metric):
    g = torch.Generator().manual_seed(6)
    queries = torch.randn(2, 5, generator=g, dtype=torch.float64)
    gallery = torch.nn.functional.normalize(torch.randn(9, 5, generator=g, dtype=torch.float64), dim=1)
    scores, indices = rank_gallery(queries, gallery, k=4, metric=metric)
    for b in range(2):
        norm = naive_norm(queries[b]) if metric == "cosine" else 1.0
        sims = [naive_dot(queries[b], gallery[n]) / norm for n in range(9)]
        order = sorted(range(9), key=lambda n: -sims[n])[:4]
        assert indices[b].tolist() == order
        torch.testing.assert_close(scores[b], torch.tensor([sims[n] for n in order], dtype=torch.float64), **TIGHT)
