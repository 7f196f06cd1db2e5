"""What a training step minimises: a module from (model output, labels) to a loss and per-step statistics.

An objective owns every trainable parameter that is not part of the embedding model (a loss's
proxies, the MPN and its classifiers, DeML's adversaries), so the optimizer, the checkpoint and DDP treat it as one
module. ``build_objective`` picks it from ``model.kind``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dml_ray.config import DeMLConfig, ModelConfig, TrainConfig
from dml_ray.losses.deml import activation_decay, grad_reverse, learner_discrepancy, learner_norm_penalty
from dml_ray.losses.factory import build_loss, build_miner, wrap_distributed
from dml_ray.metrics.learners import learner_similarity
from dml_ray.models.mpn import MessagePassingNetwork, attention_diagnostics, mpn_loss, smoothed_cross_entropy


class ObjectiveOutput(NamedTuple):
    """The loss to back-propagate and the statistics of the step (``loss`` among them) to average per epoch."""

    loss: torch.Tensor
    stats: dict[str, float]


class MetricObjective(nn.Module):
    """A pytorch-metric-learning loss (and optional miner) on the L2-normalised embeddings."""

    def __init__(self, loss: nn.Module, miner: Optional[nn.Module], loss_scale: float = 1.0) -> None:
        super().__init__()
        self.loss = loss
        self.miner = miner
        self.loss_scale = loss_scale

    def forward(self, output, labels: torch.Tensor) -> ObjectiveOutput:
        embeddings = output.embedding
        indices = self.miner(embeddings, labels) if self.miner is not None else None
        loss = self.loss(embeddings, labels, indices)
        return ObjectiveOutput(loss, {"loss": float(loss.detach()) / self.loss_scale})


class MPNObjective(nn.Module):
    """MPN over the complete batch graph + CE on its logits and auxiliary CE on the backbone (mpn Sec. 3.1).

    The backbone classifier maps the raw backbone embedding to class logits; the MPN refines the
    batch's unit-norm embeddings (``MessagePassingNetwork.embed_input`` maps them to node features) and
    classifies the refined features. Every step also returns the attention diagnostics of Sec. 4.2.2
    per layer and head. With ``mpn.mpn_weight: 0`` (the authors' SOP setting, loss ``lsce`` alone) the
    MPN is not run and only the backbone's cross-entropy trains.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int, embedding_dim: int) -> None:
        super().__init__()
        self.cfg = cfg.mpn
        self.mpn = MessagePassingNetwork(num_classes, num_layers=cfg.mpn.num_layers, num_heads=cfg.mpn.num_heads,
                                         dim=embedding_dim, dropout=cfg.mpn.dropout, ff_dim=cfg.mpn.ff_dim,
                                         variant=cfg.mpn.variant, concat_layers=cfg.mpn.concat_layers)
        self.backbone_classifier = nn.Linear(embedding_dim, num_classes)

    def forward(self, output, labels: torch.Tensor) -> ObjectiveOutput:
        backbone_logits = self.backbone_classifier(output.raw)
        if self.cfg.mpn_weight == 0:
            loss = self.cfg.aux_weight * smoothed_cross_entropy(backbone_logits, labels, self.cfg.temperature,
                                                                self.cfg.label_smoothing)
            return ObjectiveOutput(loss, {"loss": float(loss.detach())})
        refined = self.mpn(output.embedding)
        loss = mpn_loss(refined.logits, backbone_logits, labels, self.cfg.temperature,
                        self.cfg.label_smoothing, self.cfg.aux_weight, self.cfg.mpn_weight)
        return ObjectiveOutput(loss, {"loss": float(loss.detach()),
                                      **attention_stats(refined.attention.detach(), labels)})


class DeMLObjective(nn.Module):
    """DeML's training loss: Eq. 5 per learner + Eq. 6 + the adversary of Eq. 4 behind a gradient-reversal layer.

    ``loss`` is the binomial deviance (``train.loss``), applied to each learner's output and averaged
    over the I J learners (Eq. 5; it measures pairs by cosine). The objective owns the adversary
    networks F^i, one per scale when J > 1 and ``deml.adversary``: F^i(a) = normalize(W_i normalize(a))
    with a bias-free square W_i. The paper leaves F unspecified; normalising its input and output bounds
    the discrepancy (at most 4 per pair), so the feature side can only win it by changing directions,
    not by inflating norms, and the adversary cannot drive it to zero by shrinking its weights.
    Eq. 4's sum runs over unordered pairs j < j' and is averaged over the batch.
    """

    def __init__(self, cfg: DeMLConfig, loss: nn.Module, learner_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.loss = loss
        with_adversary = cfg.adversary and cfg.branches > 1
        self.adversaries = nn.ModuleList(nn.Linear(learner_dim, learner_dim, bias=False)
                                         for _ in range(cfg.scales if with_adversary else 0))

    def head_rate_parameters(self) -> list[nn.Parameter]:
        """None: the adversaries learn at the base rate (Sec. 4 gives the 10x rate to the learners only)."""
        return []

    def forward(self, output, labels: torch.Tensor) -> ObjectiveOutput:
        learners = output.learners
        metric = torch.stack([self.loss(learners[:, k], labels) for k in range(learners.shape[1])]).mean()
        decay = activation_decay(learners)
        norm = learner_norm_penalty(output.learner_weights)
        loss = metric + self.cfg.activation_decay * decay + self.cfg.norm_penalty * norm
        per_scale = learners.view(len(learners), self.cfg.scales, self.cfg.branches, -1)
        stats = {"metric_loss": float(metric.detach()), "activation_decay": float(decay.detach()),
                 "norm_penalty": float(norm.detach())}
        if self.adversaries:
            reversed_ = grad_reverse(nn.functional.normalize(per_scale, dim=3))
            adversary = sum(learner_discrepancy(nn.functional.normalize(f(reversed_[:, i]), dim=2))
                            for i, f in enumerate(self.adversaries))
            loss = loss + self.cfg.adversary_weight * adversary
            stats["adversary_loss"] = float(adversary.detach())
        if self.cfg.branches > 1:
            stats["learner_similarity"] = float(learner_similarity(per_scale.detach()).mean())
        return ObjectiveOutput(loss, {"loss": float(loss.detach()), **stats})


def attention_stats(attention: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Flatten ``attention_diagnostics`` into ``mpn_attention_kl_l<layer>_h<head>`` and ``mpn_same_class_mass_...``."""
    diag = attention_diagnostics(attention, labels)
    stats = {"mpn_same_class_mass_uniform": float(diag["same_class_mass_uniform"])}
    for name, key in (("mpn_attention_kl", "kl_from_uniform"), ("mpn_same_class_mass", "same_class_mass")):
        for (layer, head), value in _indexed(diag[key]):
            stats[f"{name}_l{layer}_h{head}"] = value
    return stats


def _indexed(values: torch.Tensor) -> list[tuple[tuple[int, int], float]]:
    return [((i, j), float(values[i, j])) for i in range(values.shape[0]) for j in range(values.shape[1])]


def build_objective(model_cfg: ModelConfig, train_cfg: TrainConfig, num_classes: int,
                    embedding_dim: int) -> nn.Module:
    """The objective of ``model_cfg.kind``: ``train.loss`` for embedding models, the MPN losses for ``mpn``,
    ``train.loss`` per learner plus DeML's regularisers and adversary for ``deml``."""
    if model_cfg.kind == "mpn":
        return MPNObjective(model_cfg, num_classes, embedding_dim)
    if model_cfg.kind == "deml":
        learner_dim = embedding_dim // (model_cfg.deml.scales * model_cfg.deml.branches)
        return DeMLObjective(model_cfg.deml, build_loss(train_cfg.loss, num_classes, learner_dim), learner_dim)
    return MetricObjective(build_loss(train_cfg.loss, num_classes, embedding_dim), build_miner(train_cfg.loss))


def distribute(objective: nn.Module) -> nn.Module:
    """The objective as each rank runs it under torch.distributed (itself when not distributed).

    Metric losses see the global batch through PML's wrappers (``wrap_distributed``); an objective
    with its own parameters and per-rank batch graphs (MPN, DeML's adversary) is wrapped in DDP so its gradients are
    averaged like the model's. Keep the unwrapped objective for checkpoints.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return objective
    if isinstance(objective, MetricObjective):
        loss, miner = wrap_distributed(objective.loss, objective.miner)
        return MetricObjective(loss, miner, loss_scale=dist.get_world_size())
    if not any(p.requires_grad for p in objective.parameters()):
        return objective  # e.g. DeML without an adversary: nothing to synchronise
    return DistributedDataParallel(objective, device_ids=None)


def load_mpn(model_cfg: ModelConfig, num_classes: int, embedding_dim: int,
             objective_state: dict[str, torch.Tensor]) -> MessagePassingNetwork:
    """The trained MPN of a checkpoint's objective state, in eval mode; a clear error when there is none."""
    if model_cfg.kind != "mpn" or not objective_state:
        raise ValueError("mpn: the checkpoint has no message passing network (train it with model.kind: mpn)")
    objective = MPNObjective(model_cfg, num_classes, embedding_dim)
    objective.load_state_dict(objective_state)
    return objective.mpn.eval()
