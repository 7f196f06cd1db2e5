"""The run handle (issue 12): ``open_run`` and the ``Run`` API enforce DESIGN.md's table contract."""
import logging
import pickle

import pyarrow as pa
import pyarrow.compute as pc
import pytest

import dml_ray
from dml_ray.config import parse_config
from dml_ray.io.run import Run, list_runs, open_run
from dml_ray.io.tables import TableExistsError


def _run(root, run_id="r1") -> Run:
    return open_run(str(root), run_id, create=True)


def test_commit_read_and_replace(tmp_path):
    run = _run(tmp_path)
    assert not run.committed("things")
    marker = run.commit("things", pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]}))
    assert marker["rows"] == 3 and run.committed("things")
    assert run.read("things", columns=["a"]).column_names == ["a"]
    assert run.read("things", filter=pc.field("a") > 1).column("b").to_pylist() == ["y", "z"]
    assert run.read("things").to_pandas()["a"].tolist() == [1, 2, 3]
    # committed tables are never appended to or silently replaced
    with pytest.raises(TableExistsError):
        run.commit("things", pa.table({"a": [9], "b": ["q"]}))
    assert run.read("things").num_rows == 3
    run.commit("things", pa.table({"a": [9], "b": ["q"]}), replace=True)
    assert run.read("things").column("a").to_pylist() == [9]


def test_parts_of_a_table_read_as_one(tmp_path):
    run = _run(tmp_path)
    run.commit("scores", pa.table({"stage": ["train"], "value": [1.0]}), part="train")
    run.commit("scores", pa.table({"stage": ["evaluate"], "value": [2.0]}), part="evaluate")
    assert run.committed("scores", "train") and not run.committed("scores", "localize")
    assert sorted(run.read("scores").column("value").to_pylist()) == [1.0, 2.0]
    assert run.read("scores", "evaluate").column("stage").to_pylist() == ["evaluate"]
    assert set(run.tables()) == {"scores"}


def test_staged_folder_is_invisible_until_committed(tmp_path):
    run = _run(tmp_path)
    staging = run.staging("sharded")
    for i in range(3):
        run.write_part(staging, pa.table({"i": [i, i]}), i)
    assert not run.committed("sharded")
    with pytest.raises(FileNotFoundError, match="no committed table"):
        run.read("sharded")
    assert run.commit("sharded", staging)["rows"] == 6
    assert sorted(run.read("sharded").column("i").to_pylist()) == [0, 0, 1, 1, 2, 2]
    other = run.staging("dropped")
    run.write_part(other, pa.table({"i": [1]}), 0)
    run.discard(other)
    assert not run.exists(other)


def test_ray_dataset_in_and_out(ray_session, tmp_path):
    run = _run(tmp_path)
    run.commit("numbers", ray_session.data.range(50))
    assert run.read("numbers").num_rows == 50
    ds = run.dataset("numbers")
    assert sorted(r["id"] for r in ds.take_all()) == list(range(50))


def test_open_latest_and_missing_runs(tmp_path):
    root = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="no runs yet"):
        open_run(root)
    first = _run(tmp_path, "a")
    first.commit("t", pa.table({"x": [1]}))
    first.update_manifest(config={"k": 1})
    first.set_latest()
    assert open_run(root).run_id == "a" and open_run(root).manifest["config"] == {"k": 1}
    with pytest.raises(FileNotFoundError, match=r"no run 'b'; runs there: a"):
        open_run(root, "b")
    _run(tmp_path, "b").commit("t", pa.table({"x": [2]}))
    assert list_runs(root) == ["a", "b"] and open_run(root, "b").read("t").column("x").to_pylist() == [2]


def test_figures_and_lock(tmp_path):
    run = _run(tmp_path)
    uri = run.write_bytes(run.path("figures", "f.png"), b"png")
    assert run.exists(uri) and run.read_bytes(uri) == b"png" and run.read_bytes(run.path("none")) is None
    from dml_ray.io.lock import LockHeld

    with run.lock():
        with pytest.raises(LockHeld):
            with run.other("r2").lock():
                pass
    with run.other("r2").lock():
        pass


def test_pickled_handle_carries_no_file_system_and_repr_no_credentials(tmp_path):
    run = Run(str(tmp_path), "r1", {"key": "AKIA-SECRET", "secret": "s3cr3t"})
    assert "s3cr3t" not in repr(run) and "AKIA" not in repr(run)
    local = _run(tmp_path)
    local.commit("t", pa.table({"x": [1]}))
    clone = pickle.loads(pickle.dumps(local))
    assert clone._fs is None and clone.read("t").column("x").to_pylist() == [1]


def test_storage_options_moved_to_storage_section(caplog):
    cfg = parse_config({"storage": {"options": {"anon": True}}})
    assert cfg.storage.options == {"anon": True}
    with caplog.at_level(logging.WARNING):
        old = parse_config({"data": {"storage_options": {"anon": True}}})
    assert old.storage.options == {"anon": True}
    assert "data.storage_options is deprecated" in caplog.text
    assert "storage_options" not in old.model_dump()["data"]
    with pytest.raises(Exception, match="both set"):
        parse_config({"data": {"storage_options": {"anon": True}}, "storage": {"options": {"anon": False}}})


def test_public_entry_point():
    assert dml_ray.open_run is open_run


def test_commit_enforces_the_table_contract(tmp_path):
    from dml_ray.io.schemas import ERRORS_SCHEMA, METRICS_SCHEMA

    run = _run(tmp_path)
    row = {"run_id": "r1", "stage": "evaluate", "split": "test", "metric": "recall", "k": 1, "value": 0.5}
    with pytest.raises(ValueError, match=r"^table metrics: missing column 'value'"):
        run.commit("metrics", pa.Table.from_pylist([row], schema=METRICS_SCHEMA).drop_columns(["value"]),
                   part="evaluate")
    with pytest.raises(ValueError, match=r"^table metrics: column 'k' is string, expected int32"):
        run.commit("metrics", pa.Table.from_pylist([{**row, "k": "1"}], schema=METRICS_SCHEMA.set(
            4, pa.field("k", pa.string()))), part="evaluate")
    with pytest.raises(ValueError, match=r"not this run's 'r1'"):
        run.commit("metrics", pa.Table.from_pylist([{**row, "run_id": "r0"}], schema=METRICS_SCHEMA), part="x")
    assert not run.committed("metrics", "evaluate") and not run.tables()
    run.commit("metrics", pa.Table.from_pylist([row], schema=METRICS_SCHEMA), part="evaluate")
    # a staged folder is checked on its files' schema before it is committed
    staging = run.staging("errors", "embed")
    run.write_part(staging, pa.table({"run_id": ["r1"], "image_id": [1]}), 0)
    with pytest.raises(ValueError, match=r"^table errors: column 'image_id' is int64, expected string"):
        run.commit("errors", staging, part="embed")
    run.commit("errors", pa.Table.from_pylist([], schema=ERRORS_SCHEMA), part="embed")
    # user tables have no contract
    run.commit("my_notes", pa.table({"anything": [1.5]}))
