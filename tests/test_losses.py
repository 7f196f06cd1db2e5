"""Binomial deviance by hand, the loss/miner factory, and the 2-process gloo DistributedLossWrapper path."""
from __future__ import annotations

import datetime
import gc
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

from dml_ray.config import ConfigError, LossConfig
from dml_ray.losses.binomial_deviance import BinomialDevianceLoss
from dml_ray.losses.factory import LOSSES, MINERS, build_loss, build_miner, wrap_distributed


def _at_angles(degrees: list[float]) -> torch.Tensor:
    """Unit vectors in 2-D at the given angles, float64."""
    return torch.tensor(
        [[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees], dtype=torch.float64
    )


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _reference_loss(
    emb: list[list[float]],
    labels: list[int],
    ref: list[list[float]] | None = None,
    ref_labels: list[int] | None = None,
    alpha: float = 2.0,
    beta: float = 0.5,
    gamma_neg: float = 35.0,
    gamma_pos: float = 1.0,
) -> float:
    """deml-zero-shot-retrieval Eq. 5 as a plain double loop (self-pairs skipped without a reference set)."""
    same_set = ref is None
    ref = emb if ref is None else ref
    ref_labels = labels if ref_labels is None else ref_labels

    def cosine(u: list[float], v: list[float]) -> float:
        dot = sum(a * b for a, b in zip(u, v))
        return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))

    pos, neg = [], []
    for p, (u, lu) in enumerate(zip(emb, labels)):
        for q, (v, lv) in enumerate(zip(ref, ref_labels)):
            if same_set and p == q:
                continue
            s = 1 if lu == lv else 0
            gamma = gamma_pos if s else gamma_neg
            term = _softplus(-(2 * s - 1) * alpha * (cosine(u, v) - beta) * gamma)
            (pos if s else neg).append(term)
    return sum(pos) / max(len(pos), 1) + sum(neg) / max(len(neg), 1)


def test_binomial_deviance_hand_computed() -> None:
    # Angles 0, 60 (class 0) and 90, 180 (class 1): positive cosines 0.5 and 0; negative cosines
    # cos 90 = 0, cos 180 = -1, cos 30 = sqrt(3)/2, cos 120 = -0.5. Each pair appears twice (p, q)
    # and (q, p), so w = 4 positive and 8 negative ordered pairs, i.e. means over the 2 and 4 pairs.
    emb = _at_angles([0, 60, 90, 180])
    labels = torch.tensor([0, 0, 1, 1])
    positive = (math.log(2) + math.log(1 + math.e)) / 2  # alpha (D - beta) = 0 and -1
    negative = (
        math.log1p(math.exp(-35))  # 2 * 35 * (0 - 0.5)
        + math.log1p(math.exp(-105))  # 2 * 35 * (-1 - 0.5)
        + math.log1p(math.exp(70 * (math.sqrt(3) / 2 - 0.5)))
        + math.log1p(math.exp(-70))  # 2 * 35 * (-0.5 - 0.5)
    ) / 4
    loss = BinomialDevianceLoss()(emb, labels)
    assert loss.item() == pytest.approx(positive + negative, rel=1e-12)


def test_binomial_deviance_matches_double_loop_with_custom_parameters() -> None:
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])
    params = {"alpha": 3.0, "beta": 0.2, "gamma_neg": 10.0, "gamma_pos": 2.0}
    loss = BinomialDevianceLoss(**params)(emb, labels)
    assert loss.item() == pytest.approx(_reference_loss(emb.tolist(), labels.tolist(), **params), rel=1e-10)


def test_binomial_deviance_with_reference_set() -> None:
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    ref = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    labels, ref_labels = torch.tensor([0, 1, 2, 0]), torch.tensor([0, 0, 1, 2, 2])
    loss = BinomialDevianceLoss()(emb, labels, ref_emb=ref, ref_labels=ref_labels)
    expected = _reference_loss(emb.tolist(), labels.tolist(), ref.tolist(), ref_labels.tolist())
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_binomial_deviance_uses_only_mined_pairs() -> None:
    emb = _at_angles([0, 60, 90, 180])
    labels = torch.tensor([0, 0, 1, 1])
    # One positive pair (0, 1) with D = 0.5 and two negatives (0, 3), (1, 2): D = -1, sqrt(3)/2.
    pairs = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0, 1]), torch.tensor([3, 2]))
    expected = math.log(2) + (math.log1p(math.exp(-105)) + math.log1p(math.exp(70 * (math.sqrt(3) / 2 - 0.5)))) / 2
    assert BinomialDevianceLoss()(emb, labels, pairs).item() == pytest.approx(expected, rel=1e-12)
    # A triplet (anchor 0, positive 1, negative 3) becomes the pairs (0, 1) and (0, 3).
    triplet = (torch.tensor([0]), torch.tensor([1]), torch.tensor([3]))
    expected = math.log(2) + math.log1p(math.exp(-105))
    assert BinomialDevianceLoss()(emb, labels, triplet).item() == pytest.approx(expected, rel=1e-12)


def test_binomial_deviance_missing_pair_kinds_contribute_zero() -> None:
    emb = _at_angles([0, 60])
    only_positive = BinomialDevianceLoss()(emb, torch.tensor([5, 5]))
    assert only_positive.item() == pytest.approx(math.log(2), rel=1e-12)
    only_negative = BinomialDevianceLoss()(emb, torch.tensor([0, 1]))
    assert only_negative.item() == pytest.approx(math.log1p(math.exp(0.0)), rel=1e-12)  # 70 * (0.5 - 0.5)
    single = emb[:1].clone().requires_grad_()
    nothing = BinomialDevianceLoss()(single, torch.tensor([0]))
    nothing.backward()
    assert nothing.item() == 0.0 and torch.all(single.grad == 0)


def test_binomial_deviance_pulls_positives_and_pushes_negatives() -> None:
    # One positive pair alone: the loss falls as its cosine rises.
    pair_labels = torch.tensor([0, 0])
    losses_by_angle = [BinomialDevianceLoss()(_at_angles([0, a]), pair_labels).item() for a in (120, 90, 45, 10)]
    assert losses_by_angle == sorted(losses_by_angle, reverse=True)
    # A gradient step raises every positive cosine and lowers the hardest negative cosine.
    emb = _at_angles([0, 60, 90, 180]).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1])
    BinomialDevianceLoss()(emb, labels).backward()
    with torch.no_grad():
        before = torch.nn.functional.normalize(emb, dim=1)
        after = torch.nn.functional.normalize(emb - 0.01 * emb.grad, dim=1)
    cos_before, cos_after = before @ before.T, after @ after.T
    assert cos_after[0, 1] > cos_before[0, 1] and cos_after[2, 3] > cos_before[2, 3]
    assert cos_after[1, 2] < cos_before[1, 2]  # the negative at sqrt(3)/2 > beta


def test_binomial_deviance_requires_cosine_similarity() -> None:
    from pytorch_metric_learning.distances import LpDistance

    with pytest.raises(AssertionError, match="CosineSimilarity"):
        BinomialDevianceLoss(distance=LpDistance())


def _batch(seed: int = 0, n_classes: int = 4, per_class: int = 4, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(n_classes * per_class, dim, generator=gen).requires_grad_()
    return emb, torch.arange(n_classes).repeat_interleave(per_class)


@pytest.mark.parametrize("miner", [None, *MINERS])
@pytest.mark.parametrize("name", list(LOSSES))
def test_factory_builds_every_loss_and_miner(name: str, miner: str | None) -> None:
    cfg = LossConfig(name=name, miner=miner)
    loss, mined = build_loss(cfg, num_classes=4, embedding_dim=8), build_miner(cfg)
    assert isinstance(loss, LOSSES[name]) and (mined is None if miner is None else isinstance(mined, MINERS[miner]))
    emb, labels = _batch()
    value = loss(emb, labels, None if mined is None else mined(emb, labels))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(emb.grad).all()
    if name == "proxy_anchor":
        assert loss.proxies.shape == (4, 8) and loss.proxies.grad is not None


def test_factory_passes_params_and_keeps_pml_defaults() -> None:
    ms = build_loss(LossConfig(), num_classes=4, embedding_dim=8)
    assert (ms.alpha, ms.beta, ms.base) == (2, 50, 0.5)
    triplet = build_loss(LossConfig(name="triplet", params={"margin": 0.2}), 4, 8)
    assert triplet.margin == 0.2
    bd = build_loss(LossConfig(name="binomial_deviance", params={"gamma_neg": 25}), 4, 8)
    assert (bd.alpha, bd.beta, bd.gamma_neg, bd.gamma_pos) == (2.0, 0.5, 25.0, 1.0)
    proxy = build_loss(LossConfig(name="proxy_anchor", params={"margin": 0.2, "alpha": 16}), 10, 3)
    assert proxy.proxies.shape == (10, 3) and (proxy.margin, proxy.alpha) == (0.2, 16)
    semihard = {"type_of_triplets": "semihard"}
    miner = build_miner(LossConfig(name="triplet", miner="triplet_margin", miner_params=semihard))
    assert miner.type_of_triplets == "semihard"


@pytest.mark.parametrize(
    ("cfg", "where"),
    [
        (
            LossConfig.model_construct(name="multisimilarity", params={}, miner=None, miner_params={}),
            "config.train.loss.name: unknown loss 'multisimilarity'; expected one of: multi_similarity, triplet",
        ),
        (
            LossConfig(name="triplet", params={"margn": 0.1}),
            "config.train.loss.params.margn: unknown parameter of TripletMarginLoss; expected one of: margin, swap",
        ),
        (LossConfig(name="proxy_anchor", params={"num_classes": 3}), "config.train.loss.params.num_classes: set from"),
        (LossConfig(name="contrastive", params={"distance": "cosine"}), "config.train.loss.params.distance: unknown"),
        (LossConfig(name="binomial_deviance", params={"alpha": "two"}), "config.train.loss.params: BinomialDeviance"),
    ],
)
def test_factory_rejects_bad_losses_in_one_line(cfg: LossConfig, where: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_loss(cfg, num_classes=4, embedding_dim=8)
    assert str(err.value).startswith(where) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("cfg", "where"),
    [
        (
            LossConfig.model_construct(name="triplet", params={}, miner="hard", miner_params={}),
            "config.train.loss.miner: unknown miner 'hard'; expected one of: triplet_margin",
        ),
        (
            LossConfig(miner="batch_hard", miner_params={"margin": 0.1}),
            "config.train.loss.miner_params.margin: unknown parameter of BatchHardMiner; expected one of: (none)",
        ),
        (
            LossConfig(miner_params={"epsilon": 0.1}),
            "config.train.loss.miner_params: given but config.train.loss.miner is not set",
        ),
    ],
)
def test_factory_rejects_bad_miners_in_one_line(cfg: LossConfig, where: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_miner(cfg)
    assert str(err.value).startswith(where) and "\n" not in str(err.value)


def test_wrap_distributed_is_identity_without_a_process_group() -> None:
    loss, miner = build_loss(LossConfig(), 4, 8), build_miner(LossConfig(miner="multi_similarity"))
    assert wrap_distributed(loss, miner) == (loss, miner)


_DISTRIBUTED_CASES = [
    ("multi_similarity", None),
    ("binomial_deviance", None),
    ("binomial_deviance", "multi_similarity"),
    ("contrastive", "batch_hard"),
    ("proxy_anchor", None),
]


def _check_distributed_case(rank: int, world_size: int, name: str, miner_name: str | None) -> None:
    """On this rank, the wrapped loss of the local slice equals world_size x the global-batch loss."""
    gen = torch.Generator().manual_seed(0)
    global_emb = torch.randn(8 * world_size, 6, generator=gen, dtype=torch.float64)
    global_labels = torch.arange(4 * world_size).repeat_interleave(2)
    local = slice(rank * 8, (rank + 1) * 8)
    cfg = LossConfig(name=name, miner=miner_name)
    torch.manual_seed(rank)  # proxies start different on each rank; DDP must sync them
    loss, miner = build_loss(cfg, 4 * world_size, 6), build_miner(cfg)
    wrapped, wrapped_miner = wrap_distributed(loss, miner)
    assert isinstance(wrapped if name != "proxy_anchor" else wrapped.module, DistributedLossWrapper)

    reference = build_loss(cfg, 4 * world_size, 6)
    reference.load_state_dict(loss.state_dict())  # rank 0's proxies after DDP's broadcast
    full = global_emb.clone().requires_grad_()
    expected = reference(full, global_labels, None if miner is None else miner(full, global_labels))
    expected.backward()

    emb, labels = global_emb[local].clone().requires_grad_(), global_labels[local]
    value = wrapped(emb, labels, None if wrapped_miner is None else wrapped_miner(emb, labels))
    value.backward()
    torch.testing.assert_close(value / world_size, expected, msg=f"{name} loss on rank {rank}")
    torch.testing.assert_close(emb.grad, world_size * full.grad[local], msg=f"{name} grad on rank {rank}")
    if name == "proxy_anchor":
        gathered = [torch.empty_like(loss.proxies) for _ in range(world_size)]
        dist.all_gather(gathered, loss.proxies.detach())
        torch.testing.assert_close(gathered[0], gathered[1], rtol=0, atol=0)
        torch.testing.assert_close(loss.proxies.grad, reference.proxies.grad)


def _distributed_worker(rank: int, world_size: int, port: int) -> None:
    """One rank of the gloo group: check every case, then tear the group down cleanly."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    for name, miner_name in _DISTRIBUTED_CASES:
        _check_distributed_case(rank, world_size, name, miner_name)
    # DDP keeps the process group alive: free it before destroying the group, or gloo's threads
    # may outlive the interpreter and abort the process at exit. (A failed rank just raises, and
    # mp.spawn terminates the others.)
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_distributed_loss_equals_single_process_loss_over_the_global_batch() -> None:
    mp.spawn(_distributed_worker, args=(2, _free_port()), nprocs=2, join=True)

