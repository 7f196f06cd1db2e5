"""Activation maps for metric learning, batched over pairs, from feature maps and the head alone.

- ``decomposition``: point-to-point, overall (Decomposition, Decomposition+Bias) and point-specific
  maps, bias terms (activation-decomposition-tip2021 Sec. III-IV);
- ``gradcam``: Grad-CAM, Grad-CAM (no norm), RGrad-CAM through one backward (Sec. V);
- ``distcam``: Dist-CAM and class prototypes (dist-cam Eq. 4-7);
- ``cam``: CAM for models with a classifier, and the channel-weighted sum the CAMs share;
- ``interactive``: retrieval by a region of interest (Sec. VII-B);
- ``orientation``: cross-view orientation estimation (Sec. VII-A).
"""
from dml_ray.explain.cam import channel_weighted_sum, class_activation_map
from dml_ray.explain.decomposition import (
    BiasTerms,
    bias_terms,
    cosine_normaliser,
    decomposition_bias_map,
    decomposition_map,
    interpolate_equivalent_features,
    pixel_to_grid,
    point_specific_map,
    point_to_point_map,
    upsample_map,
)
from dml_ray.explain.distcam import (
    channel_distances,
    class_prototypes,
    dist_cam,
    dist_cam_weights,
    gap_feature,
    nearest_prototype,
)
from dml_ray.explain.gradcam import Score, SimilarityGradients, grad_cam, pair_scores, rgrad_cam, similarity_gradients
from dml_ray.explain.interactive import Metric, box_coverage_mask, partial_query, point_query, rank_gallery
from dml_ray.explain.orientation import (
    OrientationEstimate,
    aerial_azimuth,
    angle_error,
    argmax_position,
    estimate_orientation,
    panorama_azimuth,
    wrap_degrees,
)

__all__ = [
    "BiasTerms",
    "Metric",
    "OrientationEstimate",
    "Score",
    "SimilarityGradients",
    "aerial_azimuth",
    "angle_error",
    "argmax_position",
    "bias_terms",
    "box_coverage_mask",
    "channel_distances",
    "channel_weighted_sum",
    "class_activation_map",
    "class_prototypes",
    "cosine_normaliser",
    "decomposition_bias_map",
    "decomposition_map",
    "dist_cam",
    "dist_cam_weights",
    "estimate_orientation",
    "gap_feature",
    "grad_cam",
    "interpolate_equivalent_features",
    "nearest_prototype",
    "pair_scores",
    "panorama_azimuth",
    "partial_query",
    "pixel_to_grid",
    "point_query",
    "point_specific_map",
    "point_to_point_map",
    "rank_gallery",
    "rgrad_cam",
    "similarity_gradients",
    "upsample_map",
    "wrap_degrees",
]
