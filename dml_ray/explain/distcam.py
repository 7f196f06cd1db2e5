"""Dist-CAM: class activation maps from channel-wise distances to a reference (dist-cam Eq. 4-7).

The reference is a GAP feature vector (C): the nearest gallery sample's, or a class prototype, the
mean GAP feature of the class's training samples (Eq. 7; the GAP of the mean feature map equals the
mean of the GAP features, so prototypes are stored as vectors). Only the query's feature map is needed.

Decisions where the paper is silent:

- ``norm(.)`` of Eq. 5 ("element-wise normalization") is taken as dividing by the sum, so the
  weights are positive and sum to 1. Any other rescaling by a positive number per pair (L2, max)
  gives the same map up to that factor.
- A channel whose GAP feature is zero in both the query and the reference (a dead channel: for
  post-ReLU feature maps, zero everywhere in both images) carries no evidence: it gets weight 0 and is
  left out of the normalisation, so the map is Eq. 4-6 over the live channels. (Clamping its
  ``D_k = 0`` would give it weight ``1 / eps`` and shrink every other weight a millionfold.)
- Any other ``D_k < eps`` (the query matches the reference exactly in a live channel) is clamped to
  ``eps`` before the reciprocal, so ``W_k D_k`` is constant over the live channels with ``D_k >= eps``.
"""
from __future__ import annotations

import torch

from dml_ray.explain.cam import channel_weighted_sum

DEFAULT_EPS = 1e-6


def gap_feature(feature_map: torch.Tensor) -> torch.Tensor:
    """Global average pooling of feature maps (dist-cam Eq. 4, GAP).

    Args:
        feature_map: B x C x H x W.

    Returns:
        The spatial means, B x C.
    """
    return feature_map.mean(dim=(2, 3))


def class_prototypes(gap_features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class prototypes, the mean GAP feature of each class's samples (dist-cam Eq. 7).

    Args:
        gap_features: GAP features of the training samples, N x C.
        labels: their labels, N (integer).

    Returns:
        ``(classes, prototypes)``: the sorted distinct labels (n) and their prototypes (n x C).
    """
    if gap_features.ndim != 2 or labels.shape != gap_features.shape[:1]:
        raise ValueError(f"class_prototypes: expected N x C features and N labels, got shapes "
                         f"{tuple(gap_features.shape)} and {tuple(labels.shape)}")
    classes, inverse = torch.unique(labels, return_inverse=True)
    sums = gap_features.new_zeros(len(classes), gap_features.shape[1]).index_add_(0, inverse, gap_features)
    counts = torch.bincount(inverse, minlength=len(classes)).to(gap_features.dtype)
    return classes, sums / counts.unsqueeze(1)


def channel_distances(gap_q: torch.Tensor, gap_ref: torch.Tensor) -> torch.Tensor:
    """Channel-wise L1 distances between query and reference GAP features (dist-cam Eq. 4).

    Args:
        gap_q: query GAP features, B x C.
        gap_ref: reference GAP features (nearest sample or prototype), B x C.

    Returns:
        ``D = |GAP(S) - GAP(Q)|``, B x C.
    """
    return (gap_ref - gap_q).abs()


def nearest_prototype(gap_q: torch.Tensor, prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The prototype with the smallest summed channel distance to each query (dist-cam Sec. 2, after Eq. 4).

    Args:
        gap_q: query GAP features, B x C.
        prototypes: prototypes, n x C.

    Returns:
        ``(index, distance)``: the nearest prototype's row (B, long) and its L1 distance (B).
    """
    distance = torch.cdist(gap_q, prototypes, p=1)
    best = distance.min(dim=1)
    return best.indices, best.values


def dist_cam_weights(gap_q: torch.Tensor, gap_ref: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Channel weights: normalised reciprocal channel distances (dist-cam Eq. 5).

    Args:
        gap_q: query GAP features, B x C.
        gap_ref: reference GAP features, B x C.
        eps: lower bound on the distances before the reciprocal (see the module docstring).

    Returns:
        ``W = (1 / D) / sum_k (1 / D_k)`` over the live channels, B x C: positive there, 0 on channels
        whose GAP feature is zero in both the query and the reference, each row summing to 1 (all zero
        when every channel is dead); computed in at least float32 (``1 / eps`` overflows float16).
    """
    distances = channel_distances(gap_q, gap_ref)
    reciprocal = 1.0 / distances.to(torch.promote_types(distances.dtype, torch.float32)).clamp_min(eps)
    reciprocal = reciprocal.masked_fill((gap_q == 0) & (gap_ref == 0), 0.0)
    total = reciprocal.sum(dim=1, keepdim=True)
    return reciprocal / torch.where(total > 0, total, torch.ones_like(total))


def dist_cam(feature_map_q: torch.Tensor, gap_ref: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Dist-CAM of the query for a reference GAP feature (dist-cam Eq. 6).

    Args:
        feature_map_q: query feature maps Q, B x C x H x W.
        gap_ref: reference GAP features (nearest gallery sample's or class prototype), B x C.
        eps: lower bound on the channel distances (``dist_cam_weights``).

    Returns:
        ``sum_k W_k Q_k``, B x H x W, in at least float32 (the feature map is promoted, as the weights are).
    """
    q = feature_map_q.to(torch.promote_types(feature_map_q.dtype, torch.float32))
    return channel_weighted_sum(q, dist_cam_weights(gap_feature(q), gap_ref.to(q.dtype), eps))
