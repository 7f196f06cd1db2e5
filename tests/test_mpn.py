"""Message passing network, attention diagnostics and loss (dml_ray.models.mpn)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from dml_ray.config import ConfigError, parse_config
from dml_ray.models.embedding import EmbeddingOutput
from dml_ray.models.mpn import MessagePassingNetwork, attention_diagnostics, mpn_loss, refine_over_batches
from dml_ray.objectives import MPNObjective, load_mpn


def _model(**kwargs) -> MessagePassingNetwork:
    torch.manual_seed(0)
    return MessagePassingNetwork(5, **{"num_layers": 2, "num_heads": 4, "dim": 16, **kwargs}).eval()


def test_shapes_and_attention_rows_sum_to_one() -> None:
    out = _model()(torch.randn(9, 16))
    assert out.features.shape == (9, 16)
    assert out.logits.shape == (9, 5)
    assert out.attention.shape == (2, 4, 9, 9)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(2, 4, 9))
    assert (out.attention >= 0).all()


def test_permuting_the_batch_permutes_every_output() -> None:
    model = _model(num_layers=3, num_heads=2)
    x = torch.randn(12, 16)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    out, out_perm = model(x), model(x[perm])
    torch.testing.assert_close(out_perm.features, out.features[perm])
    torch.testing.assert_close(out_perm.logits, out.logits[perm])
    torch.testing.assert_close(out_perm.attention, out.attention[:, :, perm][:, :, :, perm])


def test_nodes_exchange_messages() -> None:
    """Changing one node changes the others' outputs (complete graph), and a batch of one works."""
    model = _model()
    x = torch.randn(6, 16)
    y = x.clone()
    y[0] += 1.0
    assert not torch.allclose(model(x).features[1:], model(y).features[1:])
    single = model(x[:1])
    torch.testing.assert_close(single.attention, torch.ones(2, 4, 1, 1))


def test_layer_follows_the_equations() -> None:
    """One layer, recomputed by hand from its weights (Sec. 3.1 equations, scale 1/sqrt(d))."""
    model = _model(num_layers=1, num_heads=2, dim=8)
    layer = model.layers[0]
    x = F.normalize(torch.randn(5, 8), dim=1)
    out = model(x)
    h = x * math.sqrt(8)  # the paper variant's input map
    heads = []
    for m in range(2):
        rows = slice(4 * m, 4 * m + 4)
        q, k, v = (h @ lin.weight[rows].T for lin in (layer.query, layer.key, layer.value))
        alpha = torch.softmax(q @ k.T / math.sqrt(8), dim=1)
        torch.testing.assert_close(out.attention[0, m], alpha)
        heads.append(alpha @ v)
    f = F.layer_norm(torch.cat(heads, 1) + h, (8,), layer.norm1.weight, layer.norm1.bias)
    g = F.layer_norm(layer.ff(f) + f, (8,), layer.norm2.weight, layer.norm2.bias)
    torch.testing.assert_close(out.features, g)
    torch.testing.assert_close(out.logits, model.classifier(g))


def test_diagnostics_on_hand_made_attention() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    uniform = torch.full((1, 1, 4, 4), 0.25)
    one_hot_same_class = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.float)
    attention = torch.stack([uniform[0, 0], one_hot_same_class])[None]  # L=1, M=2
    diag = attention_diagnostics(attention, labels)
    torch.testing.assert_close(diag["kl_from_uniform"], torch.tensor([[0.0, math.log(4)]]))
    torch.testing.assert_close(diag["same_class_mass"], torch.tensor([[0.5, 1.0]]))
    torch.testing.assert_close(diag["same_class_mass_uniform"], torch.tensor(0.5))


def test_loss_hand_checked() -> None:
    # Two classes, one sample of class 0, logits (2, 0) and (0, 0), tau = 0.5, eps = 0.1:
    # targets (0.95, 0.05); scaled logits (4, 0): CE = 0.95 * log(1 + e^-4) + 0.05 * (4 + log(1 + e^-4)).
    labels = torch.tensor([0])
    mpn_logits = torch.tensor([[2.0, 0.0]])
    backbone_logits = torch.tensor([[0.0, 0.0]])
    lse = math.log(1 + math.exp(-4))
    main = 0.95 * lse + 0.05 * (4 + lse)
    aux = math.log(2)  # uniform logits: CE = log C whatever the smoothing
    loss = mpn_loss(mpn_logits, backbone_logits, labels, temperature=0.5, aux_weight=0.3)
    assert loss.item() == pytest.approx(main + 0.3 * aux, rel=1e-6)
    plain = mpn_loss(mpn_logits, backbone_logits, labels, temperature=1.0, label_smoothing=0.0, aux_weight=0.0)
    assert plain.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)


def test_loss_trains_the_mpn() -> None:
    torch.manual_seed(0)
    model = MessagePassingNetwork(3, num_layers=1, num_heads=2, dim=8, dropout=0.0)
    x, labels = torch.randn(12, 8), torch.arange(12) % 3
    backbone = torch.nn.Linear(8, 3)
    opt = torch.optim.Adam([*model.parameters(), *backbone.parameters()], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = mpn_loss(model(x).logits, backbone(x), labels, temperature=0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="divisible"):
        MessagePassingNetwork(3, num_layers=1, num_heads=3, dim=8)
    with pytest.raises(ValueError, match="temperature"):
        mpn_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), temperature=0.0)
    with pytest.raises(ValueError, match=r"\(L, M, B, B\)"):
        attention_diagnostics(torch.ones(2, 3, 3), torch.tensor([0, 1, 2]))


def test_many_graphs_at_once_equal_one_at_a_time() -> None:
    model = _model()
    graphs = torch.randn(5, 7, 16)
    out = model(graphs)
    assert out.features.shape == (5, 7, 16) and out.attention.shape == (5, 2, 4, 7, 7)
    for g in range(5):
        one = model(graphs[g])
        torch.testing.assert_close(out.features[g], one.features)
        torch.testing.assert_close(out.logits[g], one.logits)
        torch.testing.assert_close(out.attention[g], one.attention)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_refinement_takes_each_rows_feature_from_its_own_batch(layers: int) -> None:
    model = _model(num_layers=layers)
    features = torch.randn(20, 16)
    gen = torch.Generator().manual_seed(3)
    rows = torch.arange(20)
    batches = torch.stack([torch.cat([torch.tensor([r]), torch.randperm(20, generator=gen)[:5]]) for r in rows])
    batches[3] = batches[3].roll(2)  # the row need not come first
    refined = refine_over_batches(model, features, batches, rows, chunk=6)
    for r in range(20):
        position = int((batches[r] == r).nonzero()[0])
        torch.testing.assert_close(refined[r], model(features[batches[r]]).features[position])
    with pytest.raises(ValueError, match="missing from its own batch"):
        refine_over_batches(model, features, batches[:, 1:], rows)


def test_mpn_objective_is_the_paper_loss_and_reports_every_head() -> None:
    cfg = parse_config({"model": {"kind": "mpn", "embedding_dim": 16, "mpn": {"num_layers": 2, "num_heads": 4,
                                                                                "temperature": 0.3}}})
    torch.manual_seed(0)
    objective = MPNObjective(cfg.model, num_classes=3, embedding_dim=16).eval()
    raw = torch.randn(6, 16)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    output = EmbeddingOutput(torch.zeros(6, 1, 1, 1), raw, F.normalize(raw, dim=1))
    loss, stats = objective(output, labels)
    refined = objective.mpn(output.embedding)
    expected = mpn_loss(refined.logits, objective.backbone_classifier(raw), labels, 0.3, 0.1)
    torch.testing.assert_close(loss, expected)
    assert stats["loss"] == pytest.approx(float(expected))
    heads = {f"mpn_same_class_mass_l{layer}_h{head}" for layer in range(2) for head in range(4)}
    assert heads <= set(stats) and len([k for k in stats if k.startswith("mpn_attention_kl_")]) == 8
    assert stats["mpn_same_class_mass_uniform"] == pytest.approx(2 / 6)
    # the paper variant's node features are the unit embeddings at norm sqrt(d)
    assert torch.linalg.vector_norm(objective.mpn.embed_input(output.embedding), dim=1).allclose(torch.full((6,), 4.0))


def test_loading_an_mpn_from_a_checkpoint_without_one_is_a_clear_error() -> None:
    cfg = parse_config({"model": {"embedding_dim": 16}})
    with pytest.raises(ValueError, match="has no message passing network"):
        load_mpn(cfg.model, 3, 16, {})


def test_heads_must_divide_the_embedding_dimension() -> None:
    with pytest.raises(ConfigError, match="not divisible by mpn.num_heads"):
        parse_config({"model": {"kind": "mpn", "embedding_dim": 10, "mpn": {"num_heads": 4}}})
