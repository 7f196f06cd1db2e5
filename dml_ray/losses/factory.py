"""Build the configured loss and miner from pytorch-metric-learning (and our binomial deviance).

``train.loss.name`` and ``train.loss.miner`` pick a class; ``params`` / ``miner_params`` are
its keyword arguments, checked against the class's own ``__init__`` signature so that a typo
fails at start-up with one line naming the key. Only the class's named arguments are accepted
(PML's generic ``distance``, ``reducer`` and regularizer objects cannot be written in YAML).

No miner is added implicitly, not even for ``triplet``: ``miner: null`` must mean "every
triplet of the batch", and PML's ``TripletMarginLoss`` then already averages over the
triplets that violate the margin (its ``AvgNonZeroReducer``), which is what a
``TripletMarginMiner`` with the same margin would select. Semi-hard or hard mining is asked
for explicitly, e.g. ``miner: triplet_margin, miner_params: {type_of_triplets: semihard}``.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Optional

import torch
import torch.distributed as dist
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.miners import BaseMiner
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper
from torch.nn.parallel import DistributedDataParallel

from dml_ray.config import ConfigError, LossConfig
from dml_ray.losses.binomial_deviance import BinomialDevianceLoss

logger = logging.getLogger(__name__)

_WHERE = "config.train.loss"

LOSSES: dict[str, type[pml_losses.BaseMetricLossFunction]] = {
    "multi_similarity": pml_losses.MultiSimilarityLoss,
    "triplet": pml_losses.TripletMarginLoss,
    "contrastive": pml_losses.ContrastiveLoss,
    "proxy_anchor": pml_losses.ProxyAnchorLoss,
    "binomial_deviance": BinomialDevianceLoss,
}
MINERS: dict[str, type[BaseMiner]] = {
    "triplet_margin": pml_miners.TripletMarginMiner,
    "multi_similarity": pml_miners.MultiSimilarityMiner,
    "batch_hard": pml_miners.BatchHardMiner,
}
# Constructor arguments that come from the model and the data, never from ``params``.
_SUPPLIED_ARGS: dict[str, tuple[str, ...]] = {"proxy_anchor": ("num_classes", "embedding_size")}


def _lookup(registry: dict[str, type], name: str, field: str, kind: str) -> type:
    """Return ``registry[name]`` or raise a one-line ConfigError listing the known names."""
    try:
        return registry[name]
    except KeyError:
        raise ConfigError(
            f"{_WHERE}.{field}: unknown {kind} {name!r}; expected one of: {', '.join(registry)}"
        ) from None


def _checked_params(cls: type, params: dict[str, Any], field: str, supplied: tuple[str, ...] = ()) -> dict[str, Any]:
    """Return ``params`` after checking every key is a named ``__init__`` argument of ``cls``."""
    signature = inspect.signature(cls.__init__)
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    allowed = [
        name
        for name, parameter in signature.parameters.items()
        if name != "self" and parameter.kind in named and name not in supplied
    ]
    for key in params:
        if key in supplied:
            raise ConfigError(f"{_WHERE}.{field}.{key}: set from the data and the model; remove it")
        if key not in allowed:
            raise ConfigError(
                f"{_WHERE}.{field}.{key}: unknown parameter of {cls.__name__}; "
                f"expected one of: {', '.join(allowed) or '(none)'}"
            )
    return dict(params)


def _construct(cls: type, field: str, *args: Any, **params: Any) -> Any:
    """Instantiate ``cls``, turning a rejected value into a one-line ConfigError."""
    try:
        return cls(*args, **params)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{_WHERE}.{field}: {cls.__name__} rejected {params}: {err}") from None


def build_loss(cfg: LossConfig, num_classes: int, embedding_dim: int) -> torch.nn.Module:
    """Instantiate the loss named by ``cfg.name`` with ``cfg.params``.

    Args:
        cfg: the ``train.loss`` section.
        num_classes: number of training classes (proxy-based losses need one proxy each).
        embedding_dim: dimension of the embeddings the loss receives.

    Returns:
        a PML ``BaseMetricLossFunction``; unset parameters keep PML's defaults (for
        multi_similarity those of the paper: alpha=2, beta=50, base=0.5).

    Raises:
        ConfigError: unknown loss name or parameter, or a value the class rejects.
    """
    cls = _lookup(LOSSES, cfg.name, "name", "loss")
    params = _checked_params(cls, cfg.params, "params", _SUPPLIED_ARGS.get(cfg.name, ()))
    if cfg.name == "proxy_anchor":
        loss = _construct(cls, "params", num_classes, embedding_dim, **params)
    else:
        loss = _construct(cls, "params", **params)
    logger.info("loss %s(%s)", cls.__name__, params)
    return loss


def build_miner(cfg: LossConfig) -> Optional[BaseMiner]:
    """Instantiate the miner named by ``cfg.miner`` with ``cfg.miner_params``; None when unset.

    Raises:
        ConfigError: unknown miner name or parameter, a rejected value, or ``miner_params``
            given without a miner.
    """
    if cfg.miner is None:
        if cfg.miner_params:
            raise ConfigError(f"{_WHERE}.miner_params: given but {_WHERE}.miner is not set")
        return None
    cls = _lookup(MINERS, cfg.miner, "miner", "miner")
    params = _checked_params(cls, cfg.miner_params, "miner_params")
    miner = _construct(cls, "miner_params", **params)
    logger.info("miner %s(%s)", cls.__name__, params)
    return miner


def wrap_distributed(
    loss: torch.nn.Module, miner: Optional[BaseMiner]
) -> tuple[torch.nn.Module, Optional[torch.nn.Module]]:
    """Make ``loss`` and ``miner`` see the global batch when torch.distributed runs > 1 process.

    Uses PML's ``DistributedLossWrapper`` / ``DistributedMinerWrapper`` with ``efficient=False``:
    every rank all-gathers the embeddings and labels, mines and computes the loss over the
    whole global batch (all ranks' embeddings as queries and references), and gradients flow
    into the local embeddings only. The wrapped loss returns ``world_size`` x the global-batch
    loss, so that DDP's gradient averaging over ranks gives the model exactly the gradient of
    the global-batch loss; divide the value by the world size to log it.

    PML 2.x's wrapper does not put the loss in DDP, so a loss with parameters (ProxyAnchor's
    proxies) would get ``world_size`` x its gradient on each rank and never be synchronised.
    Such a loss is therefore also wrapped in ``DistributedDataParallel`` (``device_ids=None``,
    which works for CPU/gloo and single-GPU modules alike; it broadcasts rank 0's initial
    parameters), with a gradient hook dividing its parameters' gradients by the world size.
    Move the loss to its device before calling this; keep the unwrapped ``loss`` for
    checkpoints; drop the wrapped one before ``destroy_process_group`` (DDP holds the group).

    Returns:
        ``(loss, miner)`` unchanged when not distributed or the world size is 1, else the
        wrapped pair (the miner stays None when it is None).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return loss, miner
    world_size = dist.get_world_size()
    wrapped: torch.nn.Module = DistributedLossWrapper(loss, efficient=False)
    trainable = [param for param in loss.parameters() if param.requires_grad]
    if trainable:
        for param in trainable:
            param.register_hook(lambda grad: grad / world_size)
        wrapped = DistributedDataParallel(wrapped, device_ids=None)
    wrapped_miner = None if miner is None else DistributedMinerWrapper(miner, efficient=False)
    logger.info("loss and miner gather embeddings over %d ranks", world_size)
    return wrapped, wrapped_miner
