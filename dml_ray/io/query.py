"""DuckDB over committed tables: one view per table, named after it, over the files its markers list.

Every view has a ``run_id`` column. By default the views show one run (the ``latest`` pointer's);
with ``all_runs`` they show every run of the output root, one UNION ALL BY NAME of the runs.
"""
from __future__ import annotations

from typing import Optional

import duckdb

from dml_ray.io.fs import is_local, url_to_fs
from dml_ray.io.tables import committed_files, committed_tables, latest_run, run_ids


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _run_select(con: duckdb.DuckDBPyConnection, files: list[str], run_id: str) -> str:
    """SELECT over one run's files of a table, adding ``run_id`` where the table does not carry it (images)."""
    source = f"read_parquet([{', '.join(_quote(f) for f in files)}], union_by_name = true)"
    has_run_id = "run_id" in con.sql(f"SELECT * FROM {source} LIMIT 0").columns
    return f"SELECT * FROM {source}" if has_run_id else f"SELECT {_quote(run_id)} AS run_id, * FROM {source}"


def connect(output_root: str, run_id: Optional[str] = None, storage_options: Optional[dict] = None,
            all_runs: bool = False) -> tuple[duckdb.DuckDBPyConnection, list[str]]:
    """A DuckDB connection with a view per committed table of ``run_id`` (default: the latest run), or of every
    run with ``all_runs``; returns the connection and the runs the views cover."""
    if all_runs:
        runs = run_ids(output_root, storage_options)
        if not runs:
            raise FileNotFoundError(f"{output_root}: no runs with committed tables")
    else:
        run_id = run_id or latest_run(output_root, storage_options)
        if run_id is None:
            raise FileNotFoundError(f"{output_root}: no runs yet (no 'latest' pointer); pass a run id")
        runs = [run_id]
    tables: dict[str, dict[str, str]] = {}
    for run in runs:
        for name, uri in committed_tables(output_root, run, storage_options).items():
            tables.setdefault(name, {})[run] = uri
    if not tables:
        raise FileNotFoundError(f"{output_root}: run {run_id!r} has no committed tables")
    con = duckdb.connect()
    fs, _ = url_to_fs(output_root, storage_options)
    prefix = ""
    if not is_local(fs):
        con.register_filesystem(fs)
        prefix = f"{fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol}://"
    for name, by_run in sorted(tables.items()):
        selects = [_run_select(con, [prefix + f for f in committed_files(uri, storage_options)], run)
                   for run, uri in sorted(by_run.items())]
        con.execute(f'CREATE VIEW "{name}" AS ' + " UNION ALL BY NAME ".join(selects))
    return con, runs
