"""Gradient baselines for a batch of pairs: Grad-CAM, Grad-CAM (no norm), RGrad-CAM
(activation-decomposition-tip2021 Sec. V and Appendix A).

The gradient of the pair score with respect to the feature maps comes from the head alone (the
backbone is not re-run): ``similarity_gradients`` runs the head on the stored feature maps and
takes ONE backward of ``sum_b s_b``; pairs do not interact through an eval-mode head, so row b of the
gradient is pair b's gradient. Scores:

- ``"cosine"``: ``s = E^q . E^r / (|E^q| |E^r|)`` (Grad-CAM, Eq. 10-14),
- ``"dot"``: ``s = E^q . E^r`` ("Grad-CAM (no norm)", Sec. V),
- ``"product"``: ``s = E^q . E^r / Z`` with ``Z = |E^q| |E^r|`` held constant: the un-normalised
  product, as the authors feed RGrad-CAM (github.com/Jeff-Zilence/Explain_Metric_Learning), in the
  cosine's units. Its value is the cosine; its gradient has no term from the L2 normalisation.

Maps from a feature map A and its gradient G = dS/dA:

- ``grad_cam``: ``ReLU(sum_k GAP(G)_k A_k)`` (Eq. 8 / Eq. 11, with Grad-CAM's ReLU),
- ``rgrad_cam``: ``sum_k A_k * G_k``, no GAP step and no ReLU (Sec. V, "combining the gradient and
  feature directly").

What Sec. V gives, for every head of ``EmbeddingHead`` (W_ij, B with the GMP and ReLU masks fixed):

- ``rgrad_cam`` with ``"product"`` == ``decomposition_bias_map`` exactly, for every pooling: this is
  the method "rgradcam" (Sec. V: "If we remove the gradient term as well as the GAP term, the result is
  actually equivalent to ... Decomposition+Bias"); with ``"dot"`` it is ``Z`` times that map;
- ``rgrad_cam`` with ``"cosine"`` == ``e_ij . (E^r - (u . E^r) u) / Z`` with ``u = E^q / |E^q|``
  (the Jacobian of the L2 normalisation, Eq. 12 and 14);
- ``grad_cam`` == ``ReLU`` of the same two maps when W_ij does not depend on (i, j), i.e. a GAP head
  (Eq. 10, ``GAP(W^q) = W_ij``); with GMP or flatten it differs (Eq. 8-9).

GMP and ties: autograd's ``amax`` splits the gradient evenly among tied maxima of a channel, while
``gmp_mask`` gives the whole weight to the first; with ties (more likely in float16-stored maps) the
RGrad-CAM map then spreads what the decomposition puts on one position (zero-valued ties, as in a
dead channel, contribute nothing either way).
"""
from __future__ import annotations

from typing import Literal, NamedTuple, Optional

import torch
from torch import nn

from dml_ray.explain.cam import channel_weighted_sum

Score = Literal["cosine", "dot", "product"]
SCORES: tuple[str, ...] = ("cosine", "dot", "product")


def pair_scores(raw_q: torch.Tensor, raw_r: torch.Tensor, score: Score = "cosine") -> torch.Tensor:
    """The score of each pair (activation-decomposition-tip2021 Eq. 2 for "cosine", Sec. V for "dot" / "product").

    Args:
        raw_q: raw query embeddings E^q, B x d.
        raw_r: raw reference embeddings E^r, B x d.
        score: "cosine" (``E^q . E^r / |E^q||E^r|``), "dot" (``E^q . E^r``) or "product" (``E^q . E^r / Z``
            with the normaliser ``Z = |E^q||E^r|`` detached: the cosine's value, the product's gradient).

    Returns:
        The scores, B.
    """
    dot = torch.einsum("bd,bd->b", raw_q, raw_r)
    if score == "dot":
        return dot
    z = raw_q.norm(dim=1) * raw_r.norm(dim=1)
    if score == "cosine":
        return dot / z
    if score == "product":
        return dot / z.detach()
    raise ValueError(f"score: unknown score {score!r}; expected one of: {', '.join(SCORES)}")


class SimilarityGradients(NamedTuple):
    """Scores (B) and their gradients with respect to the query (and reference) feature maps (B x C x H x W)."""

    score: torch.Tensor
    query: torch.Tensor
    reference: Optional[torch.Tensor]


def similarity_gradients(
    head: nn.Module,
    feature_map_q: torch.Tensor,
    *,
    raw_r: Optional[torch.Tensor] = None,
    feature_map_r: Optional[torch.Tensor] = None,
    score: Score = "cosine",
) -> SimilarityGradients:
    """Gradients of the pair scores with respect to the feature maps, one backward for the whole batch
    (activation-decomposition-tip2021 Eq. 12).

    Give the reference either as a fixed raw embedding (``raw_r``; no gradient on its side) or as a
    feature map (``feature_map_r``; E^r = head(A^r) and its gradient comes from the same backward).
    The head's parameters get no ``.grad``.

    Args:
        head: the embedding head (pooling + FC / BN / ReLU), in eval mode.
        feature_map_q: query feature maps A^q, B x C x H x W, in the head's dtype.
        raw_r: reference raw embeddings E^r, B x d (exclusive with ``feature_map_r``).
        feature_map_r: reference feature maps A^r, B x C x X x Y (exclusive with ``raw_r``).
        score: "cosine" (Grad-CAM), "dot" (Grad-CAM (no norm)) or "product" (RGrad-CAM).

    Returns:
        ``SimilarityGradients(score B, dS/dA^q, dS/dA^r or None)``.
    """
    if head.training:
        raise RuntimeError("similarity_gradients needs the head in eval mode (BN with running statistics), "
                           "or the pairs of a batch interact")
    if (raw_r is None) == (feature_map_r is None):
        raise ValueError("similarity_gradients: give exactly one of raw_r (a fixed reference embedding) "
                         "or feature_map_r (a reference feature map)")
    with torch.enable_grad():
        a_q = feature_map_q.detach().requires_grad_(True)
        inputs = [a_q]
        if feature_map_r is not None:
            a_r = feature_map_r.detach().requires_grad_(True)
            inputs.append(a_r)
            reference = head(a_r)
        else:
            reference = raw_r.detach()
        scores = pair_scores(head(a_q), reference, score)
        grads = torch.autograd.grad(scores.sum(), inputs)
    return SimilarityGradients(scores.detach(), grads[0], grads[1] if feature_map_r is not None else None)


def grad_cam(feature_map: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Grad-CAM: channel weights are the spatial mean of the gradient, then ReLU
    (activation-decomposition-tip2021 Eq. 8 / Eq. 11).

    Args:
        feature_map: A, B x C x H x W.
        gradient: dS/dA for the same pairs, B x C x H x W (``similarity_gradients``).

    Returns:
        ``ReLU(sum_k GAP(dS/dA)_k A_k)``, B x H x W.
    """
    return torch.relu(channel_weighted_sum(feature_map, gradient.mean(dim=(2, 3))))


def rgrad_cam(feature_map: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """RGrad-CAM: gradient times feature summed over channels, without the GAP step
    (activation-decomposition-tip2021 Sec. V, ``A_ijk dS/dA_ijk`` summed over k).

    Signed, like the decomposition maps (no ReLU).

    Args:
        feature_map: A, B x C x H x W.
        gradient: dS/dA for the same pairs, B x C x H x W.

    Returns:
        ``sum_k A_k * dS/dA_k``, B x H x W.
    """
    return torch.einsum("bchw,bchw->bhw", feature_map, gradient)
