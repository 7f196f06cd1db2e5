"""DeML: GoogLeNet decoupled into object-attention scales and channel-attention learners (deml-zero-shot-retrieval).

Scale i encodes its input x^i with FNet^i (GoogLeNet up to pool3), reweights the channels with J
channel-attention modules CAM_(i,j), encodes each proposal with the scale's one GNet^i (inception4a
to pool5, shared by its J branches) and maps it with the FC learner CA_(i,j) to d / (I J)
dimensions (floor, Sec. 4). The object-attention proposal of scale i (random walk over
inception4e and inception5b, ``object_attention``) gives the crop that is zoomed into x^(i+1).
The holistic feature is the L2-normalised learners concatenated (Eq. 1, Sec. 4 "Evaluation").

Decisions where the paper is silent (beyond those of ``object_attention``):

- Each scale has its own FNet^i and GNet^i (the paper indexes them f^i, g^i and shares GNet only
  across the branches of a scale); every one is a full torchvision GoogLeNet (BN variant, no
  auxiliary heads), random init unless ``model.weights: imagenet``.
- The J branches of a scale go through GNet^i as one batch, so in training BN statistics are shared
  by the branches of a scale.
- The proposal that crops scale i+1 is the mean of the J branches' proposals; it is computed
  without gradient (the OAM is parameter-free and the crop is not differentiable).
- ``raw`` is the holistic feature itself (norm sqrt(I J)) and ``embedding`` = raw / |raw|, so
  the DESIGN.md relation embedding = E / |E| holds and cosine retrieval ranks as the paper's.
- The U<d> baseline (Sec. 4 notation) is this model with I = J = 1 and no CAM.
"""
from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from dml_ray.config import DeMLConfig
from dml_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dml_ray.models.object_attention import attention_boxes, attention_proposal, crop_and_zoom

log = logging.getLogger(__name__)

FNET_LAYERS = ("conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3")
GNET_LOW = ("inception4a", "inception4b", "inception4c", "inception4d", "inception4e")
GNET_HIGH = ("maxpool4", "inception5a", "inception5b")


class DeMLOutput(NamedTuple):
    """A DeML forward pass: the EmbeddingOutput fields plus what the DeML objective needs.

    feature_map: scale 1's inception5b map of branch 1 (B x 1024 x h x w).
    raw: the holistic feature, L2-normalised learners concatenated (B x L d').
    embedding: raw / |raw|.
    learners: raw learner outputs CA_(i,j), scale-major (B x L x d'), L = I J.
    boxes: crop boxes (x0, y0, x1, y1) in each scale's input frame that made the next scale (B x (I-1) x 4).
    learner_weights: the learners' FC weights (L x d' x 1024), for L_ntri of Eq. 6.
    """

    feature_map: torch.Tensor
    raw: torch.Tensor
    embedding: torch.Tensor
    learners: torch.Tensor
    boxes: torch.Tensor
    learner_weights: torch.Tensor


class ChannelAttention(nn.Module):
    """CAM: U * sigmoid(W2 relu(W1 GAP(U))) channel-wise (Sec. 3.2, the equation of cap_(i,j))."""

    def __init__(self, channels: int, hidden: int = 64) -> None:
        super().__init__()
        self.squeeze = nn.Linear(channels, hidden)
        self.excite = nn.Linear(hidden, channels)

    def weights(self, feature_map: torch.Tensor) -> torch.Tensor:
        """The channel weights sigmoid(W2 relu(W1 GAP(U))), B x C in (0, 1)."""
        return torch.sigmoid(self.excite(torch.relu(self.squeeze(feature_map.mean(dim=(2, 3))))))

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return feature_map * self.weights(feature_map)[:, :, None, None]


class _Sequence(nn.Module):
    """Named children of a torchvision model applied in order."""

    def __init__(self, net: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        for name in names:
            self.add_module(name, getattr(net, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.children():
            x = layer(x)
        return x


class FNet(_Sequence):
    """GoogLeNet conv1 .. pool3 (Sec. 3: "(Conv1-Pool3)"); 480 channels at stride 16.

    With ImageNet weights the input is first mapped from ImageNet normalisation to the (x - 0.5) / 0.5
    scaling those weights were trained on (torchvision's ``transform_input``).
    """

    out_channels = 480

    def __init__(self, net: nn.Module, names: tuple[str, ...], transform_input: bool) -> None:
        super().__init__(net, names)
        self.transform_input = transform_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform_input:
            mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
            x = (x * std + mean - 0.5) / 0.5
        return super().forward(x)


class GNet(nn.Module):
    """GoogLeNet inception4a .. inception5b; returns (inception4e, inception5b) maps, the OAM's inputs."""

    out_channels = 1024

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.low = _Sequence(net, GNET_LOW)
        self.high = _Sequence(net, GNET_HIGH)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u4e = self.low(x)
        return u4e, self.high(u4e)


def _googlenet(imagenet: bool) -> nn.Module:
    import torchvision

    return torchvision.models.get_model("googlenet", weights="DEFAULT" if imagenet else None, aux_logits=False,
                                        init_weights=not imagenet, transform_input=False)


class ScaleBackbone(nn.Module):
    """FNet^i and GNet^i of one scale, cut from one GoogLeNet."""

    def __init__(self, imagenet: bool) -> None:
        super().__init__()
        net = _googlenet(imagenet)
        self.fnet = FNet(net, FNET_LAYERS, transform_input=imagenet)
        self.gnet = GNet(net)


class DeMLModel(nn.Module):
    """I scales x J channel-attention branches of GoogLeNet, one FC learner each (Eq. 1); see the module doc."""

    def __init__(self, cfg: DeMLConfig, embedding_dim: int, imagenet: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.scales, self.branches = cfg.scales, cfg.branches
        self.learner_dim = embedding_dim // (cfg.scales * cfg.branches)
        self.backbone = nn.ModuleList(ScaleBackbone(imagenet) for _ in range(cfg.scales))
        self.cams = nn.ModuleList(
            nn.ModuleList(ChannelAttention(FNet.out_channels, cfg.cam_hidden) if cfg.channel_attention
                          else nn.Identity() for _ in range(cfg.branches))
            for _ in range(cfg.scales))
        self.learners = nn.ModuleList(
            nn.ModuleList(nn.Linear(GNet.out_channels, self.learner_dim) for _ in range(cfg.branches))
            for _ in range(cfg.scales))
        log.info("DeML: %d scales x %d branches of %d dimensions (channel attention: %s)", cfg.scales, cfg.branches,
                 self.learner_dim, cfg.channel_attention)

    @property
    def embedding_dim(self) -> int:
        return self.learner_dim * self.scales * self.branches

    def head_rate_parameters(self) -> list[nn.Parameter]:
        """The learners' FC weights: the only parameters at ``head_lr_multiplier`` x lr (Sec. 4, "10 times
        learning rate for the learners"); the backbone and the CAMs learn at the base rate."""
        return list(self.learners.parameters())

    def _scale(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scale i on input x: learner outputs (B x J x d'), inception4e and inception5b maps (J B x C x h x w)."""
        f = self.backbone[i].fnet(x)
        proposals = torch.cat([cam(f) for cam in self.cams[i]])
        u4e, u5b = self.backbone[i].gnet(proposals)
        pooled = u5b.mean(dim=(2, 3)).view(self.branches, len(x), -1)
        learners = torch.stack([fc(p) for fc, p in zip(self.learners[i], pooled)], dim=1)
        return learners, u4e, u5b

    def _proposal(self, u4e: torch.Tensor, u5b: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The branches' mean object-attention proposal at ``size`` (B x H x W), without gradient."""
        with torch.no_grad():
            maps = attention_proposal([u4e.detach(), u5b.detach()], size, self.cfg.walk_steps)
        return maps.view(self.branches, -1, *size).mean(dim=0)

    def forward(self, images: torch.Tensor) -> DeMLOutput:
        size = (images.shape[2], images.shape[3])
        x, learners, boxes, feature_map = images, [], [], None
        for i in range(self.scales):
            out, u4e, u5b = self._scale(i, x)
            learners.append(out)
            feature_map = u5b[: len(x)] if feature_map is None else feature_map
            if i + 1 < self.scales:
                box = attention_boxes(self._proposal(u4e, u5b, size), self.cfg.crop_threshold,
                                      self.cfg.min_crop_fraction)
                boxes.append(box)
                x = crop_and_zoom(x, box, size)
        stacked = torch.cat(learners, dim=1)
        raw = F.normalize(stacked, dim=2).flatten(1)
        weights = torch.stack([fc.weight for scale in self.learners for fc in scale])
        box_tensor = torch.stack(boxes, dim=1) if boxes else images.new_zeros(len(images), 0, 4)
        return DeMLOutput(feature_map, raw, raw / math.sqrt(stacked.shape[1]), stacked, box_tensor, weights)

    def branch_attention(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What each channel-attention branch of scale 1 does to ``images``: its object-attention proposal at
        the inception4e grid (B x J x h x w; their mean is ``object_attention``) and its CAM's channel
        weights on the FNet map (B x J x C; all 1 without channel attention)."""
        f = self.backbone[0].fnet(images)
        weights = torch.stack([cam.weights(f) if isinstance(cam, ChannelAttention) else torch.ones_like(f[:, :, 0, 0])
                               for cam in self.cams[0]], dim=1)
        u4e, u5b = self.backbone[0].gnet(torch.cat([cam(f) for cam in self.cams[0]]))
        size = (u4e.shape[2], u4e.shape[3])
        with torch.no_grad():
            maps = attention_proposal([u4e.detach(), u5b.detach()], size, self.cfg.walk_steps)
        return maps.view(self.branches, len(images), *size).transpose(0, 1), weights

    def object_attention(self, images: torch.Tensor) -> torch.Tensor:
        """Scale 1's object-attention proposal at the inception4e grid (B x h x w), in the input's frame."""
        _, u4e, u5b = self._scale(0, images)
        return self._proposal(u4e, u5b, (u4e.shape[2], u4e.shape[3]))

