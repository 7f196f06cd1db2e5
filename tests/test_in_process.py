"""The small-run fast path (embed / explain ``in_process_below``): the driver and Ray Data give the same tables."""
from __future__ import annotations

import os

import pyarrow as pa
import pytest
import torch

from dml_ray.io.run import open_run
from dml_ray.config import DataConfig, EmbedConfig, ExplainConfig
from dml_ray.data.readers import read_images
from dml_ray.data.synthetic import generate_synthetic
from dml_ray.io.tables import is_committed, read_table, table_uri
from dml_ray.models.checkpoint import checkpoint_bytes, save_checkpoint
from dml_ray.models.embedding import build_model
from pipelines.embed import ErrorBudgetExceeded, run_embed
from pipelines.explain import run_explain
from tests.conftest import demo_like_config

DATA = DataConfig(kind="cub", resize=64, image_size=64)
RAY_DATA, DRIVER = 0, 10_000  # in_process_below


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """30 images, one corrupt and one missing, and a random-init checkpoint of the demo's model."""
    root = tmp_path_factory.mktemp("fastpath")
    generate_synthetic(str(root / "data"), n_classes=5, images_per_class=6, image_size=64, seed=2)
    images = read_images("cub", str(root / "data"))
    uris = images.column("uri").to_pylist()
    with open(uris[4], "wb") as f:
        f.write(b"\x89PNG not really")
    os.remove(uris[11])
    torch.manual_seed(0)
    model_cfg = demo_like_config(str(root)).model
    ckpt = str(root / "model.pt")
    save_checkpoint(ckpt, checkpoint_bytes(build_model(model_cfg, 64).eval(), model_cfg, 64, list("abcde"),
                                           extra={"resize": 64}))
    return root, images, ckpt


def _sorted(table: pa.Table, keys: list[str]) -> pa.Table:
    return table.sort_by([(k, "ascending") for k in keys])


def test_driver_and_ray_data_paths_commit_identical_tables(ray_session, dataset):
    # One batch on both paths: a model's float output for an image can change in the last bit with the batch it
    # is computed in (BLAS kernels differ by batch size), and Ray Data cuts its blocks differently from the driver.
    root, images, ckpt = dataset
    roots = {}
    for name, below in (("ray", RAY_DATA), ("driver", DRIVER)):
        roots[name] = out = str(root / name)
        cfg = EmbedConfig(batch_size=64, feature_maps=True, max_error_fraction=0.1, in_process_below=below)
        result = run_embed(images, ckpt, open_run(out, "r", create=True), DATA, cfg)
        assert (result.rows, result.errors) == (images.num_rows - 2, 2)
        run_explain(ckpt, open_run(out, "r"), ExplainConfig(batch_size=64, in_process_below=below,
                                                  methods=["decomposition", "distcam", "gradcam"]), ["test"])
    for table, keys in (("embeddings", ["image_id"]), ("feature_maps", ["image_id"]), ("errors", ["image_id"]),
                        ("embedding_keys", ["image_id"]), ("prototypes", ["split", "label"]),
                        ("activation_maps", ["image_id", "reference_kind", "method"])):
        ray_rows, driver_rows = (_sorted(read_table(table_uri(roots[n], "r", table)), keys) for n in ("ray", "driver"))
        assert ray_rows.num_rows > 0, table
        assert driver_rows.equals(ray_rows), table
    errors = read_table(table_uri(roots["driver"], "r", "errors")).to_pylist()
    assert sorted(e["error"].split(":")[0] for e in errors) == ["decode", "read"]


def test_error_budget_in_the_driver_commits_nothing(dataset):
    root, images, ckpt = dataset
    out = str(root / "strict")
    with pytest.raises(ErrorBudgetExceeded, match=r"2 of 30 images failed"):
        run_embed(images, ckpt, open_run(out, "s", create=True), DATA, EmbedConfig(batch_size=8, max_error_fraction=0.05,
                                                            in_process_below=DRIVER))
    assert not is_committed(table_uri(out, "s", "embeddings"))
    assert not is_committed(table_uri(out, "s", "errors", "embed"))
