"""The pieces of a training step that do not depend on Ray: optimizer, schedule, one epoch."""
from __future__ import annotations

import time
from typing import Iterable, Optional

import torch
from torch import nn

from dml_ray.config import OptimizerConfig, SchedulerConfig


def build_optimizer(cfg: OptimizerConfig, model: nn.Module, extra: Optional[nn.Module] = None) -> torch.optim.Optimizer:
    """Optimizer over the backbone (lr) and the head plus loss parameters (lr * head_lr_multiplier)."""
    net = getattr(model, "module", model)
    head_params = list(net.head.parameters()) + (list(extra.parameters()) if extra is not None else [])
    groups = [
        {"params": list(net.backbone.parameters()), "lr": cfg.lr},
        {"params": head_params, "lr": cfg.lr * cfg.head_lr_multiplier},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}
    return optimizers[cfg.name](groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: SchedulerConfig, optimizer: torch.optim.Optimizer, epochs: int):
    """Per-epoch learning-rate schedule (None for a constant rate)."""
    if cfg.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.gamma)
    if cfg.name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.milestones, cfg.gamma)
    if cfg.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return None


def train_epoch(model: nn.Module, loss_fn: nn.Module, miner: Optional[nn.Module], optimizer: torch.optim.Optimizer,
                batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                loss_scale: float = 1.0) -> dict[str, float]:
    """One pass over ``batches``; returns mean loss (divided by ``loss_scale``), steps, images and seconds."""
    model.train()
    total, steps, images = 0.0, 0, 0
    start = time.perf_counter()
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        embeddings = model(x).embedding
        indices = miner(embeddings, y) if miner is not None else None
        loss = loss_fn(embeddings, y, indices)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) / loss_scale
        steps += 1
        images += len(y)
    seconds = time.perf_counter() - start
    return {"loss": total / max(steps, 1), "steps": steps, "images": images, "seconds": seconds}
