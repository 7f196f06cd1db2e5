import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dml_ray.io.query import connect
from dml_ray.io.tables import (
    TableExistsError,
    commit_table,
    committed_tables,
    is_committed,
    read_table,
    set_latest,
    staging_uri,
    table_uri,
    update_manifest,
    write_table,
)


def _write(tmp_uri, table, name="x.parquet"):
    import fsspec

    fs, path = fsspec.core.url_to_fs(tmp_uri)
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path}/{name}", "wb") as f:
        pq.write_table(table, f)


@pytest.mark.parametrize("root", ["local", "memory://tables-test"])
def test_commit_then_read_only_committed_files(tmp_path, root):
    root = str(tmp_path) if root == "local" else root
    t = pa.table({"a": [1, 2, 3]})
    final = table_uri(root, "r1", "things")
    staging = staging_uri(root, "r1", "things")
    _write(staging, t, "one.parquet")
    _write(staging, pa.table({"a": [4]}), "two.parquet")
    assert not is_committed(final)
    marker = commit_table(staging, final)
    assert marker["rows"] == 4 and len(marker["files"]) == 2
    assert is_committed(final)
    # a stray file in the table folder is not part of the table
    _write(final, pa.table({"a": [99]}), "stray.parquet")
    assert sorted(read_table(final).column("a").to_pylist()) == [1, 2, 3, 4]
    again = staging_uri(root, "r1", "things")
    _write(again, t)
    with pytest.raises(TableExistsError):
        commit_table(again, final)
    assert sorted(read_table(final).column("a").to_pylist()) == [1, 2, 3, 4]


def test_uncommitted_leftover_is_replaced(tmp_path):
    root = str(tmp_path)
    final = table_uri(root, "r1", "t")
    _write(final, pa.table({"a": [7, 7]}), "half-written.parquet")
    with pytest.raises(FileNotFoundError):
        read_table(final)
    write_table(pa.table({"a": [1]}), final, staging_uri(root, "r1", "t"))
    assert read_table(final).column("a").to_pylist() == [1]


def test_parts_union_and_duckdb_views(tmp_path):
    root = str(tmp_path)
    for stage, v in (("train", 1.0), ("evaluate", 2.0)):
        write_table(pa.table({"stage": [stage], "value": [v]}), table_uri(root, "r1", "metrics", stage),
                    staging_uri(root, "r1", "metrics", stage))
    _write(table_uri(root, "r1", "metrics", "half"), pa.table({"stage": ["x"], "value": [3.0]}))
    assert sorted(read_table(table_uri(root, "r1", "metrics")).column("value").to_pylist()) == [1.0, 2.0]
    assert set(committed_tables(root, "r1")) == {"metrics"}
    set_latest(root, "r1")
    con, runs = connect(root)
    assert runs == ["r1"]
    assert con.execute("SELECT sum(value) FROM metrics").fetchone()[0] == 3.0


def test_manifest_merges_stages(tmp_path):
    root = str(tmp_path)
    update_manifest(root, "r1", config={"a": 1})
    update_manifest(root, "r1", stages={"data": {"rows": 3}})
    doc = update_manifest(root, "r1", stages={"train": {"seconds": 1}})
    assert doc["config"] == {"a": 1} and set(doc["stages"]) == {"data", "train"}
    assert json.loads((tmp_path / "runs" / "r1" / "manifest.json").read_text())["stages"]["data"]["rows"] == 3


def test_commit_keeps_every_file_whatever_the_staged_names(tmp_path):
    """Staged files are renamed part-NNNNN in sorted order; one already called part-00000.parquet (a shard
    writer's name) must not be overwritten by the rename of another (it was)."""
    root = str(tmp_path)
    staging = staging_uri(root, "r1", "t")
    _write(f"{staging}/a-shard", pa.table({"a": [1]}), "x.parquet")
    _write(staging, pa.table({"a": [2, 3]}), "part-00000.parquet")
    marker = commit_table(staging, table_uri(root, "r1", "t"))
    assert marker["rows"] == 3 and len(marker["files"]) == 2
    assert sorted(read_table(table_uri(root, "r1", "t")).column("a").to_pylist()) == [1, 2, 3]
