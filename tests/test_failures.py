"""Failure handling on a real local Ray instance: corrupt inputs, error budget, a killed training worker."""
from __future__ import annotations

import os

import pyarrow.compute as pc
import pytest
import torch

from dml_ray.io.run import open_run
from dml_ray.config import DataConfig, EmbedConfig
from dml_ray.data.readers import read_images
from dml_ray.data.synthetic import generate_synthetic
from dml_ray.io.tables import is_committed, read_table, staging_uri, table_uri, write_table
from dml_ray.models.checkpoint import checkpoint_bytes, save_checkpoint
from dml_ray.models.embedding import build_model
from pipelines.embed import ErrorBudgetExceeded, run_embed
from pipelines.train import run_train
from tests.conftest import demo_like_config

DATA = DataConfig(kind="cub", resize=64, image_size=64)


@pytest.fixture(scope="module")
def damaged_dataset(tmp_path_factory):
    """A small CUB-format dataset with one corrupt and one missing image, and a random-init checkpoint."""
    root = tmp_path_factory.mktemp("damaged")
    data = str(root / "data")
    generate_synthetic(data, n_classes=4, images_per_class=6, image_size=64, seed=1)
    images = read_images("cub", data)
    uris = images.column("uri").to_pylist()
    with open(uris[3], "wb") as f:
        f.write(b"\xff\xd8 this is not a jpeg")
    os.remove(uris[7])
    torch.manual_seed(0)
    cfg = demo_like_config(str(root)).model
    ckpt = str(root / "model.pt")
    save_checkpoint(ckpt, checkpoint_bytes(build_model(cfg, 64).eval(), cfg, 64, ["a", "b", "c", "d"]))
    bad = {images.column("image_id")[3].as_py(), images.column("image_id")[7].as_py()}
    return str(root), images, ckpt, bad


def test_corrupt_and_missing_images_go_to_errors(ray_session, damaged_dataset):
    root, images, ckpt, bad = damaged_dataset
    result = run_embed(images, ckpt, open_run(root, "ok", create=True), DATA, EmbedConfig(batch_size=5, max_error_fraction=0.2))
    assert result.errors == 2 and result.rows == images.num_rows - 2
    errors = read_table(table_uri(root, "ok", "errors")).to_pylist()
    assert {e["image_id"] for e in errors} == bad
    reasons = sorted(e["error"].split(":")[0] for e in errors)
    assert reasons == ["decode", "read"]
    emb = read_table(table_uri(root, "ok", "embeddings"))
    ids = emb.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == images.num_rows - 2 and not (set(ids) & bad)
    assert pc.all(pc.is_valid(emb.column("embedding"))).as_py()


def test_error_budget_exceeded_commits_nothing(ray_session, damaged_dataset):
    root, images, ckpt, _ = damaged_dataset
    with pytest.raises(ErrorBudgetExceeded, match=r"2 of 24 images failed .* embed.max_error_fraction=0.05"):
        run_embed(images, ckpt, open_run(root, "strict", create=True), DATA, EmbedConfig(batch_size=8, max_error_fraction=0.05))
    assert not is_committed(table_uri(root, "strict", "embeddings"))
    assert not is_committed(table_uri(root, "strict", "errors", "embed"))


def test_killed_training_worker_resumes_from_last_checkpoint(ray_session, tmp_path):
    cfg = demo_like_config(str(tmp_path), run_id="fail",
                           **{"train.epochs": 2, "train.steps_per_epoch": 2, "train.max_failures": 1,
                              "data.synthetic.n_classes": 8, "data.synthetic.images_per_class": 8,
                              "data.synthetic.image_size": 64, "train.classes_per_batch": 2})
    data = str(tmp_path / "data")
    generate_synthetic(data, 8, 8, 64, seed=0)
    images_uri = table_uri(cfg.output_root, cfg.run_id, "images")
    write_table(read_images("cub", data), images_uri, staging_uri(cfg.output_root, cfg.run_id, "images"))
    marker = tmp_path / "killed-once"
    result = run_train(images_uri, cfg, fail_once={"epoch": 1, "rank": 1, "marker": str(marker)})
    assert marker.exists(), "the fault was never injected"
    # the worker died during epoch 1: epoch 1 re-ran in a second attempt restored from epoch 0's checkpoint
    assert [(h["epoch"], h["attempt"]) for h in result.history] == [(0, 0), (1, 1)]
    assert is_committed(images_uri)


def test_killed_embedding_actor_still_embeds_every_image_once(ray_session, damaged_dataset, tmp_path):
    root, images, ckpt, bad = damaged_dataset
    marker = tmp_path / "actor-exited"
    cfg = EmbedConfig(batch_size=4, max_error_fraction=0.2, incremental=False)
    result = run_embed(images, ckpt, open_run(root, "actor-killed", create=True), DATA, cfg, crash_once=str(marker))
    assert marker.exists(), "the actor never exited"
    ids = read_table(table_uri(root, "actor-killed", "embeddings")).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == result.rows == images.num_rows - len(bad)
    assert set(ids) == set(images.column("image_id").to_pylist()) - bad
    errors = read_table(table_uri(root, "actor-killed", "errors")).column("image_id").to_pylist()
    assert sorted(errors) == sorted(bad)


def test_gpu_asked_of_a_local_instance_without_one_fails_fast(ray_session, tmp_path):
    from dml_ray.io.lock import read_lock
    from pipelines.run import run_pipeline

    if ray_session.cluster_resources().get("GPU", 0):
        pytest.fail("this test expects the CPU-only session instance")
    cfg = demo_like_config(str(tmp_path), stages=["data", "train"], **{"train.use_gpu": True})
    with pytest.raises(ValueError, match=r"^train.use_gpu: true, but the local Ray instance has no GPU"):
        run_pipeline(cfg)
    assert not is_committed(table_uri(cfg.output_root, "t", "images"))
    assert read_lock(cfg.output_root) is None
