"""Run layout and atomic table commits (DESIGN.md "Runs, commits, incremental nightly jobs").

    <output_root>/runs/<run_id>/<table>/part-*.parquet + _COMMITTED
    <output_root>/_staging/<run_id>/<table>-<token>/...      never read by anyone

A table is committed iff its ``_COMMITTED`` marker exists; the marker lists the table's files and
is written last. On a local file system the staging folder is renamed into place first (atomic);
on object stores the files are copied, then the marker is written. Readers see committed files only.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from dml_ray.io.fs import is_local, join, pyarrow_fs, url_to_fs

log = logging.getLogger(__name__)

COMMIT_MARKER = "_COMMITTED"
MANIFEST = "manifest.json"
LATEST = "latest"


class TableExistsError(RuntimeError):
    """A table is already committed; committing again would duplicate or replace its rows."""


def run_uri(output_root: str, run_id: str) -> str:
    """URI of one run's folder."""
    return join(output_root, "runs", run_id)


def table_uri(output_root: str, run_id: str, table: str, part: Optional[str] = None) -> str:
    """URI of one table of a run; tables several stages write (metrics, errors) have one part per stage."""
    return join(run_uri(output_root, run_id), table, *([part] if part else []))


def staging_uri(output_root: str, run_id: str, table: str, part: Optional[str] = None) -> str:
    """A fresh staging folder for writing ``table``; nothing reads it until it is committed."""
    name = f"{table}-{part}" if part else table
    return join(output_root, "_staging", run_id, f"{name}-{uuid.uuid4().hex[:12]}")


def is_committed(uri: str, storage_options: Optional[dict] = None) -> bool:
    """Whether the table folder ``uri`` holds a committed table."""
    fs, path = url_to_fs(uri, storage_options)
    return fs.exists(join(path, COMMIT_MARKER))


def _data_files(fs, path: str) -> list[str]:
    if not fs.exists(path):
        return []
    return sorted(p for p in fs.find(path) if p.endswith(".parquet"))


def commit_table(staging: str, final: str, storage_options: Optional[dict] = None,
                 replace: bool = False) -> dict[str, Any]:
    """Move the Parquet files under ``staging`` into ``final`` and write the commit marker last.

    Raises TableExistsError if ``final`` is already committed, unless ``replace`` (then the old
    table is uncommitted first). A leftover, uncommitted ``final`` from a crashed attempt is removed.
    """
    fs, src = url_to_fs(staging, storage_options)
    _, dst = url_to_fs(final, storage_options)
    if fs.exists(join(dst, COMMIT_MARKER)):
        if not replace:
            raise TableExistsError(f"table already committed: {final}")
        fs.rm(join(dst, COMMIT_MARKER))
    files = _data_files(fs, src)
    rows = 0
    for f in files:
        with fs.open(f, "rb") as handle:
            rows += pq.ParquetFile(handle).metadata.num_rows
    if fs.exists(dst):
        log.warning("removing uncommitted leftovers at %s", final)
        fs.rm(dst, recursive=True)
    names = [f"part-{i:05d}.parquet" for i in range(len(files))]
    if is_local(fs):
        fs.makedirs(src, exist_ok=True)
        fs.makedirs(dst.rstrip("/").rsplit("/", 1)[0], exist_ok=True)
        fs.mv(src, dst, recursive=True)
        # through temporary names: a staged file may already be called like another file's final name
        moved = [join(dst, f".renaming-{i:05d}") for i in range(len(files))]
        for old, tmp in zip(files, moved):
            fs.mv(join(dst, old[len(src):]), tmp)
        for tmp, new in zip(moved, names):
            fs.mv(tmp, join(dst, new))
        for p in fs.find(dst, withdirs=True)[::-1]:
            if fs.isdir(p) and p.rstrip("/") != dst.rstrip("/") and not fs.ls(p):
                fs.rmdir(p)
    else:
        for old, new in zip(files, names):
            fs.copy(old, join(dst, new))
    sizes = [fs.size(join(dst, n)) for n in names]
    marker = {"files": names, "rows": rows, "sizes": sizes,
              "committed_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    with fs.open(join(dst, COMMIT_MARKER), "w") as f:
        json.dump(marker, f)
    if fs.exists(src):
        fs.rm(src, recursive=True)
    log.info("committed %s (%d rows, %d files)", final, rows, len(names))
    return marker


def committed_files(uri: str, storage_options: Optional[dict] = None) -> list[str]:
    """Paths (inside the file system) of a committed table's files, or of all its committed parts."""
    fs, path = url_to_fs(uri, storage_options)
    markers = [join(path, COMMIT_MARKER)] if fs.exists(join(path, COMMIT_MARKER)) else sorted(
        p for p in fs.glob(join(path, "*", COMMIT_MARKER)))
    if not markers:
        raise FileNotFoundError(f"no committed table at {uri}")
    files = []
    for marker in markers:
        with fs.open(marker, "r") as f:
            folder = marker[: -len(COMMIT_MARKER) - 1]
            files += [join(folder, n) for n in json.load(f)["files"]]
    return files


def read_table(uri: str, storage_options: Optional[dict] = None, columns: Optional[list[str]] = None,
               filters: Optional[Any] = None) -> pa.Table:
    """Read a committed table (only the files its marker lists); ``filters`` as pyarrow.parquet takes them."""
    files = committed_files(uri, storage_options)
    fs, _ = url_to_fs(uri, storage_options)
    if not files:
        raise ValueError(f"committed table {uri} has no files")
    tables = []
    for f in files:
        try:
            with fs.open(f, "rb") as handle:
                tables.append(pq.read_table(handle, columns=columns, filters=filters))
        except pa.ArrowInvalid as err:
            if _readable_footer(fs, f):
                raise
            raise ValueError(f"{f}: damaged file of the committed table {uri} ({' '.join(str(err).split())[:160]})") \
                from None
    return pa.concat_tables(tables, promote_options="permissive")


def _readable_footer(fs, path: str) -> bool:
    try:
        with fs.open(path, "rb") as handle:
            pq.read_metadata(handle)
        return True
    except (OSError, pa.ArrowException):
        return False


# Parquet row groups of about this many bytes: a reader of a few rows (the explorer's feature maps, serve/
# feature_store.py) decodes one group, not the file, and row-group statistics can prune filtered scans
ROW_GROUP_BYTES = 4 * 1024 * 1024


def row_group_rows(table: pa.Table, target_bytes: int = ROW_GROUP_BYTES) -> int:
    """Rows per Parquet row group so that one holds about ``target_bytes`` of ``table`` (at least 1 row)."""
    per_row = table.nbytes / max(1, table.num_rows)
    return max(1, int(target_bytes // max(per_row, 1.0)))


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns worth dictionary encoding: all but float tensors (list<float*>). Tensor values rarely repeat,
    and a float16 column's dictionary never overflows (65536 values at most), so its pages stayed dictionary
    encoded and decoded 4 x slower than plain ones (a feature-map row group: 42 vs 10 ms)."""
    def tensor(t: pa.DataType) -> bool:
        listed = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
        return listed and pa.types.is_floating(t.value_type)

    return [f.name for f in schema if not tensor(f.type)]


def write_table(table: pa.Table, final: str, staging: str, storage_options: Optional[dict] = None,
                replace: bool = False) -> dict[str, Any]:
    """Write a driver-side Arrow table to ``staging`` and commit it to ``final``."""
    fs, path = pyarrow_fs(staging, storage_options)
    fs.create_dir(path, recursive=True)
    pq.write_table(table, f"{path}/part-00000.parquet", filesystem=fs, row_group_size=row_group_rows(table),
                   use_dictionary=dictionary_columns(table.schema))
    return commit_table(staging, final, storage_options, replace=replace)


def read_json(uri: str, storage_options: Optional[dict] = None) -> Optional[dict]:
    """Read a JSON document, or None if it does not exist."""
    fs, path = url_to_fs(uri, storage_options)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


def write_json(uri: str, doc: dict, storage_options: Optional[dict] = None) -> None:
    """Write a JSON document through a temporary file and a rename where the store allows it."""
    fs, path = url_to_fs(uri, storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    text = json.dumps(doc, indent=2, sort_keys=True, default=str)
    if is_local(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open(tmp, "w") as f:
            f.write(text)
        fs.mv(tmp, path)
    else:
        with fs.open(path, "w") as f:
            f.write(text)


def update_manifest(output_root: str, run_id: str, storage_options: Optional[dict] = None, **fields: Any) -> dict:
    """Merge ``fields`` into a run's manifest.json (``stages`` entries are merged per stage)."""
    uri = join(run_uri(output_root, run_id), MANIFEST)
    doc = read_json(uri, storage_options) or {"run_id": run_id, "stages": {}}
    stages = fields.pop("stages", {})
    doc.update(fields)
    doc.setdefault("stages", {}).update(stages)
    write_json(uri, doc, storage_options)
    return doc


def set_latest(output_root: str, run_id: str, storage_options: Optional[dict] = None) -> None:
    """Point ``<output_root>/latest`` at ``run_id`` (done last in a run)."""
    write_json(join(output_root, LATEST), {"run_id": run_id}, storage_options)


def run_started_at(output_root: str, run_id: str, storage_options: Optional[dict] = None) -> Optional[str]:
    """When a run first committed a table (the earliest ``committed_at`` of its markers), or None."""
    fs, path = url_to_fs(run_uri(output_root, run_id), storage_options)
    markers = fs.glob(join(path, "*", COMMIT_MARKER)) + fs.glob(join(path, "*", "*", COMMIT_MARKER))
    times = []
    for marker in markers:
        with fs.open(marker, "r") as f:
            times.append(dt.datetime.fromisoformat(json.load(f)["committed_at"]))
    return min(times).isoformat() if times else None


def advance_latest(output_root: str, run_id: str, ran: bool, storage_options: Optional[dict] = None) -> bool:
    """Point ``latest`` at ``run_id`` only forward: never when this run did nothing new (``ran`` false) and never
    back to a run that started before the current latest one (runs ordered by their first commit, so re-running
    an older night leaves ``latest`` alone). Returns whether it moved; an unmoved pointer is not rewritten."""
    current = latest_run(output_root, storage_options)
    if current == run_id:
        return False
    if current is not None:
        if not ran:
            log.info("latest stays at %s: run %s ran no stage", current, run_id)
            return False
        theirs = run_started_at(output_root, current, storage_options)
        ours = run_started_at(output_root, run_id, storage_options)
        if theirs is not None and ours is not None and ours < theirs:
            log.info("latest stays at %s: run %s started before it", current, run_id)
            return False
    set_latest(output_root, run_id, storage_options)
    return True


def clean_staging(output_root: str, storage_options: Optional[dict] = None) -> int:
    """Remove every ``_staging`` leftover of the output root (call it holding the root's lock: then no writer is
    using them); returns how many staging folders held files (the empty folders a finished run leaves are no
    leftovers and are removed without a warning)."""
    fs, path = url_to_fs(join(output_root, "_staging"), storage_options)
    if not fs.exists(path):
        return 0
    leftovers = [entry for entry in fs.ls(path, detail=False) if fs.find(entry)]
    if leftovers:
        log.warning("removing %d staging leftovers of interrupted runs under %s", len(leftovers),
                    join(output_root, "_staging"))
    fs.rm(path, recursive=True)
    return len(leftovers)


def latest_run(output_root: str, storage_options: Optional[dict] = None) -> Optional[str]:
    """The run the ``latest`` pointer names, or None."""
    doc = read_json(join(output_root, LATEST), storage_options)
    return doc["run_id"] if doc else None


def committed_tables(output_root: str, run_id: str, storage_options: Optional[dict] = None) -> dict[str, str]:
    """Names and URIs of a run's tables that are committed (whole, or in at least one part)."""
    fs, path = url_to_fs(run_uri(output_root, run_id), storage_options)
    if not fs.exists(path):
        return {}
    out = {}
    for p in fs.ls(path, detail=False):
        if fs.exists(join(p, COMMIT_MARKER)) or fs.glob(join(p, "*", COMMIT_MARKER)):
            name = p.rstrip("/").rsplit("/", 1)[-1]
            out[name] = table_uri(output_root, run_id, name)
    return out


def run_ids(output_root: str, storage_options: Optional[dict] = None) -> list[str]:
    """Ids of the runs under ``output_root`` that have at least one committed table, sorted."""
    fs, path = url_to_fs(join(output_root, "runs"), storage_options)
    if not fs.exists(path):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    return sorted(n for n in names if committed_tables(output_root, n, storage_options))


def committed_at(uri: str, storage_options: Optional[dict] = None) -> str:
    """When the table at ``uri`` was committed (ISO time from its marker)."""
    return read_json(join(uri, COMMIT_MARKER), storage_options)["committed_at"]
