"""Class-balanced P x K batches for data-parallel training.

Hand-written because pytorch-metric-learning's ``MPerClassSampler`` is not rank-aware: under
several workers each rank would draw its own classes independently, so ranks repeat each
other's classes within a step and the global batch is not P * num_replicas distinct classes.
Here every rank replays the same seeded draw of the global batch and keeps its own block of
classes, so the ranks' classes are disjoint within a step and the union of the ranks' batches
is exactly the batch one process would draw with ``classes_per_batch = P * num_replicas``.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Optional

import numpy as np
from torch.utils.data import Sampler


class RankAwarePKBatchSampler(Sampler[list[int]]):
    """Yield batches of dataset indices: P classes x K samples per rank, classes disjoint across ranks.

    Each step draws ``P * num_replicas`` distinct classes by walking through a per-epoch random
    permutation of the classes (a fresh permutation when one is used up, so every class is
    visited once per ``n_classes / (P * num_replicas)`` steps); rank ``r`` takes the ``r``-th
    block of P classes. Each class gives K indices, without replacement when it has at least K
    samples, with replacement otherwise. The draw uses ``np.random.default_rng((seed, epoch))``
    on every rank; call ``set_epoch`` before each epoch to reshuffle (as with
    ``DistributedSampler``). Use it as a DataLoader ``batch_sampler``.

    Args:
        labels: class label of every dataset item, in dataset order.
        classes_per_batch: P, classes per batch on each rank.
        samples_per_class: K, samples per class.
        num_replicas: number of data-parallel ranks.
        rank: this rank, in ``[0, num_replicas)``.
        seed: seed shared by all ranks.
        steps_per_epoch: batches per epoch; default ``len(labels) // (P * K * num_replicas)``,
            at least 1. The same on every rank.
        random_factorisation: draw each epoch's (P, K) afresh, uniformly among the factorisations of
            ``P * K`` with ``2 <= P <= P K / 2`` (and ``P * num_replicas`` classes available), from the
            epoch's seeded draw, so every rank picks the same; the batch size stays ``P * K`` (the
            authors' ``NumberSampler`` of intra-batch-mpn, CUB: 54 = 2 x 27, 3 x 18, 6 x 9, 9 x 6,
            18 x 3 or 27 x 2).

    Raises:
        ValueError: empty labels, non-positive sizes, a rank out of range, or fewer classes
            than ``P * num_replicas``.
    """

    def __init__(
        self,
        labels: Sequence[int],
        classes_per_batch: int,
        samples_per_class: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        steps_per_epoch: Optional[int] = None,
        random_factorisation: bool = False,
    ) -> None:
        super().__init__()
        label_array = np.asarray(labels, dtype=np.int64)
        if label_array.ndim != 1 or label_array.size == 0:
            raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {label_array.shape}")
        for name, value in (
            ("classes_per_batch", classes_per_batch),
            ("samples_per_class", samples_per_class),
            ("num_replicas", num_replicas),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        classes, inverse = np.unique(label_array, return_inverse=True)
        classes_per_step = classes_per_batch * num_replicas
        if len(classes) < classes_per_step:
            raise ValueError(
                f"{len(classes)} classes cannot fill {classes_per_batch} classes per batch "
                f"x {num_replicas} replicas = {classes_per_step} distinct classes per step"
            )
        order = np.argsort(inverse, kind="stable")
        self._indices_by_class = np.split(order, np.cumsum(np.bincount(inverse))[:-1])
        self.classes_per_batch = classes_per_batch
        self.samples_per_class = samples_per_class
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.steps_per_epoch = steps_per_epoch or max(
            1, len(label_array) // (classes_per_step * samples_per_class)
        )
        self.epoch = 0
        self.factorisations = [(classes_per_batch, samples_per_class)]
        if random_factorisation:
            size = classes_per_batch * samples_per_class
            self.factorisations = [(p, size // p) for p in range(2, size // 2 + 1)
                                   if size % p == 0 and p * num_replicas <= len(classes)]
            if not self.factorisations:
                raise ValueError(f"random_factorisation: no factorisation P x K of {size} with 2 <= P <= {size // 2} "
                                 f"and P x {num_replicas} replicas <= {len(classes)} classes")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches ``__iter__`` yields (reshuffles classes and samples)."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches per epoch, equal on every rank."""
        return self.steps_per_epoch

    def epoch_factorisation(self) -> tuple[int, int]:
        """(P, K) of the selected epoch: the configured one, or that epoch's random draw."""
        return self._factorisation(np.random.default_rng((self.seed, self.epoch)))

    def _factorisation(self, rng: np.random.Generator) -> tuple[int, int]:
        if len(self.factorisations) == 1:
            return self.factorisations[0]
        return self.factorisations[int(rng.integers(len(self.factorisations)))]

    def __iter__(self) -> Iterator[list[int]]:
        """Yield this rank's ``P * K`` dataset indices per step, grouped by class."""
        rng = np.random.default_rng((self.seed, self.epoch))
        classes_per_batch, samples_per_class = self._factorisation(rng)
        n_classes = len(self._indices_by_class)
        classes_per_step = classes_per_batch * self.num_replicas
        queue: list[int] = []
        first = self.rank * classes_per_batch
        for _ in range(self.steps_per_epoch):
            step_classes = queue[:classes_per_step]
            queue = queue[classes_per_step:]
            if len(step_classes) < classes_per_step:
                # The permutation ran out: fill from a fresh one, skipping classes already in
                # this step; the skipped ones stay queued, so the new cycle still visits them.
                fresh = rng.permutation(n_classes).tolist()
                taken = set(step_classes)
                for cls in fresh:
                    if len(step_classes) < classes_per_step and cls not in taken:
                        step_classes.append(cls)
                    else:
                        queue.append(cls)
            # Every rank draws the samples of the whole step so that all ranks' RNGs stay equal.
            global_batch = [self._draw(rng, cls, samples_per_class) for cls in step_classes]
            yield [int(i) for block in global_batch[first : first + classes_per_batch] for i in block]

    def _draw(self, rng: np.random.Generator, cls: int, k: int) -> np.ndarray:
        """K dataset indices of class ``cls`` (with replacement only when it has fewer than K)."""
        members = self._indices_by_class[cls]
        return rng.choice(members, size=k, replace=len(members) < k)
