"""Activation decomposition of the cosine similarity of image pairs (activation-decomposition-tip2021 Sec. III-IV).

Every function works on a batch of pairs b from tensors alone: the equivalent features
``e`` (B x H x W x d) and bias (B x d) of ``EmbeddingHead.equivalent_features`` and the raw embeddings
E (B x d), with ``sum_ij e[b, i, j] + bias[b] == E[b]``. No backbone and no head is needed, and the
overall map of one image needs the other image only through its vectors E and B, so a reference
(neighbour, prototype) can be joined in as a row of a table. ``Z = |E^q| |E^r|`` throughout.

The query and the reference play symmetric roles: the reference-side map of a function taking
``(e, raw, other_raw, ...)`` is the same function with the two images swapped.

Grid coordinates: position (i, j) of an H x W grid is the centre of cell (i, j), so integer positions
are cells and fractional ones lie between cell centres; pixel p of an image of side S sits at grid
coordinate ``(p + 0.5) * H / S - 0.5``, the convention of ``F.interpolate(mode="bilinear",
align_corners=False)`` used by ``upsample_map``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn import functional as F


def _check_pair_shapes(e: torch.Tensor, raw: torch.Tensor, other_raw: torch.Tensor) -> None:
    """Raise a ValueError unless e is B x H x W x d and both raw embeddings are B x d."""
    if e.ndim != 4:
        raise ValueError(f"equivalent features: expected B x H x W x d, got shape {tuple(e.shape)}")
    expected = (e.shape[0], e.shape[3])
    for name, t in (("raw", raw), ("other_raw", other_raw)):
        if tuple(t.shape) != expected:
            raise ValueError(f"{name}: expected shape {expected} (B x d) to match equivalent features of shape "
                             f"{tuple(e.shape)}, got {tuple(t.shape)}")


def cosine_normaliser(raw_q: torch.Tensor, raw_r: torch.Tensor) -> torch.Tensor:
    """The normalisation term of the cosine similarity (activation-decomposition-tip2021 Eq. 5, Z).

    Args:
        raw_q: raw query embeddings E^q, B x d.
        raw_r: raw reference embeddings E^r, B x d.

    Returns:
        ``Z = |E^q| |E^r|`` per pair, B.
    """
    return raw_q.norm(dim=-1) * raw_r.norm(dim=-1)


def point_to_point_map(
    e_q: torch.Tensor, e_r: torch.Tensor, raw_q: torch.Tensor, raw_r: torch.Tensor
) -> torch.Tensor:
    """Point-to-point activation of every query position with every reference position
    (activation-decomposition-tip2021 Eq. 5, first term, over Z).

    Args:
        e_q: query equivalent features, B x H x W x d.
        e_r: reference equivalent features, B x X x Y x d.
        raw_q: raw query embeddings E^q, B x d.
        raw_r: raw reference embeddings E^r, B x d.

    Returns:
        ``P[b, i, j, x, y] = e^q_ij . e^r_xy / Z``, B x H x W x X x Y.
    """
    _check_pair_shapes(e_q, raw_q, raw_r)
    z = cosine_normaliser(raw_q, raw_r)
    return torch.einsum("bijd,bxyd->bijxy", e_q, e_r) / z.view(-1, 1, 1, 1, 1)


class BiasTerms(NamedTuple):
    """The three bias terms of the decomposed cosine similarity, each B (Eq. 5, second to fourth terms, over Z)."""

    query_features_reference_bias: torch.Tensor
    reference_features_query_bias: torch.Tensor
    bias_product: torch.Tensor


def bias_terms(
    e_q: torch.Tensor,
    bias_q: torch.Tensor,
    e_r: torch.Tensor,
    bias_r: torch.Tensor,
    raw_q: torch.Tensor,
    raw_r: torch.Tensor,
) -> BiasTerms:
    """The bias terms of the decomposition (activation-decomposition-tip2021 Eq. 5, terms 2-4, over Z).

    ``point_to_point_map(...).sum((1, 2, 3, 4))`` plus the three terms is the cosine similarity.

    Args:
        e_q: query equivalent features, B x H x W x d.
        bias_q: query bias B^q, B x d.
        e_r: reference equivalent features, B x X x Y x d.
        bias_r: reference bias B^r, B x d.
        raw_q: raw query embeddings E^q, B x d.
        raw_r: raw reference embeddings E^r, B x d.

    Returns:
        ``BiasTerms(sum_ij e^q_ij . B^r / Z, sum_xy e^r_xy . B^q / Z, B^q . B^r / Z)``, each B.
    """
    z = cosine_normaliser(raw_q, raw_r)
    return BiasTerms(
        query_features_reference_bias=torch.einsum("bd,bd->b", e_q.sum(dim=(1, 2)), bias_r) / z,
        reference_features_query_bias=torch.einsum("bd,bd->b", e_r.sum(dim=(1, 2)), bias_q) / z,
        bias_product=torch.einsum("bd,bd->b", bias_q, bias_r) / z,
    )


def decomposition_map(
    e: torch.Tensor, raw: torch.Tensor, other_raw: torch.Tensor, other_bias: torch.Tensor
) -> torch.Tensor:
    """Overall map "Decomposition": Eq. 5's first term summed over the other image
    (activation-decomposition-tip2021 Eq. 5 and Sec. IV-A).

    ``map[b, i, j] = e_ij . (E' - B') / Z``, where E', B' are the other image's raw embedding and bias;
    it sums to the first term of Eq. 5 (``point_to_point_map(...).sum()`` per pair).

    Args:
        e: equivalent features of the explained image, B x H x W x d.
        raw: its raw embedding, B x d.
        other_raw: raw embedding of the other image of each pair, B x d.
        other_bias: bias of the other image, B x d.

    Returns:
        The overall map, B x H x W.
    """
    _check_pair_shapes(e, raw, other_raw)
    z = cosine_normaliser(raw, other_raw)
    return torch.einsum("bijd,bd->bij", e, other_raw - other_bias) / z.view(-1, 1, 1)


def decomposition_bias_map(e: torch.Tensor, raw: torch.Tensor, other_raw: torch.Tensor) -> torch.Tensor:
    """Overall map "Decomposition+Bias": Eq. 5's first two terms (activation-decomposition-tip2021 Eq. 5, Sec. IV-A).

    ``map[b, i, j] = e_ij . E' / Z``. Its sum plus ``B . E' / Z`` is the cosine similarity.

    Args:
        e: equivalent features of the explained image, B x H x W x d.
        raw: its raw embedding, B x d.
        other_raw: raw embedding of the other image of each pair, B x d.

    Returns:
        The overall map, B x H x W.
    """
    _check_pair_shapes(e, raw, other_raw)
    z = cosine_normaliser(raw, other_raw)
    return torch.einsum("bijd,bd->bij", e, other_raw) / z.view(-1, 1, 1)


def interpolate_equivalent_features(e: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Bilinear interpolation of equivalent features at grid positions (activation-decomposition-tip2021 Sec. III,
    bilinear interpolation; Sec. VII-B, the feature of a pixel).

    Positions outside the grid are clamped to its border, as ``F.interpolate(align_corners=False)``
    does; integer positions return the cell's feature exactly.

    Args:
        e: equivalent features, B x H x W x d.
        positions: (row, column) grid coordinates, B x ... x 2 (integer or floating).

    Returns:
        The interpolated features, B x ... x d.
    """
    b, h, w, d = e.shape
    if positions.shape[0] != b or positions.shape[-1] != 2:
        raise ValueError(f"positions: expected B x ... x 2 with B = {b}, got shape {tuple(positions.shape)}")
    pos = positions.reshape(b, -1, 2).to(torch.promote_types(e.dtype, torch.float32))
    rows = pos[..., 0].clamp(0, h - 1)
    cols = pos[..., 1].clamp(0, w - 1)
    r0, c0 = rows.floor().long(), cols.floor().long()
    r1, c1 = (r0 + 1).clamp(max=h - 1), (c0 + 1).clamp(max=w - 1)
    fr = (rows - r0).to(e.dtype).unsqueeze(-1)
    fc = (cols - c0).to(e.dtype).unsqueeze(-1)
    flat = e.reshape(b, h * w, d)

    def at(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.gather(flat, 1, (r * w + c).unsqueeze(-1).expand(-1, -1, d))

    out = (at(r0, c0) * (1 - fr) * (1 - fc) + at(r0, c1) * (1 - fr) * fc
           + at(r1, c0) * fr * (1 - fc) + at(r1, c1) * fr * fc)
    return out.view(*positions.shape[:-1], d)


def point_specific_map(
    e_q: torch.Tensor, e_r: torch.Tensor, raw_q: torch.Tensor, raw_r: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Point-specific map on the reference for query points (activation-decomposition-tip2021 Eq. 5, I(x, y)).

    At an integer position (i, j) this is row ``P[b, i, j]`` of ``point_to_point_map``; at a
    fractional position it is the bilinear interpolation of P's rows over the query grid (P is linear
    in e^q, so this equals the map of the interpolated query feature), computed without P.

    Args:
        e_q: query equivalent features, B x H x W x d.
        e_r: reference equivalent features, B x X x Y x d.
        raw_q: raw query embeddings E^q, B x d.
        raw_r: raw reference embeddings E^r, B x d.
        positions: (row, column) query grid coordinates, B x 2 or B x K x 2.

    Returns:
        ``e^q(position) . e^r_xy / Z``, B x X x Y (B x K x X x Y for K points per pair).
    """
    _check_pair_shapes(e_q, raw_q, raw_r)
    feature = interpolate_equivalent_features(e_q, positions)
    z = cosine_normaliser(raw_q, raw_r).view(-1, *[1] * feature.ndim)
    return torch.einsum("b...d,bxyd->b...xy", feature, e_r) / z


def pixel_to_grid(points: torch.Tensor, image_size: tuple[int, int], grid_size: tuple[int, int]) -> torch.Tensor:
    """Grid coordinates of pixel positions, matching ``upsample_map``
    (activation-decomposition-tip2021 Sec. III, bilinear interpolation to full resolution).

    Args:
        points: (row, column) pixel positions in the model-input frame, ... x 2 (pixel p covers [p, p + 1)).
        image_size: (height, width) of that frame in pixels.
        grid_size: (H, W) of the feature grid.

    Returns:
        (row, column) grid coordinates, ... x 2, floating.
    """
    scale = torch.tensor([grid_size[0] / image_size[0], grid_size[1] / image_size[1]],
                         dtype=torch.promote_types(points.dtype, torch.float32), device=points.device)
    return (points + 0.5) * scale - 0.5


def upsample_map(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of maps to pixels (activation-decomposition-tip2021 Sec. III, bilinear interpolation).

    Args:
        maps: maps over their last two dimensions, ... x H x W (floating).
        size: (height, width) in pixels.

    Returns:
        The upsampled maps, ... x height x width.
    """
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    up = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False)
    return up.view(*lead, *up.shape[-2:])
