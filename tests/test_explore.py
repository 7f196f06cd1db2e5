"""load_model, Run.search and the search/embed CLI on one small hand-built run (no training: a random tiny_cnn)."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

import dml_ray
from dml_ray.cli import main
from dml_ray.config import ModelConfig
from dml_ray.data.batches import decode_batch, fetch_bytes
from dml_ray.explore import index as index_mod
from dml_ray.models.checkpoint import checkpoint_bytes
from dml_ray.models.embedding import build_model
from dml_ray.models.inference import EMBEDDING_COLUMNS, Embedder
from dml_ray.retrieval.search import knn_search

SIZE, DIM, CLASSES, PER_CLASS = 32, 8, 4, 5


def _images(folder: str) -> pa.Table:
    rng = np.random.default_rng(0)
    rows = []
    for label in range(CLASSES):
        base = rng.integers(0, 255, size=3)
        for j in range(PER_CLASS):
            pixels = np.clip(base + rng.normal(0, 40, size=(40, 48, 3)), 0, 255).astype(np.uint8)
            path = os.path.join(folder, f"c{label}_{j}.png")
            Image.fromarray(pixels).save(path)
            rows.append({"image_id": f"c{label}_{j}", "uri": path, "label": label,
                         "split": "train" if j < 2 else "test"})
    return pa.Table.from_pylist(rows)


def _embed_rows(checkpoint: str, run_id: str, images: pa.Table) -> pa.Table:
    """The embeddings table as the embed stage computes it (its decode + Embedder), without Ray."""
    batch = decode_batch(fetch_bytes(images), SIZE, SIZE)
    return Embedder(checkpoint, run_id)(batch).select(EMBEDDING_COLUMNS)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("explore"))
    folder = os.path.join(root, "images")
    os.makedirs(folder)
    images = _images(folder)
    run = dml_ray.open_run(os.path.join(root, "out"), "r1", create=True)
    cfg = ModelConfig(backbone="tiny_cnn", embedding_dim=DIM)
    torch_model = build_model(cfg, SIZE).eval()
    checkpoint = run.write_bytes(run.path("model", "model.pt"),
                                 checkpoint_bytes(torch_model, cfg, SIZE, [], extra={"resize": SIZE}))
    run.commit("embeddings", _embed_rows(checkpoint, "r1", images))
    run.set_latest()
    return {"root": os.path.join(root, "out"), "run": run, "images": images, "checkpoint": checkpoint,
            "folder": folder}


def _stored(run) -> tuple[list[str], np.ndarray]:
    table = run.read("embeddings", columns=["image_id", "embedding"])
    return table.column("image_id").to_pylist(), np.array(table.column("embedding").to_pylist(), np.float32)


def test_load_model_embeds_like_the_embed_stage(demo) -> None:
    embedder = dml_ray.load_model(demo["checkpoint"])
    ids, stored = _stored(demo["run"])
    uris = dict(zip(demo["images"].column("image_id").to_pylist(), demo["images"].column("uri").to_pylist()))
    got = embedder.embed([uris[ids[0]], Image.open(uris[ids[1]])])
    np.testing.assert_allclose(got, stored[:2], atol=1e-5)
    assert embedder.embed(uris[ids[2]]).shape == (1, DIM)


def test_search_equals_exact_knn_and_index_is_saved_and_reused(demo, monkeypatch) -> None:
    run = dml_ray.open_run(demo["root"])
    ids, stored = _stored(run)
    queries = stored[[3, 11]] + 0.01
    result = run.search(queries, k=5)
    scores, idx = knn_search(queries, stored, k=5)
    assert result.column("image_id").to_pylist() == [ids[i] for i in idx.reshape(-1)]
    np.testing.assert_allclose(result.column("score").to_numpy(), scores.reshape(-1), atol=1e-5)
    assert result.column("query").to_pylist() == [0] * 5 + [1] * 5
    assert result.column("rank").to_pylist() == list(range(1, 6)) * 2
    model_id = run.read("embeddings", columns=["model_id"]).column("model_id")[0].as_py()
    assert os.path.exists(os.path.join(demo["root"], "runs", "r1", "index", f"{model_id}.faiss"))

    def no_build(*args, **kwargs):
        raise AssertionError("the saved index should have been loaded")

    monkeypatch.setattr(index_mod, "build_index", no_build)
    again = dml_ray.open_run(demo["root"]).search(queries, k=5)
    assert again.column("image_id").to_pylist() == result.column("image_id").to_pylist()


def test_search_by_images_uses_the_runs_checkpoint(demo) -> None:
    run = dml_ray.open_run(demo["root"])
    ids, stored = _stored(run)
    uris = dict(zip(demo["images"].column("image_id").to_pylist(), demo["images"].column("uri").to_pylist()))
    by_image = run.search([uris[ids[4]]], k=3)
    by_vector = run.search(stored[[4]], k=3)
    assert by_image.column("image_id").to_pylist() == by_vector.column("image_id").to_pylist()
    assert by_image.column("score")[0].as_py() == pytest.approx(1.0, abs=1e-5)


def test_hnsw_index_per_config_and_rebuilt_when_embeddings_change(demo, tmp_path) -> None:
    run = dml_ray.open_run(demo["root"], "r2", create=True)
    run.update_manifest(config={"knn": {"metric": "cosine", "index": "hnsw", "index_params": {"efSearch": 64}}})
    table = _embed_rows(demo["checkpoint"], "r2", demo["images"])
    run.commit("embeddings", table)
    ids, stored = _stored(run)
    hit = run.search(stored[[7]], k=1)
    assert index_mod.run_index(run).index.__class__.__name__.startswith("IndexHNSW")
    # the query is a stored row: the top hit is it, or a row as similar (a random model makes near-ties)
    assert hit.column("score")[0].as_py() == pytest.approx(1.0, abs=1e-5)
    # a recommitted embeddings table (here: fewer rows) makes the saved index stale: it is rebuilt
    run.commit("embeddings", table.slice(0, 6), replace=True)
    rebuilt = dml_ray.open_run(demo["root"], "r2").search(stored[[0]], k=20)
    assert rebuilt.num_rows == 6


def test_search_refuses_wrong_dimension(demo) -> None:
    with pytest.raises(ValueError, match="dimension"):
        dml_ray.open_run(demo["root"]).search(np.ones((1, DIM + 1), np.float32), k=3)


def test_cli_search_json_and_csv(demo, capsys) -> None:
    run = dml_ray.open_run(demo["root"])
    ids, _ = _stored(run)
    image = dict(zip(demo["images"].column("image_id").to_pylist(), demo["images"].column("uri").to_pylist()))[ids[9]]
    assert main(["search", "--root", demo["root"], "--image", image, "--k", "4", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    expected = run.search([image], k=4)
    assert [r["image_id"] for r in rows] == expected.column("image_id").to_pylist()
    assert rows[0]["score"] == pytest.approx(1.0, abs=1e-5) and isinstance(rows[0]["label"], int)
    assert main(["search", "--root", demo["root"], "--image", image, "--k", "2", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split(",")[:3] == ["rank", "image_id", "label"] and len(lines) == 3


def test_cli_search_refuses_a_non_image(demo, tmp_path, capsys) -> None:
    bogus = tmp_path / "x.jpg"
    bogus.write_bytes(b"not an image")
    assert main(["search", "--root", demo["root"], "--image", str(bogus)]) == 2
    assert "error" in capsys.readouterr().err


def test_cli_embed_a_folder_with_ray_data(demo, tmp_path, ray_session, capsys) -> None:
    import pyarrow.parquet as pq

    from dml_ray.io.schemas import check_contract

    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    uris = dict(zip(demo["images"].column("image_id").to_pylist(), demo["images"].column("uri").to_pylist()))
    for name in ("c0_1", "c2_3"):
        (tmp_path / "imgs" / "sub" / f"{name}.png").write_bytes(open(uris[name], "rb").read())
    out = str(tmp_path / "e.parquet")
    assert main(["embed", "--checkpoint", demo["checkpoint"], str(tmp_path / "imgs"), "--out", out]) == 0
    assert "2 rows" in capsys.readouterr().out
    table = pq.read_table(out)
    check_contract("embeddings", table.schema)
    assert table.column("image_id").to_pylist() == ["sub/c0_1.png", "sub/c2_3.png"]
    ids, stored = _stored(demo["run"])
    np.testing.assert_allclose(np.array(table.column("embedding").to_pylist()),
                               stored[[ids.index("c0_1"), ids.index("c2_3")]], atol=1e-5)
