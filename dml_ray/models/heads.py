"""Embedding heads and their equivalent features (DESIGN.md "The one invariant behind every activation map").

A head is pooling -> [FC -> (BN) -> ReLU]* -> FC(d) -> (BN). At inference, once the GMP argmax mask
and the ReLU masks of *this* input are fixed, it is affine in the feature map, so it splits into
per-position equivalent features e[b,i,j] and a bias B[b] with  sum_ij e[b,i,j] + B[b] == E[b]
(activation-decomposition-tip2021 Sec. IV, Eq. 3-4 and the GMP / FC / BN / ReLU cases).
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

Pooling = Literal["gap", "gmp", "flatten"]


def gmp_mask(feature_map: torch.Tensor) -> torch.Tensor:
    """One-hot mask of each channel's argmax position (B x C x H x W); ties go to the first position."""
    b, c, h, w = feature_map.shape
    idx = feature_map.flatten(2).argmax(dim=2, keepdim=True)
    mask = torch.zeros(b, c, h * w, dtype=feature_map.dtype, device=feature_map.device)
    return mask.scatter_(2, idx, 1.0).view(b, c, h, w)


class EmbeddingHead(nn.Module):
    """Pooling + FC layers mapping a feature map (B x C x H x W) to the raw embedding E (B x d)."""

    def __init__(
        self,
        in_channels: int,
        pooling: Pooling = "gap",
        embedding_dim: Optional[int] = 512,
        hidden_dims: Sequence[int] = (),
        bn: bool = False,
        map_size: Optional[tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        if pooling == "flatten" and (map_size is None or embedding_dim is None):
            raise ValueError("model.pooling: flatten needs a fixed feature-map size and an embedding_dim")
        self.pooling = pooling
        self.map_size = tuple(map_size) if map_size is not None else None
        pooled = in_channels * (map_size[0] * map_size[1] if pooling == "flatten" else 1)
        self.fcs = nn.ModuleList()
        self.bns = nn.ModuleList()
        dims = [*hidden_dims, embedding_dim] if embedding_dim is not None else []
        for i, dim in enumerate(dims):
            self.fcs.append(nn.Linear(pooled if i == 0 else dims[i - 1], dim))
            self.bns.append(nn.BatchNorm1d(dim) if bn else nn.Identity())
        self.out_dim = dims[-1] if dims else in_channels

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Pool a feature map into the FC input (B x C, or B x C*H*W for flatten)."""
        if self.pooling == "gap":
            return feature_map.mean(dim=(2, 3))
        if self.pooling == "gmp":
            return feature_map.amax(dim=(2, 3))
        if tuple(feature_map.shape[2:]) != self.map_size:
            raise ValueError(f"flatten head expects a {self.map_size} feature map, got {tuple(feature_map.shape[2:])}")
        return feature_map.flatten(1)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        x = self.pool(feature_map)
        for i, (fc, bn) in enumerate(zip(self.fcs, self.bns)):
            x = bn(fc(x))
            if i < len(self.fcs) - 1:
                x = F.relu(x)
        return x

    def _first_layer_contributions(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position contributions (B x HW x k) and bias (B x k) of pooling + first FC (no FC: identity)."""
        b, c, h, w = feature_map.shape
        if self.pooling == "gap":
            per_pos = feature_map.flatten(2).transpose(1, 2) / (h * w)
        elif self.pooling == "gmp":
            per_pos = (feature_map * gmp_mask(feature_map)).flatten(2).transpose(1, 2)
        else:
            per_pos = None
        if not self.fcs:
            return per_pos, feature_map.new_zeros(b, c)
        fc = self.fcs[0]
        bias = fc.bias.unsqueeze(0).repeat(b, 1)
        if per_pos is not None:
            return per_pos @ fc.weight.t(), bias
        # flatten: FC weight block of position (i, j); the flatten order is (c, i, j)
        blocks = fc.weight.view(fc.out_features, c, h * w)
        contrib = torch.einsum("bcp,kcp->bpk", feature_map.flatten(2), blocks)
        return contrib, bias

    def equivalent_features(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Equivalent features e (B x H x W x d) and bias (B x d) with e.sum((1, 2)) + bias == forward(A).

        Eval mode only: BN folds into an affine map with its running statistics.
        """
        if self.training:
            raise RuntimeError("equivalent_features needs the head in eval mode (BN with running statistics)")
        b, _, h, w = feature_map.shape
        contrib, bias = self._first_layer_contributions(feature_map)
        for i, bn in enumerate(self.bns):
            if i > 0:
                fc = self.fcs[i]
                contrib = contrib @ fc.weight.t()
                bias = bias @ fc.weight.t() + fc.bias
            if isinstance(bn, nn.BatchNorm1d):
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                contrib = contrib * scale
                bias = (bias - bn.running_mean) * scale + bn.bias
            if i < len(self.bns) - 1:
                # the ReLU of this input is a fixed diagonal mask
                mask = (contrib.sum(dim=1) + bias > 0).to(contrib.dtype)
                contrib = contrib * mask.unsqueeze(1)
                bias = bias * mask
        return contrib.view(b, h, w, -1), bias
