"""``dml-ray query`` (issue 11, items 2, 6, 7, 8): read-only, confined to the run's committed files, one line per
refusal, damaged tables named, other tables still queryable."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from dml_ray.cli import main as cli_main
from dml_ray.io.query import connect
from dml_ray.io.tables import set_latest, staging_uri, table_uri, write_table


@pytest.fixture
def root(tmp_path) -> str:
    out = str(tmp_path / "out")
    write_table(pa.table({"image_id": ["a", "b", "c"], "value": [1.0, 2.0, 3.0]}), table_uri(out, "r1", "embeddings"),
                staging_uri(out, "r1", "embeddings"))
    write_table(pa.table({"image_id": ["a"], "feature_map": pa.array([np.full(4, 0.5, np.float16)],
                                                                     pa.list_(pa.float16()))}),
                table_uri(out, "r1", "feature_maps"), staging_uri(out, "r1", "feature_maps"))  # fp16, as stored
    write_table(pa.table({"stage": ["evaluate"], "value": [0.5]}), table_uri(out, "r1", "metrics", "evaluate"),
                staging_uri(out, "r1", "metrics", "evaluate"))
    set_latest(out, "r1")
    return out


def _digests(root: str) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(root).rglob("*") if p.is_file()}


def _query(root: str, sql: str, capsys, *extra: str) -> tuple[int, str, str]:
    code = cli_main(["query", "--root", root, "--format", "csv", *extra, sql])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_every_write_or_escape_is_refused_in_one_line_and_changes_nothing(root, capsys, tmp_path):
    part = str(Path(root, "runs", "r1", "embeddings", "part-00000.parquet"))
    before = _digests(root)
    attacks = [
        f"COPY (SELECT 'x' AS image_id, 9.0 AS value) TO '{part}'",
        f"COPY (SELECT 'x' AS image_id, 9.0 AS value) TO '{part}' (USE_TMP_FILE false)",
        "CREATE TABLE t AS SELECT 1",
        "CREATE VIEW v AS SELECT 1",
        "DROP VIEW embeddings",
        f"ATTACH '{tmp_path}/x.duckdb' AS x",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        "PRAGMA enable_profiling",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM glob('/root/*')",
        f"SELECT * FROM read_text('{part}')",
        f"SELECT * FROM read_parquet('{part}')",
        "SELECT 1; SELECT 2",
    ]
    for sql in attacks:
        code, out, err = _query(root, sql, capsys)
        assert code == 2, (sql, out, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("dml-ray: error: "), (sql, err)
        assert "Traceback" not in err
    assert not Path(tmp_path, "x.duckdb").exists()
    assert _digests(root) == before
    # reading the views still works, and gives the committed rows
    code, out, _ = _query(root, "SELECT image_id, value FROM embeddings ORDER BY image_id", capsys)
    assert code == 0 and out.split() == ["image_id,value", "a,1.0", "b,2.0", "c,3.0"]
    code, out, _ = _query(root, "DESCRIBE embeddings", capsys)
    assert code == 0 and "image_id" in out
    code, out, _ = _query(root, "SELECT sum(list_sum(feature_map)) AS s FROM feature_maps", capsys)
    assert code == 0 and out.split() == ["s", "2.0"]


def test_the_connection_itself_is_sandboxed(root):
    """open_run / Python users get the connection: DuckDB refuses file access and settings changes on it too."""
    part = str(Path(root, "runs", "r1", "embeddings", "part-00000.parquet"))
    before = _digests(root)
    con, runs = connect(root)
    assert runs == ["r1"]
    for sql in (f"COPY (SELECT 1 AS a) TO '{part}' (USE_TMP_FILE false)", "SELECT * FROM read_csv('/etc/passwd')",
                "SET enable_external_access = true", "INSTALL httpfs"):
        with pytest.raises(duckdb.Error):
            con.execute(sql)
    assert con.execute("SELECT sum(value) FROM embeddings").fetchone()[0] == 6.0
    assert _digests(root) == before


def test_malformed_sql_is_one_line_exit_2(root, capsys):
    code, _, err = _query(root, "SELECT * FRM embeddings", capsys)
    assert code == 2 and err.strip().splitlines() == ["dml-ray: error: Parser Error: syntax error at or near "
                                                      "\"embeddings\""]
    code, _, err = _query(root, "SELECT nope FROM embeddings", capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nope" in err


@pytest.mark.parametrize("with_sizes", [True, False], ids=["marker-with-sizes", "older-marker"])
def test_a_damaged_table_names_its_file_and_the_others_stay_queryable(root, capsys, with_sizes):
    folder = Path(root, "runs", "r1", "embeddings")
    marker = json.loads((folder / "_COMMITTED").read_text())
    if with_sizes:
        assert marker["sizes"] == [(folder / "part-00000.parquet").stat().st_size]
    else:  # a marker written before sizes were recorded: the footer check still finds it
        marker.pop("sizes", None)
        (folder / "_COMMITTED").write_text(json.dumps(marker))
    part = folder / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:-40])  # truncated
    code, _, err = _query(root, "SELECT count(*) FROM embeddings", capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"table embeddings is damaged: {part}" in err
    code, out, err = _query(root, "SELECT stage, value FROM metrics", capsys)
    assert code == 0 and out.split() == ["stage,value", "evaluate,0.5"], err


def test_run_ids_are_names_not_paths(root, capsys, tmp_path):
    other = str(tmp_path / "other")
    write_table(pa.table({"secret": [42]}), table_uri(other, "x", "t"), staging_uri(other, "x", "t"))
    for run in ("../../other/runs/x", "../x", "/abs", "a/b", ".."):
        code, out, err = _query(root, "SELECT * FROM t", capsys, "--run", run)
        assert code == 2 and "42" not in out, (run, out)
        assert err.strip().splitlines() == [f"dml-ray: error: run id {run!r} is not a name: use letters, digits, '.', "
                                            "'_' and '-', starting with a letter or digit (at most 128 characters)"]

