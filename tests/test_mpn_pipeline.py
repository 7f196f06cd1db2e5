"""The MPN demo end to end on a local Ray instance: MPN training, reciprocal batches, refinement, Table 3 rows."""
from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from dml_ray.data.batches import decode_batch, fetch_bytes
from dml_ray.io.tables import read_table, table_uri
from dml_ray.metrics.retrieval import evaluate_retrieval
from dml_ray.models.checkpoint import load_checkpoint
from dml_ray.models.embedding import build_model
from dml_ray.objectives import load_mpn
from dml_ray.retrieval.prototypes import fixed_list_to_numpy
from pipelines.run import run_pipeline
from pipelines.train import model_uri
from tests.conftest import demo_like_config


@pytest.fixture(scope="module")
def mpn_run(ray_session, tmp_path_factory):
    cfg = demo_like_config(str(tmp_path_factory.mktemp("mpn")), demo="demo_mpn",
                           stages=["data", "train", "embed", "evaluate", "knn", "mpn", "report"])
    return cfg, run_pipeline(cfg)


def _metrics(cfg, part: str) -> list[dict]:
    return read_table(table_uri(cfg.output_root, "t", "metrics", part)).to_pylist()


def _recall_at_1(rows: list[dict], split: str = "test") -> float:
    return next(r["value"] for r in rows if r["split"] == split and r["metric"] == "recall" and r["k"] == 1)


def test_mpn_training_beats_random_initialisation(mpn_run):
    cfg, summary = mpn_run
    assert summary.ran == ["data", "train", "embed", "evaluate", "knn", "mpn", "report"]
    images = read_table(table_uri(cfg.output_root, "t", "images"))
    test = images.filter(pc.equal(images.column("split"), "test"))
    batch = decode_batch(fetch_bytes(test), cfg.data.resize, cfg.data.image_size)
    torch.manual_seed(cfg.train.seed)
    with torch.no_grad():
        random_emb = build_model(cfg.model, cfg.data.image_size).eval()(torch.from_numpy(batch["image"])).embedding
    rows = evaluate_retrieval(random_emb.numpy(), batch["label"], batch["image_id"], random_emb.numpy(),
                              batch["label"], batch["image_id"], [1], with_map_at_r=False, with_nmi=False)
    random_r1 = rows[0]["value"]
    backbone_r1, mpn_r1 = _recall_at_1(_metrics(cfg, "evaluate")), _recall_at_1(_metrics(cfg, "mpn"))
    assert backbone_r1 > random_r1 + 0.3, (backbone_r1, random_r1)
    assert mpn_r1 > random_r1 + 0.3, (mpn_r1, random_r1)


def test_same_class_attention_mass_rises_during_training(mpn_run):
    cfg, _ = mpn_run
    train = _metrics(cfg, "train")
    last = cfg.train.epochs - 1

    def heads(prefix: str, epoch: int) -> np.ndarray:
        return np.array([r["value"] for r in train if r["metric"].startswith(prefix) and r["k"] == epoch])

    first_mass, last_mass = heads("mpn_same_class_mass_l", 0), heads("mpn_same_class_mass_l", last)
    assert len(first_mass) == cfg.model.mpn.num_layers * cfg.model.mpn.num_heads
    uniform = next(r["value"] for r in train if r["metric"] == "mpn_same_class_mass_uniform")
    assert abs(first_mass.mean() - uniform) < 0.02  # attention starts near uniform ...
    assert last_mass.mean() > first_mass.mean() + 0.02, (first_mass, last_mass)  # ... and turns to the class
    assert last_mass.max() > uniform + 0.05, (uniform, last_mass)
    assert heads("mpn_attention_kl_l", last).mean() > heads("mpn_attention_kl_l", 0).mean()


def test_every_image_is_refined_within_its_own_reciprocal_batch(mpn_run):
    cfg, _ = mpn_run
    embeddings = read_table(table_uri(cfg.output_root, "t", "embeddings"))
    refined = read_table(table_uri(cfg.output_root, "t", "mpn_embeddings"))
    neighbors = read_table(table_uri(cfg.output_root, "t", "neighbors"))
    key = lambda t: sorted(zip(t.column("image_id").to_pylist(), t.column("split").to_pylist()))  # noqa: E731
    assert key(refined) == key(embeddings.filter(pc.is_in(embeddings.column("split"), refined.column("split"))))
    assert refined.column("model_id")[0].as_py().endswith("+mpn")
    loaded = load_checkpoint(model_uri(cfg.output_root, "t"))
    mpn = load_mpn(loaded.model_config, len(loaded.class_names), loaded.model.embedding_dim, loaded.objective_state)
    test = embeddings.filter(pc.equal(embeddings.column("split"), "test"))
    index = {i: n for n, i in enumerate(test.column("image_id").to_pylist())}
    x = torch.from_numpy(fixed_list_to_numpy(test.column("embedding")))
    stored = {r["image_id"]: r["embedding"] for r in refined.filter(pc.equal(refined.column("split"), "test")).to_pylist()}
    for row in neighbors.filter(pc.equal(neighbors.column("split"), "test")).slice(0, 5).to_pylist():
        batch = [index[i] for i in row["batch_ids"]]
        assert len(batch) == cfg.knn.batch_size and batch[0] == index[row["image_id"]]
        with torch.no_grad():
            expected = torch.nn.functional.normalize(mpn(x[batch]).features[0], dim=0)
        np.testing.assert_allclose(stored[row["image_id"]], expected.numpy(), atol=1e-5)


def test_backbone_and_mpn_evaluated_side_by_side(mpn_run):
    cfg, _ = mpn_run
    backbone, refined = _metrics(cfg, "evaluate"), _metrics(cfg, "mpn")
    shape = lambda rows: {(r["split"], r["metric"], r["k"]) for r in rows}  # noqa: E731
    assert shape(backbone) == shape(refined)
    assert {("test", "recall", 1), ("train", "recall", 1), ("test", "nmi", None)} <= shape(refined)


def test_report_has_the_backbone_vs_mpn_table_and_attention_curves(mpn_run):
    _, summary = mpn_run
    with open(summary.report) as f:
        html = f.read()
    assert "id='mpn'" in html and "id='mpn-attention'" in html
    assert html.count("data:image/png;base64,") >= 2
