"""Random evaluation-mode embedding heads shared by the model and explanation tests."""
from __future__ import annotations

import torch
from torch import nn

from dml_ray.models.heads import EmbeddingHead


def random_eval_head(channels: int, map_size: tuple[int, int], seed: int = 0, **kwargs) -> EmbeddingHead:
    """A float64 eval-mode head with random FC biases and random BN statistics and affine parameters."""
    torch.manual_seed(seed)
    head = EmbeddingHead(channels, map_size=map_size, **kwargs).double()
    for m in head.modules():
        if isinstance(m, nn.Linear):
            m.bias.data.normal_()
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return head.eval()
