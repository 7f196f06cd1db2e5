"""RankAwarePKBatchSampler: P x K batches, disjoint classes across ranks, epochs, determinism, errors."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dml_ray.data.samplers import RankAwarePKBatchSampler

# 10 classes with 6 samples each, shuffled so that dataset order is not class order.
LABELS = [(7 * i) % 10 for i in range(60)]


def _epoch(sampler: RankAwarePKBatchSampler, epoch: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def _ranks(labels: list[int], p: int, k: int, world: int, **kwargs: int) -> list[RankAwarePKBatchSampler]:
    return [RankAwarePKBatchSampler(labels, p, k, num_replicas=world, rank=r, **kwargs) for r in range(world)]


def test_each_batch_is_p_classes_times_k_samples() -> None:
    for batch in _epoch(RankAwarePKBatchSampler(LABELS, classes_per_batch=3, samples_per_class=4)):
        assert len(batch) == 12
        counts = Counter(LABELS[i] for i in batch)
        assert len(counts) == 3 and set(counts.values()) == {4}
        for start in range(0, 12, 4):  # grouped by class, no repeated sample (6 >= K)
            block = batch[start : start + 4]
            assert len({LABELS[i] for i in block}) == 1 and len(set(block)) == 4


def test_ranks_draw_disjoint_classes_and_together_equal_one_process() -> None:
    ranks = _ranks(LABELS, p=2, k=3, world=2, seed=5, steps_per_epoch=7)
    single = RankAwarePKBatchSampler(LABELS, classes_per_batch=4, samples_per_class=3, seed=5, steps_per_epoch=7)
    for epoch in (0, 1):
        per_rank = [_epoch(sampler, epoch) for sampler in ranks]
        for step, (batch0, batch1, whole) in enumerate(zip(*per_rank, _epoch(single, epoch))):
            classes0, classes1 = {LABELS[i] for i in batch0}, {LABELS[i] for i in batch1}
            assert len(classes0) == len(classes1) == 2 and not classes0 & classes1, f"step {step}"
            assert batch0 + batch1 == whole


def test_lengths_are_equal_across_ranks() -> None:
    ranks = _ranks(LABELS, p=2, k=4, world=3)
    assert [len(s) for s in ranks] == [60 // (2 * 4 * 3)] * 3
    assert [len(_epoch(s)) for s in ranks] == [2, 2, 2]
    assert len(RankAwarePKBatchSampler(LABELS, 5, 20)) == 1  # fewer images than a batch: still one step
    assert [len(_epoch(s)) for s in _ranks(LABELS, p=2, k=4, world=3, steps_per_epoch=11)] == [11] * 3


def test_every_class_is_visited_once_per_cycle() -> None:
    sampler = RankAwarePKBatchSampler(LABELS, classes_per_batch=4, samples_per_class=2, steps_per_epoch=5)
    steps_per_cycle = math.ceil(10 / 4)
    for epoch in range(4):
        batches = _epoch(sampler, epoch)
        assert {LABELS[i] for batch in batches[:steps_per_cycle] for i in batch} == set(range(10))
        assert all(len({LABELS[i] for i in batch}) == 4 for batch in batches)


def test_epochs_reshuffle_and_draws_are_deterministic() -> None:
    sampler = RankAwarePKBatchSampler(LABELS, 2, 3, num_replicas=2, rank=1, seed=3)
    twin = RankAwarePKBatchSampler(LABELS, 2, 3, num_replicas=2, rank=1, seed=3)
    first = _epoch(sampler, 0)
    assert _epoch(sampler, 1) != first
    assert _epoch(sampler, 0) == first == _epoch(twin, 0)
    assert _epoch(RankAwarePKBatchSampler(LABELS, 2, 3, num_replicas=2, rank=1, seed=4), 0) != first


def test_small_classes_are_drawn_with_replacement() -> None:
    labels = [0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    for batch in _epoch(RankAwarePKBatchSampler(labels, classes_per_batch=3, samples_per_class=4, steps_per_epoch=6)):
        by_class = {c: [i for i in batch if labels[i] == c] for c in range(3)}
        assert all(len(indices) == 4 for indices in by_class.values())
        assert set(by_class[0]) <= {0, 1}
        assert sorted(by_class[1]) == [2, 3, 4, 5] and sorted(by_class[2]) == [6, 7, 8, 9]


def test_works_as_a_dataloader_batch_sampler() -> None:
    labels = torch.tensor(LABELS)
    loader = DataLoader(TensorDataset(labels), batch_sampler=RankAwarePKBatchSampler(LABELS, 2, 3))
    batches = [batch_labels for (batch_labels,) in loader]
    assert len(batches) == len(loader.batch_sampler) == 10
    assert all(batch.shape == (6,) and len(batch.unique()) == 2 for batch in batches)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes_per_batch": 4, "num_replicas": 3}, "10 classes cannot fill 4 classes per batch x 3 replicas = 12"),
        ({"rank": 2, "num_replicas": 2}, "rank 2 is outside [0, 2)"),
        ({"samples_per_class": 0}, "samples_per_class must be >= 1, got 0"),
        ({"steps_per_epoch": 0}, "steps_per_epoch must be >= 1, got 0"),
    ],
)
def test_bad_arguments_raise_one_line_errors(kwargs: dict[str, int], message: str) -> None:
    arguments = {"labels": LABELS, "classes_per_batch": 2, "samples_per_class": 2, **kwargs}
    with pytest.raises(ValueError) as err:
        RankAwarePKBatchSampler(**arguments)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_empty_labels_are_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        RankAwarePKBatchSampler([], 1, 1)
