"""Binomial deviance loss of DeML (deml-zero-shot-retrieval Eq. 5), as a pytorch-metric-learning loss.

Being a ``BaseMetricLossFunction`` it takes ``ref_emb``/``ref_labels``, pair or triplet
``indices_tuple`` from any PML miner, PML regularizers and reducers, and works under PML's
``DistributedLossWrapper``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

IndicesTuple = Optional[tuple[torch.Tensor, ...]]


def _mean_or_zero(values: torch.Tensor) -> torch.Tensor:
    """Mean of ``values``; 0 (still attached to the graph) when there are none."""
    return values.sum() / max(values.numel(), 1)


class BinomialDevianceLoss(BaseMetricLossFunction):
    """Class-balanced binomial deviance over the pairs of a batch.

    For every pair (p, q), p != q, with cosine similarity ``D_pq`` and ``s_pq = 1`` when both
    have the same label, the pair costs ``log(1 + exp(-(2 s_pq - 1) alpha (D_pq - beta) gamma_pq))``
    divided by the number of pairs of its kind (positive or negative), so the loss is the mean
    positive-pair term plus the mean negative-pair term. A kind with no pair contributes 0.

    Args:
        alpha: scale of the similarity (paper: 2).
        beta: similarity at which a pair is neutral (paper: 0.5).
        gamma_neg: penalty coefficient of negative pairs (paper: 35).
        gamma_pos: penalty coefficient of positive pairs (paper: 1).
        **kwargs: passed to ``BaseMetricLossFunction`` (reducer, embedding_regularizer, ...);
            the distance must be a ``CosineSimilarity``.
    """

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 0.5,
        gamma_neg: float = 35.0,
        gamma_pos: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        c_f.assert_distance_type(self, CosineSimilarity)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.gamma_neg = float(gamma_neg)
        self.gamma_pos = float(gamma_pos)
        self.add_to_recordable_attributes(
            list_of_names=["alpha", "beta", "gamma_neg", "gamma_pos"], is_stat=False
        )

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: Optional[torch.Tensor],
        indices_tuple: IndicesTuple,
        ref_emb: torch.Tensor,
        ref_labels: Optional[torch.Tensor],
    ) -> dict[str, dict[str, Any]]:
        """Return PML's loss dict with the already reduced loss (see the class docstring)."""
        c_f.labels_or_indices_tuple_required(labels, indices_tuple)
        a1, p, a2, n = lmu.convert_to_pairs(indices_tuple, labels, ref_labels)
        similarity = self.distance(embeddings, ref_emb)
        pos_sim = similarity[a1, p]
        neg_sim = similarity[a2, n]
        # deml-zero-shot-retrieval Eq. 5: sum_pq 1/w_pq log(1 + exp(-(2 s_pq - 1) alpha (D_pq - beta) gamma_pq))
        pos_loss = _mean_or_zero(F.softplus(-self.alpha * (pos_sim - self.beta) * self.gamma_pos))
        neg_loss = _mean_or_zero(F.softplus(self.alpha * (neg_sim - self.beta) * self.gamma_neg))
        return {
            "loss": {
                "losses": pos_loss + neg_loss,
                "indices": None,
                "reduction_type": "already_reduced",
            }
        }

    def get_default_distance(self) -> CosineSimilarity:
        """Eq. 5 measures pairs by cosine similarity."""
        return CosineSimilarity()
