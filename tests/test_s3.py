"""Object-store I/O against a real S3 API: moto in server mode on loopback, reached through s3fs.

The server is started the way s3fs's own test-suite does it (``moto.server.ThreadedMotoServer`` in a
thread, dummy credentials in the environment); no traffic leaves 127.0.0.1. Each test gets a fresh,
empty ``bucket`` (the server is reset) and a cleared s3fs instance cache.
"""
from __future__ import annotations

import json
import logging
import os
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("moto.server", reason="needs moto[server] (pip install -e '.[test]')")
pytest.importorskip("flask", reason="needs moto[server] (pip install -e '.[test]')")
s3fs = pytest.importorskip("s3fs")
boto3 = pytest.importorskip("boto3")

BUCKET = "bucket"
SECRET = "SECRET-d0-n0t-l3ak-9f27c1"  # distinctive, so any leak is unmistakable
KEY_ID = "AKIAKEYID0D0N0TLEAK7"

_DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
_UNSET_ENV = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
              "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (a free port) with dummy credentials; env restored afterwards."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for name, value in _DUMMY_ENV.items():
            mp.setenv(name, value)
        for name in _UNSET_ENV:
            mp.delenv(name, raising=False)
        # no shared config / credentials files, and never a proxy for loopback
        nowhere = str(tmp_path_factory.mktemp("aws") / "none")
        mp.setenv("AWS_CONFIG_FILE", nowhere)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", nowhere)
        no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
        mp.setenv("NO_PROXY", no_proxy)
        mp.setenv("no_proxy", no_proxy)

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()
            s3fs.S3FileSystem.clear_instance_cache()


def _reset(endpoint: str) -> None:
    req = urllib.request.Request(f"{endpoint}/moto-api/reset", data=b"", method="POST")
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10) as resp:
        assert resp.status == 200


@pytest.fixture
def so(s3_endpoint):
    """storage_options for s3fs against a fresh, empty ``s3://bucket``."""
    _reset(s3_endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_endpoint}}
    s3fs.S3FileSystem.clear_instance_cache()


def _fs(so):
    return s3fs.S3FileSystem(**so)


def _keys(so, prefix: str) -> list[str]:
    return sorted(_fs(so).find(f"{BUCKET}/{prefix}"))


def test_server_is_loopback_and_bucket_empty(so):
    assert so["client_kwargs"]["endpoint_url"].startswith("http://127.0.0.1:")
    assert _fs(so).ls(BUCKET) == []


# ---- 1. a dataset written to and read back from S3 ----


def test_synthetic_dataset_roundtrip(so):
    from dml_ray.data.batches import decode_batch, fetch_bytes
    from dml_ray.data.readers import read_images
    from dml_ray.data.synthetic import generate_synthetic

    root = f"s3://{BUCKET}/data"
    assert generate_synthetic(root, n_classes=4, images_per_class=3, image_size=48, seed=0,
                              storage_options=so) == root
    keys = _keys(so, "data")
    for name in ("classes.txt", "images.txt", "image_class_labels.txt", "train_test_split.txt",
                 "bounding_boxes.txt"):
        assert f"{BUCKET}/data/{name}" in keys
    assert sum(k.endswith(".jpg") for k in keys) == 12

    s3fs.S3FileSystem.clear_instance_cache()  # read through a fresh client, not the writer's caches
    table = read_images("cub", root, so)
    assert table.num_rows == 12
    uris = table.column("uri").to_pylist()
    assert all(u.startswith(f"s3://{BUCKET}/data/images/") for u in uris)
    assert len(set(uris)) == 12
    assert set(table.column("width").to_pylist()) == {48} and set(table.column("height").to_pylist()) == {48}
    assert sorted(set(table.column("split").to_pylist())) == ["test", "train"]
    assert table.column("bbox").null_count == 0

    fetched = fetch_bytes(table, so)
    assert fetched.column("error").null_count == fetched.num_rows
    assert all(b[:2] == b"\xff\xd8" for b in fetched.column("bytes").to_pylist())  # JPEG SOI
    out = decode_batch(fetched, resize=48, image_size=32)
    assert out["image"].shape == (12, 3, 32, 32)
    assert all(e is None for e in out["error"])
    assert (out["image"].reshape(12, -1).std(axis=1) > 0).all()


def test_fetch_bytes_missing_object_is_a_row_error(so):
    from dml_ray.data.batches import fetch_bytes

    table = pa.table({"uri": [f"s3://{BUCKET}/nope.jpg"]})
    err = fetch_bytes(table, so).column("error").to_pylist()[0]
    assert err is not None and err.startswith("read: FileNotFoundError")


# ---- 2. committed tables and DuckDB on S3 ----


def test_write_commit_read_table(so):
    from dml_ray.io.tables import (
        COMMIT_MARKER,
        TableExistsError,
        is_committed,
        read_table,
        staging_uri,
        table_uri,
        write_table,
    )

    out = f"s3://{BUCKET}/out"
    final = table_uri(out, "r1", "t")
    staging = staging_uri(out, "r1", "t")
    t = pa.table({"image_id": ["a", "b", "c"], "value": [1.0, 2.0, 3.0]})
    assert not is_committed(final, so)
    marker = write_table(t, final, staging, so)
    assert marker["rows"] == 3 and marker["files"] == ["part-00000.parquet"]

    s3fs.S3FileSystem.clear_instance_cache()
    fs = _fs(so)
    assert fs.exists(f"{BUCKET}/out/runs/r1/t/{COMMIT_MARKER}")
    assert json.loads(fs.cat_file(f"{BUCKET}/out/runs/r1/t/{COMMIT_MARKER}"))["files"] == ["part-00000.parquet"]
    assert not fs.exists(staging.removeprefix("s3://"))
    assert not [k for k in fs.find(f"{BUCKET}/out/_staging")]
    assert is_committed(final, so)
    assert read_table(final, so).sort_by("image_id").equals(t)

    # committing again is refused and leaves the table as it was
    with pytest.raises(TableExistsError):
        write_table(pa.table({"image_id": ["z"], "value": [9.0]}), final, staging_uri(out, "r1", "t"), so)
    s3fs.S3FileSystem.clear_instance_cache()
    assert read_table(final, so).num_rows == 3

    # a stray file dropped into the committed folder is not part of the table
    with fs.open(f"{BUCKET}/out/runs/r1/t/stray.parquet", "wb") as f:
        pq.write_table(pa.table({"image_id": ["stray"], "value": [99.0]}), f)
    s3fs.S3FileSystem.clear_instance_cache()
    assert sorted(read_table(final, so).column("image_id").to_pylist()) == ["a", "b", "c"]

    # replace=True swaps the rows
    write_table(pa.table({"image_id": ["n"], "value": [5.0]}), final, staging_uri(out, "r1", "t"), so,
                replace=True)
    s3fs.S3FileSystem.clear_instance_cache()
    assert read_table(final, so).column("image_id").to_pylist() == ["n"]


def test_uncommitted_folder_is_not_a_table(so):
    from dml_ray.io.tables import is_committed, read_table, staging_uri, table_uri, write_table

    out = f"s3://{BUCKET}/out"
    final = table_uri(out, "r1", "half")
    with _fs(so).open(f"{BUCKET}/out/runs/r1/half/part-00000.parquet", "wb") as f:
        pq.write_table(pa.table({"a": [7, 7]}), f)
    assert not is_committed(final, so)
    with pytest.raises(FileNotFoundError):
        read_table(final, so)
    # a crashed attempt's leftovers are replaced by the next commit
    write_table(pa.table({"a": [1]}), final, staging_uri(out, "r1", "half"), so)
    s3fs.S3FileSystem.clear_instance_cache()
    assert read_table(final, so).column("a").to_pylist() == [1]
    assert [k.rsplit("/", 1)[-1] for k in _keys(so, "out/runs/r1/half")] == ["_COMMITTED", "part-00000.parquet"]


def test_parts_union_and_duckdb_views(so):
    from dml_ray.io.query import connect
    from dml_ray.io.tables import committed_tables, read_table, set_latest, staging_uri, table_uri, write_table

    out = f"s3://{BUCKET}/out"
    for stage, v in (("train", 1.0), ("evaluate", 2.0)):
        write_table(pa.table({"stage": [stage], "value": [v]}), table_uri(out, "r1", "metrics", stage),
                    staging_uri(out, "r1", "metrics", stage), so)
    write_table(pa.table({"image_id": ["a", "b", "c"], "label": [0, 1, 1]}), table_uri(out, "r1", "images"),
                staging_uri(out, "r1", "images"), so)
    # an uncommitted part and a stray file are in neither read_table nor the views
    with _fs(so).open(f"{BUCKET}/out/runs/r1/metrics/half/part-00000.parquet", "wb") as f:
        pq.write_table(pa.table({"stage": ["x"], "value": [3.0]}), f)
    with _fs(so).open(f"{BUCKET}/out/runs/r1/images/stray.parquet", "wb") as f:
        pq.write_table(pa.table({"image_id": ["s"], "label": [9]}), f)
    s3fs.S3FileSystem.clear_instance_cache()

    assert sorted(read_table(table_uri(out, "r1", "metrics"), so).column("value").to_pylist()) == [1.0, 2.0]
    assert set(committed_tables(out, "r1", so)) == {"images", "metrics"}

    set_latest(out, "r1", so)
    s3fs.S3FileSystem.clear_instance_cache()
    con, runs = connect(out, None, so)
    try:
        assert runs == ["r1"]
        assert con.execute("SELECT count(*) FROM metrics").fetchone()[0] == 2
        assert con.execute("SELECT count(*) FROM images").fetchone()[0] == 3
        assert con.execute("SELECT sum(value) FROM metrics").fetchone()[0] == 3.0
        assert con.execute("SELECT list(stage ORDER BY stage) FROM metrics").fetchone()[0] == ["evaluate", "train"]
        # the sandbox holds on S3 roots too: s3fs reads the committed files for Arrow, DuckDB itself opens nothing
        import duckdb

        for sql in ("SELECT * FROM read_csv('/etc/passwd')", f"SELECT * FROM read_parquet('s3://{BUCKET}/out/**')",
                    "SET enable_external_access = true"):
            with pytest.raises(duckdb.Error):
                con.execute(sql)
    finally:
        con.close()


def test_table_committed_by_another_process_is_seen(so, s3_endpoint):
    """A long-lived reader (``dml-ray query``, a driver) sees tables another process commits later."""
    import io

    from dml_ray.io.tables import committed_tables, staging_uri, table_uri, write_table

    out = f"s3://{BUCKET}/out"
    write_table(pa.table({"a": [1]}), table_uri(out, "r1", "images"), staging_uri(out, "r1", "images"), so)
    assert set(committed_tables(out, "r1", so)) == {"images"}
    # another process (a Ray task, a second driver) commits "embeddings": plain S3 PUTs, marker last
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    buf = io.BytesIO()
    pq.write_table(pa.table({"a": [2]}), buf)
    client.put_object(Bucket=BUCKET, Key="out/runs/r1/embeddings/part-00000.parquet", Body=buf.getvalue())
    client.put_object(Bucket=BUCKET, Key="out/runs/r1/embeddings/_COMMITTED",
                      Body=json.dumps({"files": ["part-00000.parquet"], "rows": 1}).encode())
    assert set(committed_tables(out, "r1", so)) == {"images", "embeddings"}


# ---- 3. checkpoints ----


def test_checkpoint_roundtrip(so):
    import torch

    from dml_ray.config import ModelConfig
    from dml_ray.models.checkpoint import checkpoint_bytes, load_checkpoint, model_id_of, save_checkpoint
    from dml_ray.models.embedding import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="tiny_cnn", embedding_dim=8)
    model = build_model(cfg, 64).eval()
    data = checkpoint_bytes(model, cfg, 64, ["a"], extra={"epoch": 3})
    uri = f"s3://{BUCKET}/m/model.pt"
    save_checkpoint(uri, data, so)
    s3fs.S3FileSystem.clear_instance_cache()
    assert _keys(so, "m") == [f"{BUCKET}/m/model.pt"]  # one object, no temporary left behind
    loaded = load_checkpoint(uri, so)
    assert loaded.image_size == 64 and loaded.class_names == ["a"] and loaded.extra == {"epoch": 3}
    assert loaded.model_config.backbone == "tiny_cnn" and loaded.model_config.embedding_dim == 8
    assert loaded.model_id == model_id_of(data, "tiny_cnn")
    want = model.state_dict()
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, want[k]), k
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x).embedding, model(x).embedding)


# ---- 4. credentials never leak ----


def _chain_text(err: BaseException) -> str:
    """str and repr of an exception and of every cause / context it carries."""
    parts, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        parts += [str(err), repr(err)]
        err = err.__cause__ or err.__context__
    return "\n".join(parts)


def test_credentials_never_in_errors_or_logs(so, caplog):
    from dml_ray.data.batches import fetch_bytes
    from dml_ray.data.readers import read_images
    from dml_ray.io.query import connect
    from dml_ray.io.tables import read_table, table_uri
    from dml_ray.models.checkpoint import load_checkpoint

    leaky = {**so, "key": KEY_ID, "secret": SECRET}
    out = f"s3://{BUCKET}/out"
    caplog.set_level(logging.DEBUG)
    attempts = [
        lambda: read_table(table_uri(out, "r1", "missing"), leaky),
        lambda: read_images("cub", f"s3://{BUCKET}/no-dataset", leaky),
        lambda: load_checkpoint(f"s3://{BUCKET}/m/missing.pt", leaky),
        lambda: connect(out, None, leaky),
        lambda: connect(out, "r1", leaky),
    ]
    for attempt in attempts:
        s3fs.S3FileSystem.clear_instance_cache()
        with pytest.raises(FileNotFoundError) as info:
            attempt()
        text = _chain_text(info.value)
        assert SECRET not in text and KEY_ID not in text, text
    row_error = fetch_bytes(pa.table({"uri": [f"s3://{BUCKET}/missing.jpg"]}), leaky).column("error")[0].as_py()
    assert row_error and SECRET not in row_error and KEY_ID not in row_error
    # the secret is in no log record at any level, from any library; the key id is in none of ours
    # (botocore's own DEBUG records show it in the signed Authorization header, as AWS intends)
    assert SECRET not in caplog.text
    ours = [r.getMessage() for r in caplog.records if r.name.split(".")[0] in ("dml_ray", "pipelines")]
    assert not [m for m in ours if KEY_ID in m or SECRET in m]


def test_credentials_from_environment(so, s3_endpoint):
    """No key or secret in storage_options: s3fs takes them from the (dummy) environment."""
    from dml_ray.io.tables import read_table, staging_uri, table_uri, write_table

    env_only = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    out = f"s3://{BUCKET}/out"
    write_table(pa.table({"a": [1, 2]}), table_uri(out, "r1", "t"), staging_uri(out, "r1", "t"), env_only)
    s3fs.S3FileSystem.clear_instance_cache()
    assert read_table(table_uri(out, "r1", "t"), env_only).column("a").to_pylist() == [1, 2]


# ---- 5. the nightly job with input and output in buckets ----


def test_nightly_job_on_s3(ray_session, so, tmp_path, capsys, caplog):
    """Data, checkpoint and outputs in the bucket; the secret in the config never shows up anywhere else."""
    from dml_ray.cli import main as cli_main
    from dml_ray.io.tables import latest_run
    from jobs.nightly import main as nightly
    from tests.nightly_setup import write_nightly_setup

    leaky = {**so, "key": KEY_ID, "secret": SECRET}
    setup = write_nightly_setup(tmp_path / "nightly.yaml", f"s3://{BUCKET}/data", f"s3://{BUCKET}/out", leaky)
    caplog.set_level(logging.INFO)
    assert nightly(["--config", setup["config"], "--run-id", "night-1"]) == 0
    printed = capsys.readouterr()
    assert "nightly: ok run_id=night-1 ran=data,embed,evaluate,knn skipped=- embedded=49 reused=0 errors=1" in \
        printed.out.strip().splitlines()[-1]
    s3fs.S3FileSystem.clear_instance_cache()
    assert latest_run(setup["out"], so) == "night-1"
    keys = _keys(so, "out")
    assert f"{BUCKET}/out/runs/night-1/embeddings/_COMMITTED" in keys and f"{BUCKET}/out/_lock.json" not in keys
    assert not [k for k in keys if "/_staging/" in k]

    assert cli_main(["query", "--config", setup["config"], "--format", "csv",
                     "SELECT count(*) AS n, count(DISTINCT image_id) AS ids FROM embeddings"]) == 0
    assert capsys.readouterr().out.split() == ["n,ids", "49,49"]
    assert cli_main(["query", "--config", setup["config"], "--format", "csv",
                     "SELECT image_id FROM errors"]) == 0
    assert capsys.readouterr().out.split() == ["image_id", setup["corrupt"]]

    # no credential in what was printed or logged, nor in any object the run wrote (manifest, markers, tables)
    assert SECRET not in printed.out + printed.err + caplog.text
    assert KEY_ID not in printed.out + printed.err
    fs = _fs(so)
    for key in _keys(so, "out"):
        body = fs.cat_file(key)
        assert SECRET.encode() not in body and KEY_ID.encode() not in body, key


def test_lock_is_exclusive_on_s3(so):
    from dml_ray.io.lock import LockHeld, output_lock, read_lock

    out = f"s3://{BUCKET}/out"
    with output_lock(out, "first", so) as mine:
        s3fs.S3FileSystem.clear_instance_cache()
        with pytest.raises(LockHeld, match=r"s3://bucket/out is locked by .* \(run first\)"):
            with output_lock(out, "second", so):
                pass
        assert read_lock(out, so)["token"] == mine["token"]
    assert read_lock(out, so) is None and _keys(so, "out") == []


def test_every_stage_reads_and_writes_the_bucket(ray_session, so):
    """The demo's stages (train through Ray Train, explain, localize, report too) with data and outputs in S3."""
    from dml_ray.io.tables import is_committed, table_uri
    from pipelines.run import run_pipeline
    from tests.conftest import demo_like_config

    out = f"s3://{BUCKET}/all"
    stages = ["data", "train", "embed", "evaluate", "knn", "mpn", "explain", "localize", "report"]
    cfg = demo_like_config(out, stages=stages, **{
        "data.root": f"s3://{BUCKET}/all-data", "data.storage_options": so,
        "data.synthetic": {"n_classes": 6, "images_per_class": 6, "image_size": 64, "seed": 2},
        "train.epochs": 1, "train.num_workers": 1, "train.classes_per_batch": 3, "train.samples_per_class": 2,
        "knn.k1": 10, "knn.batch_size": 8, "explain.methods": ["decomposition", "distcam"]})
    summary = run_pipeline(cfg)
    assert summary.ran == [s for s in stages if s != "mpn"] and summary.skipped == ["mpn"]
    s3fs.S3FileSystem.clear_instance_cache()
    for table in ("images", "embeddings", "feature_maps", "neighbors", "prototypes", "activation_maps",
                  "localization"):
        assert is_committed(table_uri(out, "t", table), so), table
    for part in ("train", "evaluate", "localize"):
        assert is_committed(table_uri(out, "t", "metrics", part), so), part
    keys = _keys(so, "all")
    for name in ("model/model.pt", "report.html", "explain_gallery.png", "manifest.json"):
        assert f"{BUCKET}/all/runs/t/{name}" in keys, name
    assert any(k.startswith(f"{BUCKET}/all/_train/t/") for k in keys)  # Ray Train's checkpoints
    assert not [k for k in keys if "/_staging/" in k] and f"{BUCKET}/all/_lock.json" not in keys
    assert summary.report == f"{out}/runs/t/report.html" and summary.latest
