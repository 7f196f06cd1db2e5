"""Checking a committed table against its ``_COMMITTED`` markers before anyone reads it.

Every file a marker lists must exist, have the size the marker recorded (markers written since
issue 11 list ``sizes``) and a readable Parquet footer, and the footers' row counts must add up
to the marker's ``rows``. Only footers are read (a few KiB per file), never the data pages.
A damaged table raises DamagedTable naming the first bad file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from dml_ray.errors import BadInput
from dml_ray.io.fs import is_local, join, url_to_fs
from dml_ray.io.tables import COMMIT_MARKER


class DamagedTable(BadInput):
    """A committed table whose files do not match its commit marker (truncated, missing or overwritten)."""


@dataclass(frozen=True)
class CommittedFile:
    """One file of a committed table, as checked: its path inside the file system, rows and schema."""

    path: str
    rows: int
    schema: pa.Schema


def _markers(fs, path: str) -> list[str]:
    direct = join(path, COMMIT_MARKER)
    if fs.exists(direct):
        return [direct]
    return sorted(fs.glob(join(path, "*", COMMIT_MARKER)))


def checked_files(uri: str, storage_options: Optional[dict] = None) -> list[CommittedFile]:
    """The files of the committed table (or of every committed part) at ``uri``, each checked against its marker.

    Raises FileNotFoundError when nothing is committed there and DamagedTable naming the file when a
    file is missing, has another size than its marker recorded, has no readable footer, or the
    rows do not add up to the marker's count.
    """
    fs, path = url_to_fs(uri, storage_options)
    markers = _markers(fs, path)
    if not markers:
        raise FileNotFoundError(f"no committed table at {uri}")

    def name(p: str) -> str:
        return p if is_local(fs) else fs.unstrip_protocol(p)

    out: list[CommittedFile] = []
    for marker in markers:
        folder = marker[: -len(COMMIT_MARKER) - 1]
        with fs.open(marker, "r") as f:
            doc = json.load(f)
        sizes = doc.get("sizes")
        listing = {entry["name"].rstrip("/"): entry.get("size") for entry in fs.ls(folder, detail=True)}
        rows = 0
        for i, file_name in enumerate(doc["files"]):
            file_path = join(folder, file_name)
            if file_path not in listing:
                raise DamagedTable(f"{name(file_path)}: missing, but the table's {COMMIT_MARKER} marker lists it")
            if sizes is not None and listing[file_path] != sizes[i]:
                raise DamagedTable(f"{name(file_path)}: {listing[file_path]} bytes, but the table's {COMMIT_MARKER} "
                                   f"marker recorded {sizes[i]} (truncated or overwritten)")
            try:
                with fs.open(file_path, "rb") as handle:
                    meta = pq.read_metadata(handle)
            except (OSError, pa.ArrowException) as err:
                reason = " ".join(str(err).split())[:160]
                raise DamagedTable(f"{name(file_path)}: not a readable Parquet file ({reason})") from None
            rows += meta.num_rows
            out.append(CommittedFile(file_path, meta.num_rows, meta.schema.to_arrow_schema()))
        if "rows" in doc and rows != doc["rows"]:
            raise DamagedTable(f"{name(folder)}: its files hold {rows} rows, but its {COMMIT_MARKER} marker recorded "
                               f"{doc['rows']}")
    return out
