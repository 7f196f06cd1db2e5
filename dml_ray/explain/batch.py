"""Every configured map for a batch of (image, reference) pairs, from stored feature maps and the head alone.

References arrive as vectors (raw embedding E^r, head bias B^r, GAP feature), so no reference image
is ever run through the network again (DESIGN.md "The one invariant behind every activation map").
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dml_ray.explain.decomposition import decomposition_bias_map, decomposition_map
from dml_ray.explain.distcam import dist_cam
from dml_ray.explain.gradcam import grad_cam, pair_scores, rgrad_cam, similarity_gradients

GRADIENT_METHODS = {"gradcam": ("cosine", grad_cam), "gradcam_nonorm": ("dot", grad_cam),
                    "rgradcam": ("product", rgrad_cam)}


def reference_maps(head: nn.Module, feature_map_q: torch.Tensor, raw_r: torch.Tensor, bias_r: torch.Tensor,
                   gap_r: torch.Tensor, methods: Sequence[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Maps (B x H x W per method) of the query images against their references, and the pairs' cosines.

    decomposition / decomposition_bias: activation-decomposition-tip2021 Eq. 5 summed over the reference;
    distcam: dist-cam Eq. 4-6 against ``gap_r``; gradcam, gradcam_nonorm, rgradcam: Sec. V through one
    backward of the head for the whole batch (rgradcam differentiates the product ``E^q . E^r`` over a
    constant ``Z``, so it equals decomposition_bias exactly; ``gradcam.py``). Under autocast
    (``explain.precision``) the decomposition and Dist-CAM maps follow it; the gradient methods run in float32.
    """
    with torch.no_grad():
        e_q, bias_q = head.equivalent_features(feature_map_q)
        raw_q = e_q.sum(dim=(1, 2)) + bias_q
        scores = pair_scores(raw_q, raw_r, "cosine")
    maps: dict[str, torch.Tensor] = {}
    for method in methods:
        if method == "decomposition":
            maps[method] = decomposition_map(e_q, raw_q, raw_r, bias_r)
        elif method == "decomposition_bias":
            maps[method] = decomposition_bias_map(e_q, raw_q, raw_r)
        elif method == "distcam":
            maps[method] = dist_cam(feature_map_q, gap_r)
        elif method in GRADIENT_METHODS:
            # always float32: the cosine's gradient is a difference of nearly equal terms that bf16 cancels
            # (measured on a random tiny_cnn: errors up to 58x the map's range under bf16 autocast)
            score, combine = GRADIENT_METHODS[method]
            wide = torch.promote_types(feature_map_q.dtype, torch.float32)  # float64 inputs stay float64
            with torch.autocast(feature_map_q.device.type, enabled=False):
                grads = similarity_gradients(head, feature_map_q.to(wide), raw_r=raw_r.to(wide), score=score)
                maps[method] = combine(feature_map_q.to(wide), grads.query)
        else:
            raise ValueError(f"explain.methods: unknown method {method!r}")
    return {k: v.detach() for k, v in maps.items()}, scores
