"""Identities of the activation maps (activation-decomposition-tip2021 Sec. III-V, VII; dist-cam Eq. 4-7).

Random heads of every kind (GAP / GMP / flatten, FC, BN with random running statistics in eval mode,
a hidden ReLU), float64, so the identities hold to ~1e-10.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dml_ray.explain import (
    aerial_azimuth,
    angle_error,
    bias_terms,
    box_coverage_mask,
    channel_weighted_sum,
    class_activation_map,
    cosine_normaliser,
    decomposition_bias_map,
    decomposition_map,
    dist_cam,
    dist_cam_weights,
    estimate_orientation,
    gap_feature,
    grad_cam,
    pair_scores,
    panorama_azimuth,
    partial_query,
    pixel_to_grid,
    point_query,
    point_specific_map,
    point_to_point_map,
    rank_gallery,
    rgrad_cam,
    similarity_gradients,
    upsample_map,
)
from dml_ray.explain.batch import reference_maps
from dml_ray.models.heads import EmbeddingHead
from tests.heads import random_eval_head

C, GRID_Q, GRID_R = 5, (3, 4), (2, 5)
HEADS = {
    "gap": dict(pooling="gap", embedding_dim=None),
    "gap-fc": dict(pooling="gap", embedding_dim=6),
    "gap-fc-bn": dict(pooling="gap", embedding_dim=6, bn=True),
    "gap-relu-bn": dict(pooling="gap", embedding_dim=6, hidden_dims=[10], bn=True),
    "gmp": dict(pooling="gmp", embedding_dim=None),
    "gmp-fc": dict(pooling="gmp", embedding_dim=6),
    "gmp-relu-bn": dict(pooling="gmp", embedding_dim=6, hidden_dims=[10, 8], bn=True),
    "flatten-fc": dict(pooling="flatten", embedding_dim=6),
    "flatten-relu-bn": dict(pooling="flatten", embedding_dim=6, hidden_dims=[10], bn=True),
}
GAP_HEADS = [k for k in HEADS if k.startswith("gap")]
OTHER_HEADS = [k for k in HEADS if not k.startswith("gap")]
TIGHT = dict(rtol=1e-9, atol=1e-10)


def make_head(name: str, seed: int = 0) -> EmbeddingHead:
    """A float64 eval-mode head with random FC biases and random BN statistics."""
    return random_eval_head(C, GRID_Q, seed=seed, **HEADS[name])


def make_maps(name: str, b: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative (post-ReLU-like) query and reference feature maps; flatten heads need one grid size."""
    g = torch.Generator().manual_seed(seed)
    grid_r = GRID_Q if name.startswith("flatten") else GRID_R
    a_q = torch.relu(torch.randn(b, C, *GRID_Q, generator=g, dtype=torch.float64) + 0.3)
    a_r = torch.relu(torch.randn(b, C, *grid_r, generator=g, dtype=torch.float64) + 0.3)
    return a_q, a_r


@torch.no_grad()
def decompose(head: EmbeddingHead, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Equivalent features, bias and raw embedding of feature maps."""
    e, bias = head.equivalent_features(a)
    return e, bias, head(a)


def projected_decomposition(e_q: torch.Tensor, raw_q: torch.Tensor, raw_r: torch.Tensor) -> torch.Tensor:
    """Eq. 10 / 12 / 14 written out: e_ij . (E^r - (u . E^r) u) / Z with u = E^q / |E^q|."""
    u = F.normalize(raw_q, dim=1)
    projected = raw_r - (u * raw_r).sum(1, keepdim=True) * u
    return torch.einsum("bijd,bd->bij", e_q, projected) / cosine_normaliser(raw_q, raw_r).view(-1, 1, 1)


@pytest.mark.parametrize("name", HEADS)
def test_point_to_point_map_plus_bias_terms_is_the_cosine(name):
    head = make_head(name)
    a_q, a_r = make_maps(name)
    (e_q, b_q, raw_q), (e_r, b_r, raw_r) = decompose(head, a_q), decompose(head, a_r)
    p = point_to_point_map(e_q, e_r, raw_q, raw_r)
    assert p.shape == (4, *GRID_Q, *e_r.shape[1:3])
    terms = bias_terms(e_q, b_q, e_r, b_r, raw_q, raw_r)
    total = p.sum(dim=(1, 2, 3, 4)) + sum(terms)
    torch.testing.assert_close(total, F.cosine_similarity(raw_q, raw_r), **TIGHT)
    # the bias terms are not negligible here (heads with an FC), or the test would not check them
    assert not head.fcs or min(t.abs().min() for t in terms) > 1e-3


@pytest.mark.parametrize("name", HEADS)
def test_overall_maps_sum_to_the_cosine(name):
    head = make_head(name)
    a_q, a_r = make_maps(name)
    (e_q, b_q, raw_q), (e_r, b_r, raw_r) = decompose(head, a_q), decompose(head, a_r)
    cos = F.cosine_similarity(raw_q, raw_r)
    z = cosine_normaliser(raw_q, raw_r)
    p_total = point_to_point_map(e_q, e_r, raw_q, raw_r).sum(dim=(1, 2, 3, 4))
    # query side: Decomposition+Bias (Eq. 5 terms 1-2) plus the query-bias term B^q . E^r / Z
    query_db = decomposition_bias_map(e_q, raw_q, raw_r)
    torch.testing.assert_close(query_db.sum((1, 2)) + (b_q * raw_r).sum(1) / z, cos, **TIGHT)
    torch.testing.assert_close(decomposition_map(e_q, raw_q, raw_r, b_r).sum((1, 2)), p_total, **TIGHT)
    # reference side: the same functions with the roles swapped
    ref_db = decomposition_bias_map(e_r, raw_r, raw_q)
    torch.testing.assert_close(ref_db.sum((1, 2)) + (b_r * raw_q).sum(1) / z, cos, **TIGHT)
    torch.testing.assert_close(decomposition_map(e_r, raw_r, raw_q, b_q).sum((1, 2)), p_total, **TIGHT)
    # the overall maps are the point-to-point map summed over the other image (+ the bias term)
    terms = point_to_point_map(e_q, e_r, raw_q, raw_r)
    torch.testing.assert_close(decomposition_map(e_q, raw_q, raw_r, b_r), terms.sum((3, 4)), **TIGHT)
    torch.testing.assert_close(decomposition_map(e_r, raw_r, raw_q, b_q), terms.sum((1, 2)), **TIGHT)


@pytest.mark.parametrize("name", HEADS)
def test_rgrad_cam_no_norm_is_z_times_decomposition_bias(name):
    # Sec. V: without the GAP step and the normalisation gradient, A_ijk dS/dA_ijk summed over k is
    # e^q_ij . E^r, i.e. Decomposition+Bias times Z (exact for every head: the head is affine with its
    # GMP / ReLU masks fixed)
    head = make_head(name)
    a_q, a_r = make_maps(name)
    (e_q, _, raw_q), (e_r, _, raw_r) = decompose(head, a_q), decompose(head, a_r)
    z = cosine_normaliser(raw_q, raw_r).view(-1, 1, 1)
    grads = similarity_gradients(head, a_q, feature_map_r=a_r, score="dot")
    torch.testing.assert_close(grads.score, (raw_q * raw_r).sum(1), **TIGHT)
    torch.testing.assert_close(rgrad_cam(a_q, grads.query), z * decomposition_bias_map(e_q, raw_q, raw_r), **TIGHT)
    torch.testing.assert_close(rgrad_cam(a_r, grads.reference), z * decomposition_bias_map(e_r, raw_r, raw_q),
                               **TIGHT)


@pytest.mark.parametrize("name", HEADS)
def test_rgrad_cam_method_equals_decomposition_bias_exactly(name):
    # Sec. V and the authors' code: RGrad-CAM differentiates the product E^q . E^r with the normaliser
    # Z held constant (no GAP step, no gradient through the L2 normalisation), so the RGrad-CAM map IS
    # the Decomposition+Bias map, on both images of a pair, not Z times it and not its projection
    head = make_head(name)
    a_q, a_r = make_maps(name)
    (e_q, _, raw_q), (e_r, b_r, raw_r) = decompose(head, a_q), decompose(head, a_r)
    grads = similarity_gradients(head, a_q, feature_map_r=a_r, score="product")
    torch.testing.assert_close(grads.score, F.cosine_similarity(raw_q, raw_r), **TIGHT)
    torch.testing.assert_close(rgrad_cam(a_q, grads.query), decomposition_bias_map(e_q, raw_q, raw_r), **TIGHT)
    torch.testing.assert_close(rgrad_cam(a_r, grads.reference), decomposition_bias_map(e_r, raw_r, raw_q), **TIGHT)
    # the batched stage's method "rgradcam" (references given as vectors) is the same map
    maps, scores = reference_maps(head, a_q, raw_r, b_r, gap_feature(a_r), ["rgradcam", "decomposition_bias"])
    torch.testing.assert_close(maps["rgradcam"], maps["decomposition_bias"], **TIGHT)
    torch.testing.assert_close(scores, F.cosine_similarity(raw_q, raw_r), **TIGHT)


@pytest.mark.parametrize("name", HEADS)
def test_rgrad_cam_cosine_is_the_projected_decomposition(name):
    # Eq. 12 and 14: the cosine's gradient goes through the Jacobian of E / |E|
    head = make_head(name)
    a_q, a_r = make_maps(name)
    (e_q, _, raw_q), raw_r = decompose(head, a_q), head(a_r)
    grads = similarity_gradients(head, a_q, raw_r=raw_r, score="cosine")
    torch.testing.assert_close(grads.score, F.cosine_similarity(raw_q, raw_r), **TIGHT)
    assert grads.reference is None
    torch.testing.assert_close(rgrad_cam(a_q, grads.query), projected_decomposition(e_q, raw_q, raw_r), **TIGHT)


@pytest.mark.parametrize("name", GAP_HEADS)
def test_grad_cam_equals_decomposition_for_gap_heads(name):
    # Eq. 10: with GAP pooling W_ij = GAP(W) for every (i, j), whatever FC / BN / ReLU follows, so
    # Grad-CAM (no norm) before its ReLU is Z * Decomposition+Bias: proportional, ratio Z
    head = make_head(name)
    a_q, a_r = make_maps(name)
    (e_q, _, raw_q), raw_r = decompose(head, a_q), head(a_r)
    z = cosine_normaliser(raw_q, raw_r).view(-1, 1, 1)
    db = decomposition_bias_map(e_q, raw_q, raw_r)
    grads = similarity_gradients(head, a_q, raw_r=raw_r, score="dot")
    before_relu = channel_weighted_sum(a_q, grads.query.mean(dim=(2, 3)))
    ratio = before_relu / db
    torch.testing.assert_close(ratio, z.expand_as(ratio), **TIGHT)
    torch.testing.assert_close(grad_cam(a_q, grads.query), torch.relu(z * db), **TIGHT)
    # Grad-CAM with the cosine: Eq. 10 with the normalisation Jacobian
    cos_grads = similarity_gradients(head, a_q, raw_r=raw_r, score="cosine")
    torch.testing.assert_close(grad_cam(a_q, cos_grads.query),
                               torch.relu(projected_decomposition(e_q, raw_q, raw_r)), **TIGHT)


@pytest.mark.parametrize("name", OTHER_HEADS)
def test_grad_cam_differs_from_decomposition_for_gmp_and_flatten_heads(name):
    # Eq. 8-9: the GAP step spreads the weight of the max position (GMP) or averages the per-position
    # weight blocks (flatten), so Grad-CAM (no norm) is not proportional to Decomposition+Bias
    head = make_head(name)
    a_q, a_r = make_maps(name)
    (e_q, _, raw_q), raw_r = decompose(head, a_q), head(a_r)
    db = (cosine_normaliser(raw_q, raw_r).view(-1, 1, 1) * decomposition_bias_map(e_q, raw_q, raw_r)).flatten(1)
    grads = similarity_gradients(head, a_q, raw_r=raw_r, score="dot")
    before_relu = channel_weighted_sum(a_q, grads.query.mean(dim=(2, 3))).flatten(1)
    relative = (before_relu - db).norm(dim=1) / db.norm(dim=1)
    correlation = torch.stack([torch.corrcoef(torch.stack([g, d]))[0, 1] for g, d in zip(before_relu, db)])
    assert relative.min() > 0.3, relative
    assert correlation.max() < 0.95, correlation


def test_hidden_relu_masks_are_active():
    # the ReLU heads above must zero some hidden units, or they prove nothing about the ReLU mask
    for name in ("gap-relu-bn", "gmp-relu-bn", "flatten-relu-bn"):
        head = make_head(name)
        a_q, _ = make_maps(name)
        hidden = head.bns[0](head.fcs[0](head.pool(a_q)))
        assert (hidden < 0).any() and (hidden > 0).any(), name


@pytest.mark.parametrize("name", ["gap-relu-bn", "gmp-relu-bn", "flatten-relu-bn"])
@pytest.mark.parametrize("score", ["cosine", "dot"])
def test_one_backward_gives_each_pairs_gradient(name, score):
    head = make_head(name)
    a_q, a_r = make_maps(name, b=5)
    batched = similarity_gradients(head, a_q, feature_map_r=a_r, score=score)
    for b in range(5):
        single = similarity_gradients(head, a_q[b:b + 1], feature_map_r=a_r[b:b + 1], score=score)
        torch.testing.assert_close(batched.score[b:b + 1], single.score, **TIGHT)
        torch.testing.assert_close(batched.query[b:b + 1], single.query, **TIGHT)
        torch.testing.assert_close(batched.reference[b:b + 1], single.reference, **TIGHT)
    # a fixed reference embedding gives the same query gradient as its feature map
    fixed = similarity_gradients(head, a_q, raw_r=head(a_r), score=score)
    torch.testing.assert_close(fixed.query, batched.query, **TIGHT)
    assert all(p.grad is None for p in head.parameters())


def test_gradients_refuse_a_training_head_and_a_double_reference():
    head = make_head("gap-fc-bn").train()
    a_q, a_r = make_maps("gap-fc-bn")
    with pytest.raises(RuntimeError, match="eval mode"):
        similarity_gradients(head, a_q, raw_r=torch.zeros(4, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="exactly one of raw_r"):
        similarity_gradients(head.eval(), a_q)
    with pytest.raises(ValueError, match="unknown score 'l2'"):
        pair_scores(torch.ones(2, 3), torch.ones(2, 3), "l2")


def test_dist_cam_weights_are_a_normalised_reciprocal_of_channel_distances():
    g = torch.Generator().manual_seed(0)
    a_q = torch.rand(3, 7, 4, 4, generator=g, dtype=torch.float64)
    gap_ref = torch.rand(3, 7, generator=g, dtype=torch.float64)
    gap_q = gap_feature(a_q)
    w = dist_cam_weights(gap_q, gap_ref)
    d = (gap_q - gap_ref).abs()
    assert (w > 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(3, dtype=torch.float64), **TIGHT)
    wd = w * d
    torch.testing.assert_close(wd, wd[:, :1].expand_as(wd), **TIGHT)
    torch.testing.assert_close(dist_cam(a_q, gap_ref), torch.einsum("bchw,bc->bhw", a_q, w), **TIGHT)
    # a channel matching exactly gets the clamped weight, not inf / nan, also from float16 maps
    gap_ref[:, 0] = gap_q[:, 0]
    w = dist_cam_weights(gap_q, gap_ref, eps=1e-6)
    assert torch.isfinite(w).all() and (w[:, 0] > 0.99).all()
    half = dist_cam(a_q.half(), gap_ref.half())
    assert half.dtype == torch.float32 and torch.isfinite(half).all()


def test_dist_cam_leaves_channels_dead_in_both_images_out_of_the_normalisation():
    # a channel that is zero in the query and in the reference carries no evidence: Eq. 4-6 over the
    # live channels alone, not a 1 / eps weight that shrinks every other weight a millionfold
    g = torch.Generator().manual_seed(3)
    a_q = torch.relu(torch.randn(3, 8, 4, 4, generator=g, dtype=torch.float64) + 0.5)
    gap_ref = torch.rand(3, 8, generator=g, dtype=torch.float64)
    dead = [1, 5]
    a_q[:, dead] = 0.0
    gap_ref[:, dead] = 0.0
    live = [k for k in range(8) if k not in dead]
    d = (gap_feature(a_q)[:, live] - gap_ref[:, live]).abs()
    w_live = (1 / d) / (1 / d).sum(1, keepdim=True)
    w = dist_cam_weights(gap_feature(a_q), gap_ref)
    torch.testing.assert_close(w[:, live], w_live, **TIGHT)
    assert (w[:, dead] == 0).all()
    expected = torch.einsum("bchw,bc->bhw", a_q[:, live], w_live)
    torch.testing.assert_close(dist_cam(a_q, gap_ref), expected, **TIGHT)
    # a channel zero in the query only (or in the reference only) is evidence and keeps its weight
    a_q[0, 2], gap_ref[1, 3] = 0.0, 0.0
    w = dist_cam_weights(gap_feature(a_q), gap_ref)
    assert (w[0, 2] > 0) and (w[1, 3] > 0)
    # every channel dead: an all-zero map, not nan
    assert (dist_cam(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3)) == 0).all()


def test_class_activation_map_averages_to_the_logit_of_a_gap_classifier():
    torch.manual_seed(0)
    classifier = nn.Linear(C, 3).double()
    a = torch.rand(4, C, 3, 3, dtype=torch.float64)
    classes = torch.tensor([0, 2, 1, 2])
    cam = class_activation_map(a, classifier.weight, classes)
    logits = classifier(a.mean(dim=(2, 3)))
    torch.testing.assert_close(cam.mean((1, 2)) + classifier.bias[classes], logits[torch.arange(4), classes], **TIGHT)


@pytest.mark.parametrize("name", HEADS)
def test_full_image_roi_ranks_like_full_embeddings(name):
    head = make_head(name)
    a_q, _ = make_maps(name, b=3)
    gallery_maps, _ = make_maps(name, b=20, seed=7)
    gallery_raw = head(gallery_maps)
    gallery = F.normalize(gallery_raw, dim=1)
    e_q, b_q, raw_q = decompose(head, a_q)
    full = box_coverage_mask(torch.tensor([[0.0, 0.0, 64.0, 48.0]] * 3), (48, 64), GRID_Q)
    torch.testing.assert_close(full, torch.ones(3, *GRID_Q))
    query = partial_query(e_q, raw_q, full, bias_q=b_q)
    torch.testing.assert_close(query, F.normalize(raw_q, dim=1), **TIGHT)
    scores, indices = rank_gallery(query, gallery, k=20)
    expected = (F.normalize(raw_q, dim=1) @ gallery.t()).sort(dim=1, descending=True)
    assert torch.equal(indices, expected.indices)
    torch.testing.assert_close(scores, expected.values, **TIGHT)
    # a partial query's dot score is the Decomposition+Bias map of that pair summed over the RoI
    roi = box_coverage_mask(torch.tensor([[10.0, 5.0, 30.0, 20.0]] * 3), (48, 64), GRID_Q)
    part = partial_query(e_q, raw_q, roi)
    for g in range(20):
        db = decomposition_bias_map(e_q, raw_q, gallery_raw[g].expand(3, -1))
        torch.testing.assert_close(part @ gallery[g], (db * roi).sum((1, 2)), **TIGHT)


def test_point_specific_map_is_a_row_of_the_point_to_point_map_and_interpolates_it():
    head = make_head("gmp-relu-bn")
    a_q, a_r = make_maps("gmp-relu-bn")
    (e_q, _, raw_q), (e_r, _, raw_r) = decompose(head, a_q), decompose(head, a_r)
    p = point_to_point_map(e_q, e_r, raw_q, raw_r)
    cells = torch.tensor([[0, 0], [2, 3], [1, 2], [2, 0]])
    rows = point_specific_map(e_q, e_r, raw_q, raw_r, cells)
    torch.testing.assert_close(rows, p[torch.arange(4), cells[:, 0], cells[:, 1]], **TIGHT)
    # a pixel's map is P bilinearly upsampled over the query grid, read at that pixel (K points per pair)
    image = (30, 40)
    pixels = torch.tensor([[[0, 0], [29, 39], [13, 7]]] * 4)
    maps = point_specific_map(e_q, e_r, raw_q, raw_r, pixel_to_grid(pixels, image, GRID_Q))
    up = upsample_map(p.permute(0, 3, 4, 1, 2), image)  # B x X x Y x 30 x 40
    expected = torch.stack([up[:, :, :, r, c] for r, c in pixels[0].tolist()], dim=1)
    torch.testing.assert_close(maps, expected, **TIGHT)
    # the interactive point query is the same interpolated feature
    q = point_query(e_q, raw_q, pixels[:, 2], image)
    torch.testing.assert_close(torch.einsum("bd,bxyd->bxy", q, e_r) / raw_r.norm(dim=1).view(-1, 1, 1),
                               maps[:, 2], **TIGHT)


def test_analytic_one_channel_two_by_two_gap_head():
    # E = w * GAP(A) + b with w = 2, b = 1, d = 1; e_ij = w A_ij / 4 = A_ij / 2
    head = EmbeddingHead(1, pooling="gap", embedding_dim=1).double().eval()
    head.fcs[0].weight.data.fill_(2.0)
    head.fcs[0].bias.data.fill_(1.0)
    a_q = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)  # E^q = 2 * 2.5 + 1 = 6
    a_r = torch.tensor([[[[0.0, 1.0], [1.0, 2.0]]]], dtype=torch.float64)  # E^r = 2 * 1 + 1 = 3
    (e_q, b_q, raw_q), (e_r, b_r, raw_r) = decompose(head, a_q), decompose(head, a_r)
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(e_q[0, :, :, 0], t([0.5, 1.0], [1.5, 2.0]))
    torch.testing.assert_close(e_r[0, :, :, 0], t([0.0, 0.5], [0.5, 1.0]))
    torch.testing.assert_close(raw_q, t([6.0])), torch.testing.assert_close(raw_r, t([3.0]))
    # Z = 18; P[i,j,x,y] = e^q_ij e^r_xy / 18
    p = point_to_point_map(e_q, e_r, raw_q, raw_r)
    torch.testing.assert_close(p[0, 1, 1], t([0.0, 1 / 18], [1 / 18, 2 / 18]))
    torch.testing.assert_close(p[0, 0, 0], t([0.0, 0.25 / 18], [0.25 / 18, 0.5 / 18]))
    # bias terms: sum e^q . B^r = 5, sum e^r . B^q = 2, B^q B^r = 1; P sums to 5 * 2 = 10; 10+5+2+1 = 18
    terms = bias_terms(e_q, b_q, e_r, b_r, raw_q, raw_r)
    torch.testing.assert_close(torch.stack(list(terms)), t([5 / 18], [2 / 18], [1 / 18]))
    torch.testing.assert_close(p.sum((1, 2, 3, 4)), t(10 / 18))
    # Decomposition: e^q (E^r - B^r) / Z = e^q * 2 / 18; Decomposition+Bias: e^q * 3 / 18
    torch.testing.assert_close(decomposition_map(e_q, raw_q, raw_r, b_r)[0], t([1 / 18, 2 / 18], [3 / 18, 4 / 18]))
    torch.testing.assert_close(decomposition_bias_map(e_q, raw_q, raw_r)[0], t([1 / 12, 1 / 6], [1 / 4, 1 / 3]))
    # reference side: e^r (E^q - B^q) / Z = e^r * 5 / 18
    torch.testing.assert_close(decomposition_map(e_r, raw_r, raw_q, b_q)[0], t([0.0, 2.5 / 18], [2.5 / 18, 5 / 18]))
    # Grad-CAM (no norm): dS/dA_ij = E^r * w / 4 = 1.5 everywhere, map = 1.5 A = 18 * Decomposition+Bias
    dot = similarity_gradients(head, a_q, feature_map_r=a_r, score="dot")
    torch.testing.assert_close(dot.score, t(18.0))
    torch.testing.assert_close(dot.query[0, 0], torch.full((2, 2), 1.5, dtype=torch.float64))
    torch.testing.assert_close(grad_cam(a_q, dot.query)[0], t([1.5, 3.0], [4.5, 6.0]))
    torch.testing.assert_close(rgrad_cam(a_q, dot.query)[0], t([1.5, 3.0], [4.5, 6.0]))
    # reference: dS/dA^r = E^q * w / 4 = 3, map = 3 A^r
    torch.testing.assert_close(rgrad_cam(a_r, dot.reference)[0], t([0.0, 3.0], [3.0, 6.0]))
    # Grad-CAM (cosine): with d = 1 the cosine is sign(E^q E^r) = 1, its gradient (Eq. 14) is 0
    cos = similarity_gradients(head, a_q, raw_r=raw_r, score="cosine")
    torch.testing.assert_close(cos.score, t(1.0))
    torch.testing.assert_close(grad_cam(a_q, cos.query)[0], torch.zeros(2, 2, dtype=torch.float64))
    # Dist-CAM: one channel, W = 1, map = A^q
    torch.testing.assert_close(dist_cam(a_q, gap_feature(a_r))[0], a_q[0, 0])
    # interactive: the RoI cell (0, 0) gives e^q_00 / |E^q| = 0.5 / 6
    roi = torch.tensor([[[True, False], [False, False]]])
    torch.testing.assert_close(partial_query(e_q, raw_q, roi), t([0.5 / 6]))
    # CAM with classifier weights [[2]] for class 0 is 2 A
    torch.testing.assert_close(class_activation_map(a_q, t([2.0]), torch.tensor([0]))[0], 2 * a_q[0, 0])


def test_azimuths_follow_the_documented_conventions():
    size = (5, 5)  # centre (2, 2)
    down, left, up, right = [2 + 2, 2], [2, 0], [0, 2], [2, 4]
    angles = aerial_azimuth(torch.tensor([down, left, up, right]), size)
    torch.testing.assert_close(angles, torch.tensor([0.0, 90.0, 180.0, 270.0], dtype=torch.float64))
    anti = aerial_azimuth(torch.tensor([left]), size, zero_offset_deg=10.0, clockwise=False)
    torch.testing.assert_close(anti, torch.tensor([280.0], dtype=torch.float64))
    torch.testing.assert_close(panorama_azimuth(torch.tensor([0, 3]), 4), torch.tensor([45.0, 315.0],
                                                                                       dtype=torch.float64))
    torch.testing.assert_close(angle_error(torch.tensor([30.0, 0.0, 359.0], dtype=torch.float64),
                                           torch.tensor([31.9, 359.0, 0.0], dtype=torch.float64)),
                               torch.tensor([-1.9, 1.0, -1.0], dtype=torch.float64))


def test_orientation_point_specific_map_finds_the_matching_pattern():
    # identity GAP head (e = A / HW, no bias). The panorama (1 x 8) has pattern 0 at column 2, pattern 1
    # at column 6 and a weak pattern 2 everywhere; the aerial image (7 x 7) has pattern 1 at P1 and a
    # strong pattern 2 at P2. The panorama's overall maximum is column 6 (pattern 1); the aerial
    # overall maximum is P2 (pattern 2), but the point-specific map of column 6 peaks at P1.
    head = EmbeddingHead(3, pooling="gap", embedding_dim=None).double().eval()
    ground = torch.zeros(1, 3, 1, 8, dtype=torch.float64)
    ground[0, 0, 0, 2], ground[0, 1, 0, 6], ground[0, 2] = 5.0, 3.0, 0.1
    aerial = torch.zeros(1, 3, 7, 7, dtype=torch.float64)
    p0, p1, p2 = (3, 0), (0, 5), (6, 1)
    aerial[0, 0, p0[0], p0[1]], aerial[0, 1, p1[0], p1[1]], aerial[0, 2, p2[0], p2[1]] = 1.0, 10.0, 100.0
    (e_g, b_g, raw_g), (e_a, b_a, raw_a) = decompose(head, ground), decompose(head, aerial)
    est = estimate_orientation(e_g, b_g, raw_g, e_a, b_a, raw_a)
    assert est.ground_point.tolist() == [[0, 6]]
    assert est.aerial_point_overall.tolist() == [list(p2)]
    assert est.aerial_point_specific.tolist() == [list(p1)]
    ground_angle = 360 * 6.5 / 8
    for estimate, point in ((est.overall, p2), (est.point_specific, p1)):
        expected = (aerial_azimuth(torch.tensor([point]), (7, 7)) - ground_angle) % 360
        torch.testing.assert_close(estimate, expected)
    # upsampled to pixels, the selected pixels move into the upsampled cells
    est_px = estimate_orientation(e_g, b_g, raw_g, e_a, b_a, raw_a, ground_size=(4, 32), aerial_size=(35, 35))
    assert est_px.ground_point[0, 1] // 4 == 6
    assert (est_px.aerial_point_specific[0] // 5).tolist() == list(p1)
