"""Every method's maps for one (query, reference) image pair, on both images, through the full model."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from dml_ray.explain.batch import GRADIENT_METHODS
from dml_ray.explain.decomposition import (
    decomposition_bias_map,
    decomposition_map,
    point_specific_map,
    point_to_point_map,
)
from dml_ray.explain.distcam import dist_cam, gap_feature
from dml_ray.explain.gradcam import similarity_gradients
from dml_ray.models.embedding import EmbeddingModel

ALL_METHODS = ("decomposition", "decomposition_bias", "distcam", "gradcam", "gradcam_nonorm", "rgradcam")


def explain_pair(model: EmbeddingModel, query: torch.Tensor, reference: torch.Tensor,
                 methods: Sequence[str] = ALL_METHODS) -> dict[str, np.ndarray]:
    """Arrays for a pair of transformed images (3 x S x S each): feature maps, raw embeddings, equivalent
    features and biases, the point-to-point tensor, each method's map on both images ("<method>_query",
    "<method>_reference", H x W) and the point-specific map of the query's most activated point.

    activation-decomposition-tip2021 Eq. 5 (decomposition), Sec. V (Grad-CAM family); dist-cam Eq. 4-6.
    """
    model = model.eval()
    with torch.no_grad():
        a = model.backbone(torch.stack([query, reference]))
        e, bias = model.equivalent_features(a)
        raw = e.sum(dim=(1, 2)) + bias
    a_q, a_r, e_q, e_r, raw_q, raw_r = a[:1], a[1:], e[:1], e[1:], raw[:1], raw[1:]
    out: dict[str, np.ndarray] = {
        "feature_map_query": a_q[0].numpy(), "feature_map_reference": a_r[0].numpy(),
        "raw_query": raw_q[0].numpy(), "raw_reference": raw_r[0].numpy(),
        "equivalent_features_query": e_q[0].numpy(), "equivalent_features_reference": e_r[0].numpy(),
        "bias_query": bias[0].numpy(), "bias_reference": bias[1].numpy(),
        "point_to_point": point_to_point_map(e_q, e_r, raw_q, raw_r)[0].numpy(),
        "cosine": np.float32(torch.nn.functional.cosine_similarity(raw_q, raw_r)[0]),
    }
    for method in methods:
        if method == "decomposition":
            q = decomposition_map(e_q, raw_q, raw_r, bias[1:])
            r = decomposition_map(e_r, raw_r, raw_q, bias[:1])
        elif method == "decomposition_bias":
            q, r = decomposition_bias_map(e_q, raw_q, raw_r), decomposition_bias_map(e_r, raw_r, raw_q)
        elif method == "distcam":
            q, r = dist_cam(a_q, gap_feature(a_r)), dist_cam(a_r, gap_feature(a_q))
        elif method in GRADIENT_METHODS:
            score, combine = GRADIENT_METHODS[method]
            grads = similarity_gradients(model.head, a_q, feature_map_r=a_r, score=score)
            q, r = combine(a_q, grads.query), combine(a_r, grads.reference)
        else:
            raise ValueError(f"unknown method {method!r}; expected one of: {', '.join(ALL_METHODS)}")
        out[f"{method}_query"], out[f"{method}_reference"] = q[0].detach().numpy(), r[0].detach().numpy()
    overall = decomposition_bias_map(e_q, raw_q, raw_r)[0]
    point = torch.tensor(np.unravel_index(int(overall.argmax()), overall.shape), dtype=torch.float32)
    out["query_point"] = point.numpy()
    out["point_specific_reference"] = point_specific_map(e_q, e_r, raw_q, raw_r, point.view(1, 2))[0].numpy()
    return out
