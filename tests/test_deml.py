"""DeML (deml-zero-shot-retrieval): object attention, adversary and losses, the model, its training and its config."""
from __future__ import annotations

import math

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from dml_ray.config import ConfigError, LossConfig, ModelConfig, OptimizerConfig, TrainConfig, parse_config
from dml_ray.data.batches import decode_batch, fetch_bytes
from dml_ray.data.readers import read_images
from dml_ray.data.samplers import RankAwarePKBatchSampler
from dml_ray.data.synthetic import generate_synthetic
from dml_ray.explain.oam import object_attention_rows
from dml_ray.io.schemas import ACTIVATION_MAPS_SCHEMA
from dml_ray.losses.deml import activation_decay, grad_reverse, learner_discrepancy, learner_norm_penalty
from dml_ray.metrics.learners import learner_blocks, learner_similarity, scale_embeddings
from dml_ray.metrics.retrieval import evaluate_retrieval
from dml_ray.models.checkpoint import checkpoint_bytes, load_checkpoint, save_checkpoint
from dml_ray.models.deml import DeMLModel
from dml_ray.models.embedding import build_model
from dml_ray.models.inference import Embedder
from dml_ray.models.object_attention import (
    attention_boxes,
    attention_proposal,
    crop_and_zoom,
    layer_proposal,
    random_walk,
    transition_matrix,
)
from dml_ray.objectives import DeMLObjective, build_objective
from dml_ray.training import build_optimizer, train_epoch


def _deml_config(scales: int = 1, branches: int = 1, dim: int = 64, **deml) -> ModelConfig:
    return ModelConfig(kind="deml", backbone="googlenet", embedding_dim=dim,
                       deml={"scales": scales, "branches": branches, **deml})


# --- object attention (Sec. 3.1, Eq. 2-3) ---------------------------------------------------------------------


def test_random_walk_converges_to_the_stationary_distribution() -> None:
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(3, 20, 8, generator=gen, dtype=torch.float64)
    transition = transition_matrix(features)
    torch.testing.assert_close(transition.sum(dim=2), torch.ones(3, 20, dtype=torch.float64))
    assert (torch.diagonal(transition, dim1=1, dim2=2) == 0).all()
    # the stationary distribution: the left eigenvector of eigenvalue 1 ...
    values, vectors = torch.linalg.eig(transition.transpose(1, 2))
    top = values.real.argmax(dim=1)
    stationary = torch.stack([vectors[b, :, top[b]].real for b in range(3)])
    stationary = stationary / stationary.sum(dim=1, keepdim=True)
    # ... which for symmetric edge weights is the weighted degree: sum_b ||u_a - u_b|| / total
    degree = torch.cdist(features, features).sum(dim=2)
    torch.testing.assert_close(stationary, degree / degree.sum(dim=1, keepdim=True))
    torch.testing.assert_close(random_walk(transition, steps=200), stationary)
    # T = 10 (the paper's) is already close to the stable state; one step is not
    after_10 = random_walk(transition, steps=10)
    assert (after_10 - stationary).abs().max() < 1e-3 * stationary.max()
    torch.testing.assert_close(after_10.sum(dim=1), torch.ones(3, dtype=torch.float64))


def test_random_walk_finds_the_odd_region_and_is_uniform_on_a_flat_map() -> None:
    flat = torch.ones(1, 4, 5, 5)
    torch.testing.assert_close(layer_proposal(flat), torch.ones(1, 5, 5))  # scaled: uniform == 1
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, 4, 6, 6, generator=gen)
    noisy[0, :, 1:3, 3:5] += 3.0  # a 2 x 2 "object" unlike its surroundings
    proposal = layer_proposal(noisy)[0]
    assert proposal.sum().item() == pytest.approx(36.0, rel=1e-5)
    top4 = {(int(i) // 6, int(i) % 6) for i in proposal.flatten().topk(4).indices}
    assert top4 == {(1, 3), (1, 4), (2, 3), (2, 4)}
    both = attention_proposal([noisy, noisy[:, :, ::2, ::2]], (12, 12))
    assert both.shape == (1, 12, 12)
    assert both[0, 2:6, 6:10].mean() > 1.2 * both[0, 6:, :4].mean()


def test_crop_boxes_stay_inside_the_image() -> None:
    gen = torch.Generator().manual_seed(0)
    h, w = 30, 40
    maps = [torch.rand(8, h, w, generator=gen), torch.zeros(2, h, w), torch.full((1, h, w), 3.0)]
    corner = torch.zeros(4, h, w)
    corner[0, 0, 0] = corner[1, -1, -1] = corner[2, 0, -1] = corner[3, -1, 0] = 1.0
    maps.append(corner)
    for threshold in (0.0, 0.3, 0.9, 1.0):
        for min_fraction in (0.1, 0.25, 1.0):
            boxes = attention_boxes(torch.cat(maps), threshold, min_fraction)
            x0, y0, x1, y1 = boxes.unbind(dim=1)
            assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= w).all() and (y1 <= h).all()
            assert (x1 - x0 >= min_fraction * w - 1e-4).all() and (y1 - y0 >= min_fraction * h - 1e-4).all()
    # a flat map keeps the whole image; a single hot pixel in a corner gives the minimum box in that corner
    torch.testing.assert_close(attention_boxes(maps[1], 0.5, 0.25), torch.tensor([[0.0, 0.0, w, h]] * 2))
    torch.testing.assert_close(attention_boxes(corner[1:2], 0.5, 0.25), torch.tensor([[w - 10.0, h - 7.5, w, h]]))
    with pytest.raises(ValueError, match="min_fraction"):
        attention_boxes(maps[0], 0.5, 0.0)


def test_crop_and_zoom_magnifies_the_box() -> None:
    image = torch.zeros(1, 3, 32, 32)
    image[:, :, :, 16:] = 1.0  # right half white
    left = crop_and_zoom(image, torch.tensor([[0.0, 0.0, 8.0, 32.0]]), (32, 32))
    right = crop_and_zoom(image, torch.tensor([[20.0, 4.0, 32.0, 28.0]]), (32, 32))
    assert left.shape == right.shape == (1, 3, 32, 32)
    assert left.abs().max() == 0 and torch.allclose(right, torch.ones_like(right))


# --- adversary and losses (Eq. 4-6) ----------------------------------------------------------------------------


def test_gradient_reversal_flips_sign_and_scales() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    weights = torch.randn(4, 3)
    y = grad_reverse(x, 0.5)
    torch.testing.assert_close(y, x)
    (y * weights).sum().backward()
    torch.testing.assert_close(x.grad, -0.5 * weights)


def test_deml_losses_match_hand_computation() -> None:
    # learner 1: angles 0, 60 (class 0), 90, 180 (class 1) -- tests/test_losses.py's hand computation
    # learner 2: 0, 0, 180, 180: positives cos 1, negatives cos -1
    def at(degrees):
        return [[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees]
    first = (math.log(2) + math.log(1 + math.e)) / 2 + (
        math.log1p(math.exp(-35)) + math.log1p(math.exp(-105)) + math.log1p(math.exp(70 * (math.sqrt(3) / 2 - 0.5)))
        + math.log1p(math.exp(-70))) / 4
    second = math.log1p(math.exp(-1)) + math.log1p(math.exp(-105))
    learners = torch.tensor([at([0, 60, 90, 180]), at([0, 0, 180, 180])], dtype=torch.float64).transpose(0, 1)
    learners = learners * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)[:, None, None]  # norms 1..4
    weights = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], [[0.0, 0.0, 0.5], [1.0, 1.0, 1.0]]])
    cfg = _deml_config(1, 2, dim=4, adversary=False).deml
    loss = build_objective(_deml_config(1, 2, dim=4), TrainConfig(loss=LossConfig(name="binomial_deviance")), 2,
                           4).loss
    objective = DeMLObjective(cfg, loss, 2)

    class Output:
        pass
    output = Output()
    output.learners, output.learner_weights = learners, weights
    total, stats = objective(output, torch.tensor([0, 0, 1, 1]))
    # Eq. 6: lambda_1 / (2 I J N) sum |CA|^2 = 0.014 / 16 * 2 * (1 + 4 + 9 + 16); rows of norm^2 1, 4, 0.25, 3
    decay = 2 * 30 / 16
    penalty = 0 + 9 + 0.5625 + 4
    assert activation_decay(learners).item() == pytest.approx(decay)
    assert learner_norm_penalty(weights).item() == pytest.approx(penalty)
    assert stats["metric_loss"] == pytest.approx((first + second) / 2, rel=1e-6)
    assert total.item() == pytest.approx((first + second) / 2 + 0.014 * decay + 0.25 * penalty, rel=1e-6)
    # Eq. 4 over the unordered pairs of 3 learners, mean over the batch
    projected = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]]).repeat(2, 1, 1)
    assert learner_discrepancy(projected).item() == pytest.approx(1 + 4 + 5)
    assert learner_discrepancy(projected[:, :1]).item() == 0.0


def test_adversary_minimises_while_the_learners_maximise() -> None:
    torch.manual_seed(0)
    cfg = _deml_config(1, 3, dim=12)
    objective = build_objective(cfg, TrainConfig(loss=LossConfig(name="binomial_deviance")), 2, 12)
    learners = torch.randn(6, 3, 4, requires_grad=True)

    class Output:
        pass
    output = Output()
    output.learners, output.learner_weights = learners, torch.zeros(3, 4, 5)
    _, stats = objective(output, torch.tensor([0, 0, 0, 1, 1, 1]))
    adversary = objective.adversaries[0].weight
    # recompute L_adv alone and compare both sides' gradients with the plain (unreversed) gradient
    plain = learner_discrepancy(torch.nn.functional.normalize(
        torch.nn.functional.normalize(learners, dim=2) @ adversary.T, dim=2))
    assert stats["adversary_loss"] == pytest.approx(plain.item(), rel=1e-5)
    grad_learners, grad_adversary = torch.autograd.grad(plain, [learners, adversary])
    learners.grad = None
    adv_only = objective.adversaries[0]
    reversed_ = learner_discrepancy(torch.nn.functional.normalize(
        adv_only(grad_reverse(torch.nn.functional.normalize(learners, dim=2))), dim=2))
    rev_learners, rev_adversary = torch.autograd.grad(reversed_, [learners, adversary])
    torch.testing.assert_close(rev_adversary, grad_adversary)
    torch.testing.assert_close(rev_learners, -grad_learners)


# --- the model ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scales,branches,channel_attention", [(1, 1, False), (1, 3, True), (2, 2, True),
                                                               (3, 1, True)])
def test_output_shapes(scales: int, branches: int, channel_attention: bool) -> None:
    torch.manual_seed(0)
    cfg = _deml_config(scales, branches, dim=64, channel_attention=channel_attention)
    model = build_model(cfg, 64).eval()
    learners = scales * branches
    dim = 64 // learners
    assert isinstance(model, DeMLModel) and model.embedding_dim == dim * learners
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert out.learners.shape == (3, learners, dim)
    assert out.raw.shape == out.embedding.shape == (3, dim * learners)
    assert out.learner_weights.shape == (learners, dim, 1024)
    assert out.feature_map.shape == (3, 1024, 2, 2)
    torch.testing.assert_close(out.embedding, torch.nn.functional.normalize(out.raw, dim=1))
    blocks = learner_blocks(out.embedding.numpy(), scales, branches).reshape(3, learners, dim)
    np.testing.assert_allclose(blocks * math.sqrt(learners),
                               torch.nn.functional.normalize(out.learners, dim=2).numpy(), atol=1e-6)
    assert out.boxes.shape == (3, scales - 1, 4)
    if scales > 1:
        assert (out.boxes[..., :2] >= 0).all() and (out.boxes[..., 2:] <= 64).all()
    assert model.object_attention(x).shape == (3, 4, 4)
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("cams.") for n in names) == channel_attention
    assert sum(n.startswith(f"backbone.{scales - 1}.gnet.") for n in names) > 0
    assert not any(n.startswith(f"backbone.{scales}.") for n in names)


def test_optimizer_gives_only_the_learners_the_head_rate() -> None:
    # Sec. 4: "10 times learning rate for the learners"; the CAMs and the adversaries learn at the base rate
    cfg = _deml_config(2, 2)
    model = build_model(cfg, 64)
    train_cfg = TrainConfig(loss=LossConfig(name="binomial_deviance"))
    objective = build_objective(cfg, train_cfg, 4, model.embedding_dim)
    assert len(objective.adversaries) == 2
    optimizer = build_optimizer(OptimizerConfig(lr=1e-5, head_lr_multiplier=10), model, objective)
    base, head = optimizer.param_groups
    assert base["lr"] == 1e-5 and head["lr"] == pytest.approx(1e-4)
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(head["params"]) == ids(model.learners.parameters())
    assert ids(model.cams.parameters()) <= ids(base["params"])
    assert ids(objective.adversaries.parameters()) <= ids(base["params"])
    assert ids(base["params"]) | ids(head["params"]) == ids(model.parameters()) | ids(objective.parameters())
    assert not ids(base["params"]) & ids(head["params"])


def test_checkpoint_round_trip_and_embedder(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = _deml_config(2, 2)
    model = build_model(cfg, 64).eval()
    uri = str(tmp_path / "model.pt")
    save_checkpoint(uri, checkpoint_bytes(model, cfg, 64, ["a", "b"], extra={"resize": 64}))
    loaded = load_checkpoint(uri)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x).embedding, model(x).embedding)
    embedder = Embedder(uri, "r")
    batch = {"image_id": np.array(["p", "q"], dtype=object), "uri": np.array(["u", "v"], dtype=object),
             "label": np.array([0, 1]), "split": np.array(["test"] * 2, dtype=object),
             "error": np.array([None, "read: boom"], dtype=object), "image": x.numpy()}
    rows = embedder(batch)
    emb = np.stack(rows.column("embedding").to_pylist()[:1])
    np.testing.assert_allclose(emb, model(x[:1]).embedding.detach().numpy(), atol=1e-5)
    assert rows.column("embedding")[1].as_py() is None
    maps = object_attention_rows(model.object_attention(x).detach(), ["p", "q"], "r")
    assert maps.schema.equals(ACTIVATION_MAPS_SCHEMA)
    assert maps.column("method").to_pylist() == ["oam", "oam"] and maps.column("reference_id").to_pylist() == ["p", "q"]
    assert len(maps.column("map")[0].as_py()) == 16


def test_explain_cli_takes_a_deml_checkpoint(tmp_path, capsys) -> None:
    from PIL import Image

    from dml_ray.cli import main

    torch.manual_seed(0)
    cfg = _deml_config(1, 3, dim=63)
    model = build_model(cfg, 64).eval()
    uri = str(tmp_path / "model.pt")
    save_checkpoint(uri, checkpoint_bytes(model, cfg, 64, ["a", "b"], extra={"resize": 64}))
    rng = np.random.default_rng(0)
    paths = []
    for name in ("q.png", "r.png"):
        Image.fromarray(rng.integers(0, 255, (80, 70, 3), dtype=np.uint8)).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    fig, arrays = tmp_path / "fig.png", tmp_path / "arrays.npz"
    assert main(["explain", "--checkpoint", uri, "--query", paths[0], "--reference", paths[1], "--out", str(fig),
                 "--save-arrays", str(arrays)]) == 0
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = np.load(arrays)
    # the OAM map is the model's own proposal, and the mean of the three CAM branches' proposals
    from dml_ray.data.transforms import decode_image, eval_transform
    x = torch.stack([eval_transform(64, 64)(decode_image(open(p, "rb").read())) for p in paths])
    with torch.no_grad():
        oam = model.object_attention(x).numpy()
        out = model(x)
    for b, side in enumerate(("query", "reference")):
        np.testing.assert_allclose(saved[f"oam_{side}"], oam[b], rtol=1e-4, atol=1e-6)
        branches = np.stack([saved[f"cam{j}_{side}"] for j in (1, 2, 3)])
        np.testing.assert_allclose(branches.mean(0), oam[b], rtol=1e-4, atol=1e-6)
        assert saved[f"cam_weights_{side}"].shape == (3, 480)
        assert ((saved[f"cam_weights_{side}"] > 0) & (saved[f"cam_weights_{side}"] < 1)).all()
    assert not np.allclose(saved["cam1_query"], saved["cam2_query"])  # the branches differ
    assert abs(float(saved["cosine"]) - float(out.embedding[0] @ out.embedding[1])) < 1e-5
    np.testing.assert_allclose(saved["cosine"], saved["learner_cosine"].mean(), rtol=1e-5)
    assert f"{float(saved['cosine']):.4f}" in capsys.readouterr().out
    assert main(["explain", "--checkpoint", uri, "--query", paths[0], "--reference", paths[1], "--out", str(fig),
                 "--methods", "decomposition"]) == 2
    assert "--methods oam" in capsys.readouterr().err


def test_learner_metrics_from_stored_embeddings() -> None:
    # two scales of two 2-d learners: scale 1 learners identical (cos 1), scale 2 opposite (cos -1)
    unit = np.array([[1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, -1.0]], dtype=np.float32) / 2
    sim = learner_similarity(torch.from_numpy(learner_blocks(unit, 2, 2)))
    assert sim.item() == pytest.approx(0.0)  # mean of +1 and -1
    scales = scale_embeddings(unit, 2, 2)
    np.testing.assert_allclose(scales[1], [[0.0, 1 / math.sqrt(2), 0.0, -1 / math.sqrt(2)]], atol=1e-6)
    with pytest.raises(ValueError, match="multiple"):
        learner_blocks(unit[:, :7], 2, 2)


# --- config ---------------------------------------------------------------------------------------------------


def test_config_rejects_what_deml_does_not_support() -> None:
    base = {"model": {"kind": "deml", "backbone": "googlenet", "deml": {"scales": 2, "branches": 2}},
            "train": {"loss": {"name": "binomial_deviance"}}}
    assert parse_config(base).model.deml.branches == 2
    cases = [
        ({"embed": {"feature_maps": True}}, "embed.feature_maps"),
        ({"stages": ["data", "explain"], "explain": {"methods": ["decomposition"]}}, "explain.methods"),
        ({"train": {"loss": {"name": "multi_similarity"}}}, "binomial_deviance"),
        ({"model": {**base["model"], "backbone": "resnet50"}}, "googlenet"),
        ({"model": {**base["model"], "deml": {"branches": 2, "channel_attention": False}}}, "branches must be 1"),
        ({"model": {**base["model"], "deml": {"scales": 2, "walks": 3}}}, "unknown key"),
    ]
    for override, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            parse_config({**base, **override})
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="oam"):
        parse_config({"explain": {"methods": ["oam"]}})


# --- learning -------------------------------------------------------------------------------------------------

STEPS = 40


@pytest.fixture(scope="module")
def synthetic_split(tmp_path_factory):
    torch.set_num_threads(1)
    root = str(tmp_path_factory.mktemp("synthetic"))
    generate_synthetic(root, 16, 12, 72, 0)
    images = read_images("cub", root)

    def load(split):
        table = images.filter(pc.equal(images.column("split"), split))
        batch = decode_batch(fetch_bytes(table), 64, 64)
        return torch.from_numpy(batch["image"].copy()), torch.from_numpy(batch["label"].copy()), batch["image_id"]
    return load("train"), load("test")


def _evaluate(model: DeMLModel, test) -> tuple[float, float]:
    x, y, ids = test
    model.eval()
    with torch.no_grad():
        out = model(x)
    emb = out.embedding.numpy()
    rows = evaluate_retrieval(emb, y.numpy(), ids, emb, y.numpy(), ids, [1], with_map_at_r=False, with_nmi=False)
    sim = learner_similarity(out.learners.view(len(x), model.scales, model.branches, -1)).mean().item()
    return rows[0]["value"], sim


@pytest.fixture(scope="module")
def trained(synthetic_split):
    """DeML(I=1, J=4) from the same random init, trained 40 P x K steps with and without the adversary."""
    (x, y, _), test = synthetic_split
    results = {}
    for adversary in (True, False):
        torch.manual_seed(0)
        cfg = _deml_config(1, 4, dim=64, adversary=adversary)
        model = build_model(cfg, 64)
        train_cfg = TrainConfig(loss=LossConfig(name="binomial_deviance"),
                                optimizer=OptimizerConfig(lr=1e-3, head_lr_multiplier=10))
        objective = build_objective(cfg, train_cfg, int(y.max()) + 1, model.embedding_dim)
        optimizer = build_optimizer(train_cfg.optimizer, model, objective)
        initial = _evaluate(model, test)
        sampler = RankAwarePKBatchSampler(y.tolist(), 6, 4, seed=0, steps_per_epoch=STEPS)
        stats = train_epoch(model, objective, optimizer, ((x[b], y[b]) for b in sampler), torch.device("cpu"))
        results[adversary] = {"initial": initial, "final": _evaluate(model, test), "stats": stats}
    return results


def test_training_beats_random_initialisation(trained) -> None:
    run = trained[True]
    (initial_r1, _), (final_r1, _) = run["initial"], run["final"]
    assert run["stats"]["steps"] == STEPS
    assert final_r1 > initial_r1 + 0.15, (initial_r1, final_r1)


def test_adversary_lowers_the_similarity_between_learners(trained) -> None:
    with_adv, without = trained[True], trained[False]
    assert with_adv["initial"] == without["initial"]  # same init: the adversary is the only difference
    assert "adversary_loss" in with_adv["stats"] and "adversary_loss" not in without["stats"]
    sim_adv, sim_plain = with_adv["final"][1], without["final"][1]
    assert sim_adv < sim_plain - 0.1, (sim_adv, sim_plain)


# --- the pipeline ---------------------------------------------------------------------------------------------


def test_ablation_configs_cover_tables_1_2_and_4() -> None:
    from pathlib import Path

    from dml_ray.config import load_config

    configs = {p.stem: load_config(p) for p in Path(__file__).parents[1].glob("jobs/configs/deml_*.yaml")}
    grid = {(c.model.deml.scales, c.model.deml.branches, c.model.deml.channel_attention, c.model.deml.adversary,
             c.model.embedding_dim, c.model.deml.activation_decay > 0) for c in configs.values()}
    table_1 = {(1, 1, False, True, d, act) for d in (64, 192, 384, 512) for act in (True, False)}
    table_2 = {(i, j, True, True, 512, True) for i, j in [(1, 1), (1, 4), (1, 8), (2, 1), (2, 4), (3, 1), (3, 3)]}
    table_4 = {(1, 8, True, False, 512, True), (1, 1, False, True, 64, True)}
    assert table_1 | table_2 | table_4 == grid
    assert len(configs) == len(grid)
    for cfg in configs.values():
        assert cfg.model.kind == "deml" and "evaluate" in cfg.stages and cfg.explain.methods == ["oam"]
        # "without L_act" drops Eq. 6 whole: the activation decay and its L_ntri term
        assert (cfg.model.deml.activation_decay > 0) == (cfg.model.deml.norm_penalty > 0)
        assert cfg.train.optimizer.head_lr_multiplier == 10


def test_pipeline_end_to_end(ray_session, tmp_path) -> None:
    """DeML(I=2, J=4)'s ablation config, test-sized: Ray Train, Ray Data embedding, sim, OAM maps, localization."""
    from pathlib import Path

    from dml_ray.config import load_config
    from dml_ray.io.tables import read_table, table_uri
    from pipelines.run import run_pipeline
    from pipelines.train import model_uri

    config = Path(__file__).parents[1] / "jobs/configs/deml_i2_j4.yaml"
    cfg = load_config(config, {
        "output_root": str(tmp_path), "run_id": "t", "num_threads": 1,
        "stages": ["data", "train", "embed", "evaluate", "explain", "localize", "report"],
        "data": {"kind": "synthetic", "synthetic": {"n_classes": 8, "images_per_class": 6, "image_size": 72},
                 "resize": 64, "image_size": 64},
        "model.weights": "none", "model.embedding_dim": 64,
        "train": {"epochs": 2, "steps_per_epoch": 2, "classes_per_batch": 4, "samples_per_class": 2,
                  "num_workers": 1, "loss": {"name": "binomial_deviance"},
                  "optimizer": {"name": "adam", "lr": 1e-4, "head_lr_multiplier": 10}},
        "embed": {"batch_size": 24}, "explain": {"methods": ["oam"], "batch_size": 24},
        "evaluate.ks": [1, 2], "evaluate.query_shards": 1,
        "localize": {"shards": 1, "threshold_interval": 0.1},
    })
    summary = run_pipeline(cfg)
    assert summary.ran == cfg.stages
    assert isinstance(load_checkpoint(model_uri(str(tmp_path), "t")).model, DeMLModel)
    metrics = read_table(table_uri(str(tmp_path), "t", "metrics")).to_pylist()
    names = {(r["stage"], r["metric"], r["k"]) for r in metrics}
    assert {("evaluate", "recall", 1), ("evaluate", "learner_similarity", None), ("evaluate", "recall_scale1", 1),
            ("evaluate", "recall_scale2", 2), ("train", "adversary_loss", 1),
            ("train", "learner_similarity", 0)} <= names
    sim = next(r["value"] for r in metrics if r["metric"] == "learner_similarity")
    assert -1.0 <= sim <= 1.0
    embeddings = read_table(table_uri(str(tmp_path), "t", "embeddings"))
    test_ids = set(pc.filter(embeddings.column("image_id"), pc.equal(embeddings.column("split"), "test")).to_pylist())
    maps = read_table(table_uri(str(tmp_path), "t", "activation_maps"))
    assert set(maps.column("method").to_pylist()) == {"oam"} and set(maps.column("image_id").to_pylist()) == test_ids
    assert maps.column("map_h")[0].as_py() == 4
    assert any(r["metric"] == "loc_best_acc/self/oam" for r in metrics)
    with open(summary.report) as f:
        html = f.read()
    assert "id='best-localized'" in html and "oam, self reference" in html
