"""The pieces of a training step that do not depend on Ray: optimizer, schedule, one epoch."""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Iterable, Optional

import torch
from torch import nn

from dml_ray.config import OptimizerConfig, SchedulerConfig
from dml_ray.precision import as_float32, autocast, grad_scaler


def head_rate_parameters(module: nn.Module) -> set[int]:
    """Ids of the parameters of ``module`` that learn at ``lr * head_lr_multiplier``.

    A module names them with a ``head_rate_parameters()`` method (DeML: the learners only, Sec. 4 "10
    times learning rate for the learners"; its CAMs and adversaries learn at the base rate); otherwise
    every parameter outside ``backbone.`` does.
    """
    if hasattr(module, "head_rate_parameters"):
        return {id(p) for p in module.head_rate_parameters()}
    return {id(p) for name, p in module.named_parameters() if not name.startswith("backbone.")}


def build_optimizer(cfg: OptimizerConfig, model: nn.Module, objective: Optional[nn.Module] = None) -> torch.optim.Optimizer:
    """Optimizer with two groups: the base rate ``lr`` (the backbone, and whatever a module keeps there) and
    ``lr * head_lr_multiplier`` (``head_rate_parameters`` of the model and of the objective)."""
    modules = [getattr(model, "module", model)] + ([objective] if objective is not None else [])
    base, head = [], []
    for module in modules:
        fast = head_rate_parameters(module)
        for param in module.parameters():
            (head if id(param) in fast else base).append(param)
    groups = [
        {"params": base, "lr": cfg.lr},
        {"params": head, "lr": cfg.lr * cfg.head_lr_multiplier},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "radam":
        return torch.optim.RAdam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 decoupled_weight_decay=cfg.decoupled_weight_decay)
    optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
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


def train_epoch(model: nn.Module, objective: nn.Module, optimizer: torch.optim.Optimizer,
                batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                precision: str = "fp32", scaler: Optional[torch.amp.GradScaler] = None) -> dict[str, float]:
    """One pass over ``batches``: the mean of every statistic the objective reports, plus steps, images, seconds.

    The model's forward pass runs under autocast for ``precision`` (bf16 / fp16); the objective runs in
    float32 on the float32 copies of the outputs. With fp16 pass the ``scaler`` (``grad_scaler``), kept
    across epochs so its scale adapts.
    """
    model.train()
    objective.train()
    totals: dict[str, float] = defaultdict(float)
    steps, images = 0, 0
    start = time.perf_counter()
    if precision == "fp16" and scaler is None:
        scaler = grad_scaler(precision, device)
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(precision, device):
            output = model(x)
        loss, stats = objective(as_float32(output), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        for name, value in stats.items():
            totals[name] += value
        steps += 1
        images += len(y)
    seconds = time.perf_counter() - start
    return {**{name: total / max(steps, 1) for name, total in totals.items()},
            "steps": steps, "images": images, "seconds": seconds}
