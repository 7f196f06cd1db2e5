"""Interactive (partial) retrieval by a region of interest of the query (activation-decomposition-tip2021 Sec. VII-B).

The partial query is the query's equivalent features summed over the region of interest (RoI) and
divided by ``|E^q|`` (the paper's "equivalent feature normalized with the l2 norm of the original
embedding"). Its dot product with a stored, L2-normalised gallery embedding ``E^r / |E^r|`` is the
sum of the query's Decomposition+Bias map over the RoI, the paper's point-specific similarity, so the
gallery is never recomputed. The paper takes the feature at the RoI's centre pixel (``point_query``)
and suggests merging the features in the RoI when it is large (``partial_query``).
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from torch.nn import functional as F

from dml_ray.explain.decomposition import interpolate_equivalent_features, pixel_to_grid

Metric = Literal["dot", "cosine"]
METRICS: tuple[str, ...] = ("dot", "cosine")


def box_coverage_mask(
    boxes: torch.Tensor, image_size: tuple[int, int], grid_size: tuple[int, int]
) -> torch.Tensor:
    """Fraction of each grid cell covered by a box in pixels: the RoI on the feature grid (Sec. VII-B, RoI).

    Cell (i, j) of an H x W grid covers pixels ``[i h / H, (i + 1) h / H) x [j w / W, (j + 1) w / W)``
    of an h x w image; a cell inside the box gets 1, a cell partly inside its covered fraction.

    Args:
        boxes: (x, y, width, height) in pixels of the model-input frame, B x 4.
        image_size: (h, w) of that frame in pixels.
        grid_size: (H, W) of the feature grid.

    Returns:
        Coverage in [0, 1], B x H x W, in the boxes' floating dtype (at least float32).
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes: expected B x 4 (x, y, width, height), got shape {tuple(boxes.shape)}")
    boxes = boxes.to(torch.promote_types(boxes.dtype, torch.float32))

    def coverage(start: torch.Tensor, length: torch.Tensor, pixels: int, cells: int) -> torch.Tensor:
        step = pixels / cells
        edges = torch.arange(cells + 1, dtype=boxes.dtype, device=boxes.device) * step
        lo = torch.maximum(start.unsqueeze(1), edges[:-1])
        hi = torch.minimum((start + length).unsqueeze(1), edges[1:])
        return (hi - lo).clamp_min(0) / step

    rows = coverage(boxes[:, 1], boxes[:, 3], image_size[0], grid_size[0])
    cols = coverage(boxes[:, 0], boxes[:, 2], image_size[1], grid_size[1])
    return rows.unsqueeze(2) * cols.unsqueeze(1)


def partial_query(
    e_q: torch.Tensor, raw_q: torch.Tensor, mask: torch.Tensor, bias_q: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Partial query vector of a region of interest (activation-decomposition-tip2021 Sec. VII-B, Eq. 5 ``W_ij A_ij``).

    Args:
        e_q: query equivalent features, B x H x W x d.
        raw_q: raw query embeddings E^q, B x d.
        mask: RoI weights over the grid, B x H x W (bool, or coverage from ``box_coverage_mask``).
        bias_q: query bias B^q, B x d; when given it is added, so a full-image RoI gives ``E^q / |E^q|``.
            The paper's partial feature leaves it out.

    Returns:
        ``(sum_ij mask_ij e^q_ij [+ B^q]) / |E^q|``, B x d.
    """
    if mask.shape != e_q.shape[:3]:
        raise ValueError(f"mask: expected shape {tuple(e_q.shape[:3])} (B x H x W), got {tuple(mask.shape)}")
    vector = torch.einsum("bijd,bij->bd", e_q, mask.to(e_q.dtype))
    if bias_q is not None:
        vector = vector + bias_q
    return vector / raw_q.norm(dim=1, keepdim=True)


def point_query(
    e_q: torch.Tensor,
    raw_q: torch.Tensor,
    points: torch.Tensor,
    image_size: tuple[int, int],
) -> torch.Tensor:
    """Query vector of one pixel, the bilinearly interpolated equivalent feature over ``|E^q|``
    (activation-decomposition-tip2021 Sec. VII-B: the feature of the RoI's centre pixel).

    Args:
        e_q: query equivalent features, B x H x W x d.
        raw_q: raw query embeddings E^q, B x d.
        points: (row, column) pixel positions in the model-input frame, B x 2.
        image_size: (h, w) of that frame in pixels.

    Returns:
        ``e^q(point) / |E^q|``, B x d.
    """
    grid = pixel_to_grid(points, image_size, (e_q.shape[1], e_q.shape[2]))
    return interpolate_equivalent_features(e_q, grid) / raw_q.norm(dim=1, keepdim=True)


def rank_gallery(
    queries: torch.Tensor, gallery: torch.Tensor, k: int, metric: Metric = "dot"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gallery items for each query vector
    (activation-decomposition-tip2021 Sec. VII-B, point-specific similarity).

    Args:
        queries: query vectors (``partial_query`` / ``point_query``), B x d.
        gallery: stored L2-normalised gallery embeddings, N x d.
        k: how many to return (at most N).
        metric: "dot" (the paper's point-specific similarity, the RoI's share of the cosine similarity)
            or "cosine" (the query vector normalised too); both rank alike.

    Returns:
        ``(scores, indices)``, each B x min(k, N), best first.
    """
    if metric not in METRICS:
        raise ValueError(f"metric: unknown metric {metric!r}; expected one of: {', '.join(METRICS)}")
    if k < 1:
        raise ValueError(f"k: expected a positive int, got {k}")
    if metric == "cosine":
        queries = F.normalize(queries, dim=1)
    scores = queries @ gallery.to(queries.dtype).t()
    top = scores.topk(min(k, gallery.shape[0]), dim=1)
    return top.values, top.indices
