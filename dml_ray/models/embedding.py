"""The embedding model: backbone feature map -> head -> raw embedding -> L2-normalised embedding."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from dml_ray.config import ModelConfig
from dml_ray.models.backbones import build_backbone
from dml_ray.models.deml import DeMLModel
from dml_ray.models.heads import EmbeddingHead


class EmbeddingOutput(NamedTuple):
    """What a forward pass exposes: the feature map A, the raw embedding E and E / |E|."""

    feature_map: torch.Tensor
    raw: torch.Tensor
    embedding: torch.Tensor


class EmbeddingModel(nn.Module):
    """Backbone + embedding head; ``forward`` returns an EmbeddingOutput."""

    def __init__(self, backbone: nn.Module, head: EmbeddingHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def embedding_dim(self) -> int:
        return self.head.out_dim

    def forward(self, images: torch.Tensor) -> EmbeddingOutput:
        feature_map = self.backbone(images)
        raw = self.head(feature_map)
        return EmbeddingOutput(feature_map, raw, F.normalize(raw, dim=1))

    def equivalent_features(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Equivalent features (B x H x W x d) and bias (B x d) of the head for this feature map."""
        return self.head.equivalent_features(feature_map)


def feature_map_size(backbone: nn.Module, image_size: int) -> tuple[int, int]:
    """Spatial size of the backbone's feature map for a square input of side ``image_size``."""
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        shape = backbone(torch.zeros(1, 3, image_size, image_size)).shape
    backbone.train(was_training)
    return int(shape[2]), int(shape[3])


def build_model(cfg: ModelConfig, image_size: int) -> nn.Module:
    """Build the model of ``cfg`` for square inputs of side ``image_size`` (random or imagenet init).

    ``kind: deml`` gives a ``DeMLModel`` (its output extends EmbeddingOutput's fields); every other kind
    an ``EmbeddingModel``.
    """
    if cfg.kind == "deml":
        return DeMLModel(cfg.deml, cfg.embedding_dim, imagenet=cfg.weights == "imagenet")
    backbone = build_backbone(cfg.backbone, imagenet_weights=cfg.weights == "imagenet")
    map_size = feature_map_size(backbone, image_size) if cfg.pooling == "flatten" else None
    head = EmbeddingHead(
        backbone.out_channels,
        pooling=cfg.pooling,
        embedding_dim=cfg.embedding_dim,
        hidden_dims=cfg.hidden_dims,
        bn=cfg.bn,
        map_size=map_size,
    )
    return EmbeddingModel(backbone, head)
