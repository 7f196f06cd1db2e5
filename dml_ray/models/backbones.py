"""Convolutional backbones cut before their global pooling: image -> feature map A (B x C x H x W)."""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)


class TinyCNN(nn.Module):
    """A small four-stage CNN for tests and demos on CPU (stride 8, 64 channels: an 8 x 8 map at 64 px)."""

    out_channels = 64

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = [3, 16, 32, 48, 64]
        strides = [2, 2, 2, 1]
        for c_in, c_out, stride in zip(channels, channels[1:], strides):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class _DenseNetFeatures(nn.Module):
    """DenseNet's `features` followed by the ReLU torchvision applies before pooling."""

    def __init__(self, features: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.features = features
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.features(x))


class _Trunk(nn.Sequential):
    """A torchvision model's children up to (not including) its pooling layer."""

    def __init__(self, modules: list[nn.Module], out_channels: int) -> None:
        super().__init__(*modules)
        self.out_channels = out_channels


def _torchvision(name: str, imagenet: bool) -> nn.Module:
    import torchvision

    weights = "DEFAULT" if imagenet else None
    kwargs = {"aux_logits": False, "init_weights": not imagenet} if name == "googlenet" else {}
    return torchvision.models.get_model(name, weights=weights, **kwargs)


def _resnet(name: str, imagenet: bool) -> nn.Module:
    net = _torchvision(name, imagenet)
    trunk = [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4]
    return _Trunk(trunk, net.fc.in_features)


def _densenet(name: str, imagenet: bool) -> nn.Module:
    net = _torchvision(name, imagenet)
    return _DenseNetFeatures(net.features, net.classifier.in_features)


def _googlenet(name: str, imagenet: bool) -> nn.Module:
    net = _torchvision(name, imagenet)
    names = ["conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
             "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4",
             "inception5a", "inception5b"]
    trunk = [getattr(net, n) for n in names]
    if net.transform_input:
        raise ValueError("googlenet with transform_input is not supported")
    return _Trunk(trunk, net.fc.in_features)


_BUILDERS: dict[str, Callable[[str, bool], nn.Module]] = {
    **{n: _resnet for n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")},
    **{n: _densenet for n in ("densenet121", "densenet161", "densenet169", "densenet201")},
    "googlenet": _googlenet,
}

BACKBONES: tuple[str, ...] = ("tiny_cnn", *_BUILDERS)


def build_backbone(name: str, imagenet_weights: bool = False) -> nn.Module:
    """Build backbone ``name``; the module has ``out_channels`` and returns the last conv feature map."""
    if name == "tiny_cnn":
        if imagenet_weights:
            raise ValueError("model.weights: tiny_cnn has no imagenet weights")
        return TinyCNN()
    if name not in _BUILDERS:
        raise ValueError(f"model.backbone: unknown backbone {name!r}; expected one of: {', '.join(BACKBONES)}")
    log.info("building backbone %s (imagenet weights: %s)", name, imagenet_weights)
    return _BUILDERS[name](name, imagenet_weights)
