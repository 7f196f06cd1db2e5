"""DeML learner diagnostics: the mean cosine similarity between learners ("sim", deml-zero-shot-retrieval Table 4).

A DeML embedding is its I J L2-normalised learner outputs concatenated, scale-major, and scaled
by 1 / sqrt(I J) (``dml_ray.models.deml``), so each learner's feature is recovered from a stored
embedding by slicing; nothing is recomputed.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F


def learner_similarity(learners: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between distinct learners of the same scale, per image ("sim" of Table 4).

    Args:
        learners: B x I x J x d' learner features (J >= 2).

    Returns:
        B values: each image's mean over scales and ordered pairs j != j' of cos(CA_(i,j), CA_(i,j')).
    """
    j = learners.shape[2]
    if j < 2:
        raise ValueError("learner_similarity: needs at least two learners per scale")
    unit = F.normalize(learners, dim=3)
    cosine = unit @ unit.transpose(2, 3)  # B x I x J x J
    off_diagonal = cosine.sum(dim=(2, 3)) - torch.diagonal(cosine, dim1=2, dim2=3).sum(dim=2)
    return (off_diagonal / (j * (j - 1))).mean(dim=1)


def learner_blocks(embeddings: np.ndarray, scales: int, branches: int) -> np.ndarray:
    """Split N x (I J d') DeML embeddings into their learners: N x I x J x d'."""
    n, dim = embeddings.shape
    if dim % (scales * branches):
        raise ValueError(f"learner_blocks: dimension {dim} is not a multiple of {scales} x {branches} learners")
    return embeddings.reshape(n, scales, branches, dim // (scales * branches))


def scale_embeddings(embeddings: np.ndarray, scales: int, branches: int) -> list[np.ndarray]:
    """Each OA root learner's feature (its J learners concatenated), L2-normalised: I arrays of N x J d'."""
    blocks = learner_blocks(embeddings, scales, branches)
    parts = [blocks[:, i].reshape(len(embeddings), -1) for i in range(scales)]
    return [p / np.linalg.norm(p, axis=1, keepdims=True).clip(1e-12) for p in parts]
