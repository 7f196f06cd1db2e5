"""``model.mpn.variant: authors``: each difference from the paper's equations, layer by layer, against small
hand-written references of the authors' code (github.com/dvl-tum/intra_batch: net/attentions.py,
net/gnn_base.py, net/utils.py, combine_sampler.py, dataset/utils.py, trainer.py), and the training-loop
settings of the authors' configs (jobs/configs/mpn_*_authors.yaml)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dml_ray.config import load_config, parse_config
from dml_ray.data.samplers import RankAwarePKBatchSampler
from dml_ray.data.transforms import UniformAspectErasing, train_transform
from dml_ray.models.embedding import EmbeddingOutput
from dml_ray.models.mpn import MessagePassingNetwork, NeckClassifier, refine_over_batches, softmax_with_null
from dml_ray.objectives import MPNObjective
from dml_ray.training import build_optimizer, build_scheduler

REPO = Path(__file__).parents[1]
TIGHT = dict(rtol=1e-10, atol=1e-12)


def _authors(layers: int = 1, heads: int = 2, dim: int = 8, classes: int = 3, concat: bool = False,
             seed: int = 0) -> MessagePassingNetwork:
    torch.manual_seed(seed)
    mpn = MessagePassingNetwork(classes, num_layers=layers, num_heads=heads, dim=dim, variant="authors",
                                concat_layers=concat).double().eval()
    for module in mpn.modules():  # random biases and BN statistics, so every term is exercised
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.normal_()
        if isinstance(module, nn.BatchNorm1d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_()
    return mpn


def test_softmax_with_an_extra_zero_logit():
    s = torch.tensor([[1.0, -2.0, 0.5], [30.0, 31.0, -40.0]], dtype=torch.float64)
    expected = s.exp() / (1 + s.exp().sum(1, keepdim=True))
    torch.testing.assert_close(softmax_with_null(s), expected, **TIGHT)
    assert (softmax_with_null(s).sum(1) < 1).all()
    # the authors' form: shift by max(max_j s_j, 0), divide by sum + exp(-shift)
    shift = s.max(1, keepdim=True).values.clamp_min(0)
    authors = (s - shift).exp() / ((s - shift).exp().sum(1, keepdim=True) + (-shift).exp())
    torch.testing.assert_close(softmax_with_null(s), authors, **TIGHT)


def _reference_layer(layer, h: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One authors' DotAttentionLayer in eval mode, written out: Q/K/V with biases, per-head logits over
    sqrt(d / M), softmax with a zero logit, sum over neighbours, heads concatenated, output projection,
    skip + LayerNorm, FF, skip + LayerNorm."""
    n, d = h.shape
    hd = d // heads
    q, k, v = (h @ lin.weight.T + lin.bias for lin in (layer.query, layer.key, layer.value))
    outs, attention = [], []
    for m in range(heads):
        cols = slice(m * hd, (m + 1) * hd)
        scores = q[:, cols] @ k[:, cols].T / math.sqrt(hd)
        alpha = scores.exp() / (1 + scores.exp().sum(1, keepdim=True))
        attention.append(alpha)
        outs.append(alpha @ v[:, cols])
    feats = torch.cat(outs, 1) @ layer.output.weight.T + layer.output.bias
    f = F.layer_norm(h + feats, (d,), layer.norm1.weight, layer.norm1.bias, eps=1e-5)
    lin1, lin2 = layer.ff[0], layer.ff[3]
    g = F.layer_norm(f + (torch.relu(f @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias), (d,),
                     layer.norm2.weight, layer.norm2.bias, eps=1e-5)
    return g, torch.stack(attention)


def test_authors_layers_and_classifier_match_a_hand_written_reference():
    mpn = _authors(layers=2, heads=2, dim=8, classes=3)
    x = F.normalize(torch.randn(5, 8, dtype=torch.float64), dim=1)  # unit-norm backbone features
    out = mpn(x)
    h = x @ mpn.dim_red.weight.T + mpn.dim_red.bias  # dim_red: learnable, on the unit feature
    for layer_index, layer in enumerate(mpn.layers):
        h, attention = _reference_layer(layer, h, 2)
        torch.testing.assert_close(out.attention[layer_index], attention, **TIGHT)
    torch.testing.assert_close(out.features, h, **TIGHT)
    bn = mpn.classifier.norm
    normed = (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(out.logits, normed @ mpn.classifier.linear.weight.T, **TIGHT)
    assert mpn.classifier.linear.bias is None
    assert (out.attention.sum(-1) < 1).all()


def test_concatenated_layers_classify_and_refine():
    mpn = _authors(layers=2, heads=4, dim=8, classes=3, concat=True)
    x = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=1)
    out = mpn(x)
    h1, _ = _reference_layer(mpn.layers[0], mpn.dim_red(x), 4)
    h2, _ = _reference_layer(mpn.layers[1], h1, 4)
    torch.testing.assert_close(out.features, torch.cat([h1, h2], 1), **TIGHT)
    assert mpn.classifier.norm.num_features == 16 and out.logits.shape == (6, 3)
    # test-time refinement returns the same concatenation at each row's node
    features = F.normalize(torch.randn(12, 8, dtype=torch.float64), dim=1)
    gen = torch.Generator().manual_seed(1)
    rows = torch.arange(12)
    batches = torch.stack([torch.cat([rows[r:r + 1], torch.randperm(12, generator=gen)[:4]]) for r in rows])
    refined = refine_over_batches(mpn, features, batches, rows, chunk=5)
    assert refined.shape == (12, 16)
    for r in range(12):
        torch.testing.assert_close(refined[r], mpn(features[batches[r]]).features[0], **TIGHT)


def test_authors_initialisation_and_the_frozen_bn_shift():
    torch.manual_seed(0)
    mpn = MessagePassingNetwork(4, num_layers=1, num_heads=2, dim=16, variant="authors")
    layer = mpn.layers[0]
    bound = math.sqrt(6 / 32)  # Xavier-uniform for a 16 x 16 weight
    for lin in (layer.query, layer.key, layer.value, layer.output):
        assert lin.weight.abs().max() <= bound and (lin.bias == 0).all()
    assert mpn.classifier.linear.weight.std() < 0.003
    assert isinstance(mpn.classifier, NeckClassifier) and not mpn.classifier.norm.bias.requires_grad
    assert layer.scale == pytest.approx(math.sqrt(8))
    # a training step moves every parameter but the BN shift, which stays 0
    opt = build_optimizer(parse_config({}).train.optimizer, mpn)
    mpn.train()
    out = mpn(F.normalize(torch.randn(2, 6, 16), dim=2))
    F.cross_entropy(out.logits.reshape(-1, 4), torch.arange(12) % 4).backward()
    opt.step()
    assert (mpn.classifier.norm.bias == 0).all() and mpn.classifier.norm.bias.grad is None


def test_paper_variant_keeps_the_equations():
    torch.manual_seed(0)
    mpn = MessagePassingNetwork(3, num_layers=1, num_heads=2, dim=8)
    layer = mpn.layers[0]
    assert mpn.dim_red is None and isinstance(layer.output, nn.Identity) and isinstance(mpn.classifier, nn.Linear)
    assert all(lin.bias is None for lin in (layer.query, layer.key, layer.value))
    assert layer.scale == pytest.approx(math.sqrt(8))
    out = mpn.eval()(F.normalize(torch.randn(4, 8), dim=1))
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(1, 2, 4))
    with pytest.raises(ValueError, match="unknown variant 'author'"):
        MessagePassingNetwork(3, num_layers=1, num_heads=2, dim=8, variant="author")


def test_sop_setting_trains_the_backbone_cross_entropy_alone():
    cfg = parse_config({"model": {"kind": "mpn", "embedding_dim": 8,
                                  "mpn": {"variant": "authors", "num_heads": 2, "temperature": 0.6,
                                          "mpn_weight": 0.0}}})
    torch.manual_seed(0)
    objective = MPNObjective(cfg.model, num_classes=3, embedding_dim=8)
    raw = torch.randn(6, 8, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss, stats = objective(EmbeddingOutput(torch.zeros(6, 1, 1, 1), raw, F.normalize(raw, dim=1)), labels)
    expected = F.cross_entropy(objective.backbone_classifier(raw) / 0.6, labels, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is None for p in objective.mpn.parameters())
    assert set(stats) == {"loss"}


def test_random_factorisation_of_the_batch_each_epoch():
    labels = np.repeat(np.arange(40), 30)
    sampler = RankAwarePKBatchSampler(labels, 6, 9, seed=3, steps_per_epoch=3, random_factorisation=True)
    assert sampler.factorisations == [(2, 27), (3, 18), (6, 9), (9, 6), (18, 3), (27, 2)]
    seen = set()
    for epoch in range(30):
        sampler.set_epoch(epoch)
        p, k = sampler.epoch_factorisation()
        seen.add((p, k))
        for batch in sampler:
            counts = np.bincount(labels[batch])
            assert len(batch) == 54 and sorted(counts[counts > 0]) == [k] * p
    assert len(seen) >= 5  # every epoch draws afresh
    # two ranks draw the same factorisation, disjoint classes
    ranks = [RankAwarePKBatchSampler(labels, 6, 9, num_replicas=2, rank=r, seed=3, steps_per_epoch=2,
                                     random_factorisation=True) for r in (0, 1)]
    for epoch in range(5):
        for s in ranks:
            s.set_epoch(epoch)
        assert ranks[0].epoch_factorisation() == ranks[1].epoch_factorisation()
        for b0, b1 in zip(*ranks):
            assert not set(labels[b0]) & set(labels[b1])
    # too few classes for 2 x 27 on 2 ranks: only the factorisations that fit are drawn
    few = RankAwarePKBatchSampler(np.repeat(np.arange(12), 5), 6, 9, num_replicas=2, seed=0,
                                  random_factorisation=True)
    assert few.factorisations == [(2, 27), (3, 18), (6, 9)]
    fixed = RankAwarePKBatchSampler(labels, 6, 9, seed=3, steps_per_epoch=3)
    assert fixed.factorisations == [(6, 9)]


def test_the_authors_lr_schedule_drops_once():
    cfg = load_config(REPO / "jobs/configs/mpn_cub_authors.yaml")
    opt = build_optimizer(cfg.train.optimizer, nn.Linear(2, 2))
    scheduler = build_scheduler(cfg.train.scheduler, opt, cfg.train.epochs)
    lrs = []
    for _ in range(cfg.train.epochs):  # the rate each epoch trains with (0-based epochs)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    lr = cfg.train.optimizer.lr
    assert lrs[:30] == pytest.approx([lr] * 30) and lrs[30:] == pytest.approx([lr / 10] * 40)
    assert isinstance(opt, torch.optim.RAdam) and opt.param_groups[0]["decoupled_weight_decay"]


def test_uniform_aspect_erasing_and_crop_scale():
    torch.manual_seed(0)
    erase = UniformAspectErasing(1.0, scale=(0.1, 0.1), min_ratio=0.3)
    ratios = []
    for _ in range(400):
        image = torch.zeros(3, 60, 60)
        erase(image)
        mask = image[0] != 0
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        h, w = len(rows), len(cols)
        assert int(mask.sum()) == h * w and abs(h * w - 360) <= 60  # one rectangle of ~10 % of the area
        torch.testing.assert_close(image[:, mask], torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1).expand(3, h * w))
        ratios.append(h / w)
    # ratio uniform on [0.3, 3.33]: mean ~1.82 (log-uniform gives ~1.26) and as many above 1.82 as below
    assert 1.6 < np.mean(ratios) < 2.05
    transform = train_transform(32, 1.0, [("RandomResizedCrop", {"scale": (0.08, 1.0)})], erasing_aspect="uniform")
    steps = transform.transforms
    assert steps[1].scale == (0.08, 1.0) and isinstance(steps[-1], UniformAspectErasing)
    from PIL import Image
    out = transform(Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 40, 3), dtype=np.uint8)))
    erased = (out == torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)).all(0)
    assert out.shape == (3, 32, 32) and erased.sum() >= 0.02 * 32 * 32
    assert train_transform(32, 0.5).transforms[1].scale == (0.3, 1.0)


def test_authors_configs():
    configs = {p.stem: load_config(p) for p in (REPO / "jobs" / "configs").glob("mpn_*_authors.yaml")}
    assert set(configs) == {f"mpn_{d}_authors" for d in ("cub", "cars196", "sop", "inshop")}
    for name, cfg in configs.items():
        assert cfg.model.mpn.variant == "authors" and cfg.model.pooling == "gmp"
        crop = cfg.train.augmentations[0]
        assert crop.name == "RandomResizedCrop" and crop.params["scale"] == [0.08, 1.0]
        assert cfg.train.erasing_aspect == "uniform"
        assert cfg.train.scheduler.milestones == [30] and cfg.train.optimizer.decoupled_weight_decay
        assert cfg.model.mpn.concat_layers == (name == "mpn_cars196_authors")
        assert (cfg.train.batch_factorisation == "random") == (name == "mpn_cub_authors")
        assert (cfg.model.mpn.mpn_weight == 0) == (name == "mpn_sop_authors")
        if "mpn" in cfg.stages:
            assert cfg.knn.batch_size == (4 if name == "mpn_inshop_authors" else 7)
    assert "mpn" not in configs["mpn_sop_authors"].stages
    # the paper configs stay on the paper variant
    assert load_config(REPO / "jobs/configs/mpn_cub.yaml").model.mpn.variant == "paper"
