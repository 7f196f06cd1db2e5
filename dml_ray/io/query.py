"""DuckDB over committed tables, read-only and confined to them: one view per table, named after it.

Every view has a ``run_id`` column. By default the views show one run (the ``latest`` pointer's);
with ``all_runs`` they show every run of the output root, one UNION ALL BY NAME of the runs.

The sandbox (DuckDB 2.0; its "Securing DuckDB" page): the committed files a marker lists are
checked (dml_ray/io/integrity.py) and handed to DuckDB as Arrow datasets, so DuckDB itself never
opens a path; the views are created first, then ``enable_external_access=false`` (no file or
network access of DuckDB's own: no COPY TO, ATTACH of a file, read_csv / read_text / glob of
any path, INSTALL), ``autoinstall_known_extensions=false``, ``autoload_known_extensions=false``,
``python_enable_replacements=false`` (no scans of the caller's Python variables) and
``lock_configuration=true`` (no SET can undo them). We do not use ``allowed_paths``: DuckDB lets
``COPY ... TO`` write to an allowed path. ``run_read_only`` also refuses every statement but a
query (SELECT / WITH / FROM / VALUES / DESCRIBE / SHOW / SUMMARIZE / EXPLAIN), so nothing changes
even in the connection's own in-memory catalog. The same holds for S3 roots: s3fs reads the
files for Arrow, DuckDB needs no external access (and no httpfs extension) for them.

A table whose files do not match its marker gets a view that fails with one line naming the
file; the other tables stay queryable.
"""
from __future__ import annotations

import logging
from typing import Optional

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from dml_ray.errors import BadInput
from dml_ray.io.integrity import DamagedTable, checked_files
from dml_ray.io.run import Run, list_runs, open_run, runs_of

log = logging.getLogger(__name__)

# the settings that close the connection, in this order, once the views exist
SANDBOX_SETTINGS = (
    ("python_enable_replacements", "false"),
    ("enable_external_access", "false"),
    ("autoinstall_known_extensions", "false"),
    ("autoload_known_extensions", "false"),
    ("lock_configuration", "true"),
)

READ_ONLY_STATEMENTS = (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN)


class QueryRefused(BadInput):
    """A statement the read-only query engine does not run."""


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def _duckdb_type(arrow_type: pa.DataType) -> pa.DataType:
    """``arrow_type`` with float16 (feature maps) widened to float32: DuckDB's Arrow scan has no half floats."""
    if pa.types.is_float16(arrow_type):
        return pa.float32()
    if pa.types.is_fixed_size_list(arrow_type):
        return pa.list_(_duckdb_type(arrow_type.value_type), arrow_type.list_size)
    if pa.types.is_large_list(arrow_type):
        return pa.large_list(_duckdb_type(arrow_type.value_type))
    if pa.types.is_list(arrow_type):
        return pa.list_(_duckdb_type(arrow_type.value_type))
    if pa.types.is_struct(arrow_type):
        return pa.struct([f.with_type(_duckdb_type(f.type)) for f in arrow_type])
    return arrow_type


def _run_dataset(run: Run, name: str) -> pads.Dataset:
    """The checked files of one run's table as one Arrow dataset (schemas of the parts unified; half floats
    read as float32)."""
    files = checked_files(run.table_uri(name), run.storage_options)
    fs, _ = run.pyarrow_fs(run.output_root)
    schema = pa.unify_schemas([f.schema for f in files], promote_options="permissive")
    schema = pa.schema([f.with_type(_duckdb_type(f.type)) for f in schema], metadata=schema.metadata)
    return pads.dataset([f.path for f in files], schema=schema, format="parquet", filesystem=fs)


def connect(output_root: str, run_id: Optional[str] = None, storage_options: Optional[dict] = None,
            all_runs: bool = False) -> tuple[duckdb.DuckDBPyConnection, list[str]]:
    """A sandboxed DuckDB connection with a view per committed table of ``run_id`` (default: the latest run), or
    of every run with ``all_runs``; returns the connection and the runs the views cover. Run queries on it with
    ``run_read_only``."""
    if all_runs:
        runs = runs_of(output_root, list_runs(output_root, storage_options), storage_options)
        if not runs:
            raise FileNotFoundError(f"{output_root}: no runs with committed tables")
    else:
        runs = [open_run(output_root, run_id, storage_options)]
    return connect_runs(runs)


def connect_runs(runs: list[Run]) -> tuple[duckdb.DuckDBPyConnection, list[str]]:
    """The sandboxed connection over the committed tables of ``runs`` (handles of one output root)."""
    tables: dict[str, list[Run]] = {}
    for run in runs:
        for name in run.tables():
            tables.setdefault(name, []).append(run)
    if not tables:
        raise FileNotFoundError(f"{runs[0].output_root}: run {runs[0].run_id!r} has no committed tables")
    con = duckdb.connect()
    for index, (name, by_run) in enumerate(sorted(tables.items())):
        try:
            selects = []
            for number, run in enumerate(sorted(by_run, key=lambda r: r.run_id)):
                dataset = _run_dataset(run, name)
                source = f"_{name}_{index}_{number}"
                con.register(source, dataset)
                has_run_id = "run_id" in dataset.schema.names
                selects.append(f"SELECT * FROM {_ident(source)}" if has_run_id
                               else f"SELECT {_quote(run.run_id)} AS run_id, * FROM {_ident(source)}")
            con.execute(f"CREATE VIEW {_ident(name)} AS " + " UNION ALL BY NAME ".join(selects))
        except DamagedTable as err:
            log.debug("table %s is damaged: %s", name, err)
            message = f"table {name} is damaged: {err}"
            con.execute(f"CREATE VIEW {_ident(name)} AS SELECT * FROM (SELECT NULL AS run_id) "
                        f"WHERE error({_quote(message)}) IS NULL")
    for setting, value in SANDBOX_SETTINGS:
        con.execute(f"SET {setting} = {value}")
    return con, [r.run_id for r in runs]


def run_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> Optional[duckdb.DuckDBPyRelation]:
    """Run one query on a ``connect`` connection; QueryRefused (one line) for anything but a single query."""
    statements = con.extract_statements(sql)
    if len(statements) != 1:
        raise QueryRefused(f"query refused: {len(statements)} statements; the query engine runs exactly one query")
    kind = statements[0].type
    if kind not in READ_ONLY_STATEMENTS:
        raise QueryRefused(f"query refused: {kind.name} statements are not allowed; the query engine is read-only "
                           "(SELECT, WITH, FROM, VALUES, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN)")
    return con.sql(sql)
