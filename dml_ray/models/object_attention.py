"""DeML's object-attention module (OAM) as pure tensor functions (deml-zero-shot-retrieval Sec. 3.1).

Random-walk graph propagation over the positions of conv feature maps gives an object-attention
proposal; its box crops and zooms the input for the next scale.

Decisions where the paper is silent or self-contradictory:

- Direction of propagation. Eq. 3 writes ``M <- D M`` with ``D`` row-normalised; for a uniform
  start that product is uniform at every step (each row of D sums to one), so it cannot be what
  was run. We propagate mass along the out-bound edges, ``M^T <- M^T D`` (the Markov chain of
  the remark and of GBVS [11]), which converges to the chain's stationary distribution: for these
  symmetric weights, each position's summed distance to all others. (A map with exactly two feature
  values is a bipartite graph, a periodic chain: there the uniform start recurs every two steps.)
- Identical features give a zero distance matrix; every off-diagonal edge gets a weight of
  ``EDGE_FLOOR`` on top of its distance so that rows are always normalisable (uniform there).
- Averaging maps of different grids: each layer's proposal is a distribution over its own grid, so
  it is multiplied by its number of positions (the uniform map becomes 1) before the maps are
  upsampled bilinearly and averaged; otherwise the coarse layer would dominate.
- From proposal to box: min-max normalise, keep positions ``>= threshold``, take the tight box of
  all kept pixels, then grow it symmetrically (shifted back inside the image) to at least
  ``min_fraction`` of each side. Crop-and-zoom is bilinear ``torchvision.ops.roi_align`` back to
  the input size.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F
from torchvision.ops import roi_align

EDGE_FLOOR = 1e-12


def transition_matrix(features: torch.Tensor) -> torch.Tensor:
    """Row-normalised edge weights D[a, b] = ||u_a - u_b|| of the complete graph over positions (Eq. 2).

    Args:
        features: B x N x C, one feature vector per position.

    Returns:
        B x N x N row-stochastic matrices with a zero diagonal.
    """
    n = features.shape[1]
    distance = torch.cdist(features, features)
    off_diagonal = 1.0 - torch.eye(n, dtype=features.dtype, device=features.device)
    weights = (distance + EDGE_FLOOR) * off_diagonal
    return weights / weights.sum(dim=2, keepdim=True)


def random_walk(transition: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """Mass after ``steps`` steps of the chain from the uniform start, M^T <- M^T D (Eq. 3).

    Args:
        transition: B x N x N row-stochastic matrices.
        steps: T (paper: 10).

    Returns:
        B x N distributions (each sums to one).
    """
    b, n, _ = transition.shape
    mass = torch.full((b, 1, n), 1.0 / n, dtype=transition.dtype, device=transition.device)
    for _ in range(steps):
        mass = mass @ transition
    return mass[:, 0]


def layer_proposal(feature_map: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """Random-walk proposal M^l of one conv layer (Eq. 2-3), scaled so that a uniform map is 1: B x H x W."""
    b, _, h, w = feature_map.shape
    mass = random_walk(transition_matrix(feature_map.flatten(2).transpose(1, 2)), steps)
    return (mass * (h * w)).view(b, h, w)


def attention_proposal(feature_maps: Sequence[torch.Tensor], size: tuple[int, int], steps: int = 10) -> torch.Tensor:
    """The object-attention proposal: each layer's proposal upsampled to ``size`` and averaged (Sec. 3.1).

    Args:
        feature_maps: the layers' maps U^{l_k} (B x C_k x H_k x W_k), e.g. inception4e and inception5b.
        size: (height, width) of the output map.
        steps: random-walk steps T.

    Returns:
        B x height x width.
    """
    maps = [F.interpolate(layer_proposal(u, steps)[:, None], size=size, mode="bilinear", align_corners=False)
            for u in feature_maps]
    return torch.stack(maps).mean(dim=0)[:, 0]


def attention_boxes(proposal: torch.Tensor, threshold: float = 0.5, min_fraction: float = 0.25) -> torch.Tensor:
    """Crop boxes (x0, y0, x1, y1) in pixel-edge coordinates of a B x H x W proposal, inside [0, W] x [0, H].

    Positions whose min-max normalised value is ``>= threshold`` are kept (a constant map keeps
    everything); the box is their tight box, grown to at least ``min_fraction`` of each side.
    """
    if not 0.0 <= threshold <= 1.0 or not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"attention_boxes: threshold {threshold} must be in [0, 1], min_fraction {min_fraction} "
                         "in (0, 1]")
    b, h, w = proposal.shape
    flat = proposal.reshape(b, -1)
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    normalised = ((flat - low) / (high - low).clamp_min(1e-12)).view(b, h, w)
    mask = (normalised >= threshold) | (high - low <= 1e-12).view(b, 1, 1)
    y0, y1 = _extent(mask.any(dim=2))
    x0, x1 = _extent(mask.any(dim=1))
    x0, x1 = _grow(x0, x1, w, min_fraction * w)
    y0, y1 = _grow(y0, y1, h, min_fraction * h)
    return torch.stack([x0, y0, x1, y1], dim=1)


def _extent(occupied: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First index and last index + 1 of the True entries of each row of a B x L mask (float)."""
    length = occupied.shape[1]
    index = torch.arange(length, device=occupied.device).expand_as(occupied)
    first = torch.where(occupied, index, length).amin(dim=1)
    last = torch.where(occupied, index, -1).amax(dim=1)
    return first.float(), (last + 1).float()


def _grow(start: torch.Tensor, end: torch.Tensor, length: int, min_size: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Grow [start, end) symmetrically to at least ``min_size``, then shift it back inside [0, length]."""
    size = torch.clamp(end - start, min=min_size, max=float(length))
    centre = (start + end) / 2
    new_start = torch.clamp(centre - size / 2, min=0.0)
    new_start = torch.minimum(new_start, length - size)
    return new_start, new_start + size


def crop_and_zoom(images: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear crop of each image's box, zoomed to ``size`` (the operation "crop and zoom" of Fig. 2)."""
    index = torch.arange(len(images), dtype=boxes.dtype, device=boxes.device)[:, None]
    rois = torch.cat([index, boxes.to(images.dtype)], dim=1)
    return roi_align(images, rois, output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
