"""Channel-weighted sums of a feature map: the core that CAM, Grad-CAM and Dist-CAM share.

Each of these maps is ``sum_k w[b, k] A[b, k]`` for per-pair channel weights ``w``; the methods
differ only in where ``w`` comes from (classifier weights, averaged gradients, reciprocal channel
distances). Feature maps are B x C x H x W, maps B x H x W.
"""
from __future__ import annotations

import torch


def channel_weighted_sum(feature_map: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the channels of each feature map (activation-decomposition-tip2021 Eq. 1, inner sum).

    Args:
        feature_map: A, B x C x H x W.
        weights: per-pair channel weights, B x C.

    Returns:
        The maps ``sum_k weights[b, k] * A[b, k]``, B x H x W.
    """
    if weights.shape != feature_map.shape[:2]:
        raise ValueError(f"channel weights: expected shape {tuple(feature_map.shape[:2])} (B x C) for a feature map "
                         f"of shape {tuple(feature_map.shape)}, got {tuple(weights.shape)}")
    return torch.einsum("bchw,bc->bhw", feature_map, weights)


def class_activation_map(
    feature_map: torch.Tensor, classifier_weight: torch.Tensor, classes: torch.Tensor
) -> torch.Tensor:
    """CAM of a GAP + linear classifier for one class per image (dist-cam Eq. 3).

    The classifier bias is left out, as in CAM; for a GAP + linear classifier the logit of class c is
    ``map.mean((1, 2)) + bias[c]`` (activation-decomposition-tip2021 Eq. 1).

    Args:
        feature_map: A, B x C x H x W.
        classifier_weight: the classifier's weight matrix, n_classes x C (``nn.Linear.weight``).
        classes: the class to explain for each image, B (integer).

    Returns:
        ``sum_k w[c_b, k] A[b, k]``, B x H x W.
    """
    if classifier_weight.ndim != 2 or classifier_weight.shape[1] != feature_map.shape[1]:
        raise ValueError(f"classifier_weight: expected n_classes x {feature_map.shape[1]}, "
                         f"got {tuple(classifier_weight.shape)}")
    return channel_weighted_sum(feature_map, classifier_weight[classes])
