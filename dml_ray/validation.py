"""Zero-shot validation during training: held-out training classes, their retrieval metrics, model selection."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from dml_ray.metrics.retrieval import evaluate_retrieval
from dml_ray.precision import autocast

log = logging.getLogger(__name__)


def holdout_classes(labels: Sequence, fraction: float, seed: int = 0) -> set:
    """The classes held out for validation: ``ceil(fraction * classes)`` of the distinct ``labels`` (at least 2,
    and at least 2 left for training), drawn by a seeded permutation; empty when ``fraction`` is 0."""
    classes = sorted(set(labels))
    if fraction <= 0:
        return set()
    n = max(2, math.ceil(fraction * len(classes)))
    if len(classes) - n < 2:
        raise ValueError(f"train.validation.fraction {fraction}: holding out {n} of {len(classes)} training classes "
                         f"leaves fewer than 2 to train on")
    order = np.random.default_rng(seed).permutation(len(classes))
    return {classes[i] for i in order[:n]}


def embed_batches(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                  precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised embeddings (float32) and labels of every image in ``batches``, the model in eval mode."""
    was_training = model.training
    model.eval()
    embeddings, labels = [], []
    with torch.inference_mode():
        for x, y in batches:
            with autocast(precision, device):
                out = model(x.to(device))
            embeddings.append(out.embedding.float().cpu().numpy())
            labels.append(np.asarray(y))
    model.train(was_training)
    if not embeddings:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(embeddings), np.concatenate(labels)


def validation_metrics(embeddings: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``recall_at_1`` and ``map_at_r`` of the held-out images, each image a query against all others (self
    excluded), exact cosine search: the evaluate stage's protocol (metrics/retrieval.py) on the held-out classes."""
    ids = np.arange(len(labels)).astype(str).astype(object)
    rows = evaluate_retrieval(embeddings, labels, ids, embeddings, labels, ids, ks=[1], with_nmi=False)
    values = {(r["metric"], r["k"]): r["value"] for r in rows}
    return {"recall_at_1": values[("recall", 1)], "map_at_r": values[("map_at_r", None)]}


@dataclass
class ModelSelection:
    """Keeps the best evaluation by one metric and counts evaluations without gain (early stopping).

    A gain is a value above the best so far by more than ``min_delta``; ``stop`` is true once ``patience``
    evaluations in a row brought none (never when ``patience`` is None).
    """

    metric: str
    patience: Optional[int] = None
    min_delta: float = 0.0
    best_value: Optional[float] = None
    best_epoch: Optional[int] = None
    stale: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)

    def update(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Record an evaluation; True when it is the new best."""
        value = float(metrics[self.metric])
        self.history.append((epoch, value))
        if self.best_value is None or value > self.best_value + self.min_delta:
            self.best_value, self.best_epoch, self.stale = value, epoch, 0
            return True
        self.stale += 1
        return False

    @property
    def stop(self) -> bool:
        return self.patience is not None and self.stale >= self.patience

    def state_dict(self) -> dict:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch, "stale": self.stale,
                "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.best_value, self.best_epoch, self.stale = state["best_value"], state["best_epoch"], state["stale"]
        self.history = [tuple(h) for h in state["history"]]
