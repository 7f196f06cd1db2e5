"""DeML's adversary and regularisers as pure tensor functions (deml-zero-shot-retrieval Eq. 4 and 6).

The metric loss of Eq. 5 is ``dml_ray.losses.binomial_deviance.BinomialDevianceLoss`` applied to
each learner and averaged over learners (``DeMLObjective``).
"""
from __future__ import annotations

import torch


class _GradientReversal(torch.autograd.Function):
    """Identity forward; the incoming gradient times ``-scale`` backward (Ganin et al. [9])."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Gradient-reversal layer: max over the features, min over the adversary of one loss (Sec. 3.2, Fig. 3c)."""
    return _GradientReversal.apply(x, scale)


def learner_discrepancy(projected: torch.Tensor) -> torch.Tensor:
    """sum_{j < j'} ||F[CA_j] - F[CA_j']||^2, averaged over the batch (Eq. 4 without lambda_0).

    Args:
        projected: B x J x k, the adversary's outputs for the J learners of one scale.
    """
    j = projected.shape[1]
    if j < 2:
        return projected.sum() * 0.0
    first, second = torch.triu_indices(j, j, offset=1, device=projected.device)
    return (projected[:, first] - projected[:, second]).pow(2).sum(dim=2).sum(dim=1).mean()


def activation_decay(learners: torch.Tensor) -> torch.Tensor:
    """1 / (2 I J N) sum ||CA_(i,j)[x_n]||^2 over learners and images (Eq. 6 first term without lambda_1).

    Args:
        learners: B x L x d', the raw (unnormalised) outputs of the L = I J learners.
    """
    return learners.pow(2).sum(dim=2).mean() / 2


def learner_norm_penalty(weights: torch.Tensor) -> torch.Tensor:
    """L_ntri / lambda_2 = sum_ij tr[(w w^T - I) o (w w^T - I)] with o the Hadamard product (Eq. 6).

    The trace of a Hadamard square keeps only its diagonal, so this is sum_k (|w_k|^2 - 1)^2 over the
    rows w_k of every learner: it holds each output unit's weight vector at unit norm, which is the
    stated purpose (no trivial all-zero solution under activation decay); it does not penalise the
    off-diagonal (orthogonality) entries, as written.

    Args:
        weights: L x d' x d_1, the learners' FC weights.
    """
    gram = weights @ weights.transpose(1, 2)
    diagonal = torch.diagonal(gram, dim1=1, dim2=2)
    return (diagonal - 1.0).pow(2).sum()

