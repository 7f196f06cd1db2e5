"""Cross-view orientation estimation from activation maps (activation-decomposition-tip2021 Sec. VII-A).

A ground-view panorama (query) is matched with an aerial image (reference) centred on the camera,
rotated by an unknown angle. The paper's procedure:

1. take the pixel with the largest value of the panorama's overall map; its column gives an
   azimuth ``a_g``;
2. overall-map estimate: the pixel with the largest value of the aerial overall map, at azimuth
   ``a_o`` around the image centre; rotation = ``a_o - a_g``;
3. point-specific estimate: the point-specific map on the aerial image of the panorama pixel of
   step 1, its largest pixel at azimuth ``a_p``; rotation = ``a_p - a_g``;
4. error = ground truth - estimate, wrapped into [-180, 180).

Assumptions (the paper states them for CVUSA only through its figures):

- the panorama spans 360 degrees linearly from its left edge (azimuth 0) to its right edge, pixel
  column c at ``360 (c + 0.5) / width``;
- on the aerial image the panorama's azimuth 0 points down (south for a north-up aerial image, the
  paper's 0 = south) and azimuths grow clockwise on screen (down, left, up, right = 0, 90, 180, 270);
  ``zero_offset_deg`` and ``clockwise`` change that;
- maps are argmaxed at the sizes given (pixels after bilinear upsampling, or the feature grid when a
  size is None); ties go to the first position in row-major order;
- "overall map" is Decomposition (``with_bias=False``) or Decomposition+Bias.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from dml_ray.explain.decomposition import (
    decomposition_bias_map,
    decomposition_map,
    pixel_to_grid,
    point_specific_map,
    upsample_map,
)

FULL_TURN = 360.0


def argmax_position(maps: torch.Tensor) -> torch.Tensor:
    """(row, column) of each map's largest value (activation-decomposition-tip2021 Sec. VII-A, "the pixel with the
    maximum activation value").

    Args:
        maps: B x H x W.

    Returns:
        Positions, B x 2 (long).
    """
    flat = maps.flatten(1).argmax(dim=1)
    width = maps.shape[2]
    return torch.stack([flat // width, flat % width], dim=1)


def panorama_azimuth(columns: torch.Tensor, width: int) -> torch.Tensor:
    """Azimuth in degrees of panorama columns
    (activation-decomposition-tip2021 Sec. VII-A, angle marks on the panorama).

    Args:
        columns: pixel columns, B (column c covers [c, c + 1)).
        width: panorama width in the same units.

    Returns:
        ``360 (c + 0.5) / width``, B, in [0, 360).
    """
    return FULL_TURN * (columns.to(torch.float64) + 0.5) / width


def aerial_azimuth(
    positions: torch.Tensor, size: tuple[int, int], zero_offset_deg: float = 0.0, clockwise: bool = True
) -> torch.Tensor:
    """Azimuth in degrees of aerial-image pixels around the image centre
    (activation-decomposition-tip2021 Sec. VII-A, angle marks on the aerial image).

    Args:
        positions: (row, column) pixel positions, B x 2.
        size: (height, width) of the aerial image in the same units.
        zero_offset_deg: azimuth of the downward direction (0: down is the panorama's azimuth 0).
        clockwise: whether azimuths grow clockwise on screen (down -> left -> up -> right).

    Returns:
        Azimuths, B, in [0, 360).
    """
    pos = positions.to(torch.float64)
    dy = pos[:, 0] - (size[0] - 1) / 2
    dx = pos[:, 1] - (size[1] - 1) / 2
    angle = torch.rad2deg(torch.atan2(-dx if clockwise else dx, dy))
    return torch.remainder(angle + zero_offset_deg, FULL_TURN)


def wrap_degrees(angles: torch.Tensor) -> torch.Tensor:
    """Angles wrapped into [-180, 180) (activation-decomposition-tip2021 Sec. VII-A, angle error).

    Args:
        angles: degrees, any shape.

    Returns:
        The same angles in [-180, 180).
    """
    half = FULL_TURN / 2
    return torch.remainder(angles + half, FULL_TURN) - half


def angle_error(ground_truth: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """Orientation error, ground truth minus estimate, in [-180, 180) (activation-decomposition-tip2021 Sec. VII-A).

    Args:
        ground_truth: true rotations in degrees, B.
        estimate: estimated rotations in degrees, B.

    Returns:
        Wrapped errors in degrees, B.
    """
    return wrap_degrees(ground_truth.to(torch.float64) - estimate.to(torch.float64))


class OrientationEstimate(NamedTuple):
    """Rotation estimates (degrees in [0, 360), B) and the pixels they came from (B x 2, row/column)."""

    overall: torch.Tensor
    point_specific: torch.Tensor
    ground_point: torch.Tensor
    aerial_point_overall: torch.Tensor
    aerial_point_specific: torch.Tensor


def estimate_orientation(
    e_ground: torch.Tensor,
    bias_ground: torch.Tensor,
    raw_ground: torch.Tensor,
    e_aerial: torch.Tensor,
    bias_aerial: torch.Tensor,
    raw_aerial: torch.Tensor,
    ground_size: Optional[tuple[int, int]] = None,
    aerial_size: Optional[tuple[int, int]] = None,
    with_bias: bool = False,
    zero_offset_deg: float = 0.0,
    clockwise: bool = True,
) -> OrientationEstimate:
    """Rotation of the aerial image relative to the panorama from overall and point-specific maps
    (activation-decomposition-tip2021 Sec. VII-A; overall maps Eq. 5 summed, point-specific map Eq. 5 I(x, y)).

    Args:
        e_ground: panorama equivalent features, B x H x W x d.
        bias_ground: panorama bias, B x d.
        raw_ground: panorama raw embeddings, B x d.
        e_aerial: aerial equivalent features, B x X x Y x d.
        bias_aerial: aerial bias, B x d.
        raw_aerial: aerial raw embeddings, B x d.
        ground_size: panorama (height, width) in pixels to upsample to; None: the feature grid.
        aerial_size: aerial (height, width) in pixels to upsample to; None: the feature grid.
        with_bias: overall maps as Decomposition+Bias instead of Decomposition.
        zero_offset_deg: see ``aerial_azimuth``.
        clockwise: see ``aerial_azimuth``.

    Returns:
        ``OrientationEstimate``: the overall-map and point-specific estimates and the selected pixels.
    """
    ground_grid = (e_ground.shape[1], e_ground.shape[2])
    aerial_grid = (e_aerial.shape[1], e_aerial.shape[2])
    ground_size = tuple(ground_size) if ground_size is not None else ground_grid
    aerial_size = tuple(aerial_size) if aerial_size is not None else aerial_grid

    def at_size(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return maps if tuple(maps.shape[-2:]) == size else upsample_map(maps, size)

    if with_bias:
        ground_map = decomposition_bias_map(e_ground, raw_ground, raw_aerial)
        aerial_map = decomposition_bias_map(e_aerial, raw_aerial, raw_ground)
    else:
        ground_map = decomposition_map(e_ground, raw_ground, raw_aerial, bias_aerial)
        aerial_map = decomposition_map(e_aerial, raw_aerial, raw_ground, bias_ground)
    ground_point = argmax_position(at_size(ground_map, ground_size))
    aerial_point_overall = argmax_position(at_size(aerial_map, aerial_size))
    query = pixel_to_grid(ground_point, ground_size, ground_grid)
    specific = point_specific_map(e_ground, e_aerial, raw_ground, raw_aerial, query)
    aerial_point_specific = argmax_position(at_size(specific, aerial_size))

    ground_angle = panorama_azimuth(ground_point[:, 1], ground_size[1])

    def rotation(aerial_point: torch.Tensor) -> torch.Tensor:
        aerial_angle = aerial_azimuth(aerial_point, aerial_size, zero_offset_deg, clockwise)
        return torch.remainder(aerial_angle - ground_angle, FULL_TURN)

    return OrientationEstimate(
        overall=rotation(aerial_point_overall),
        point_specific=rotation(aerial_point_specific),
        ground_point=ground_point,
        aerial_point_overall=aerial_point_overall,
        aerial_point_specific=aerial_point_specific,
    )
