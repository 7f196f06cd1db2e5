"""DuckDB over committed tables: one view per table, named after it, over the files its markers list."""
from __future__ import annotations

from typing import Optional

import duckdb

from dml_ray.io.fs import is_local, url_to_fs
from dml_ray.io.tables import committed_files, committed_tables, latest_run


def connect(output_root: str, run_id: Optional[str] = None,
            storage_options: Optional[dict] = None) -> tuple[duckdb.DuckDBPyConnection, str]:
    """A DuckDB connection with a view per committed table of ``run_id`` (default: the latest run)."""
    run_id = run_id or latest_run(output_root, storage_options)
    if run_id is None:
        raise FileNotFoundError(f"{output_root}: no runs yet (no 'latest' pointer); pass a run id")
    tables = committed_tables(output_root, run_id, storage_options)
    if not tables:
        raise FileNotFoundError(f"{output_root}: run {run_id!r} has no committed tables")
    con = duckdb.connect()
    fs, _ = url_to_fs(output_root, storage_options)
    prefix = ""
    if not is_local(fs):
        con.register_filesystem(fs)
        prefix = f"{fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol}://"
    for name, uri in sorted(tables.items()):
        files = [prefix + f for f in committed_files(uri, storage_options)]
        listing = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
        con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM read_parquet([{listing}], union_by_name = true)')
    return con, run_id
