"""One handle for a run (DESIGN.md "Using a run"): where its tables live, how to reach them, how to commit.

    run = open_run("demo_out")                  # the latest run of an output root
    run.read("embeddings", columns=["image_id", "embedding"]).to_pandas()
    run.dataset("embeddings")                   # a Ray Dataset over the committed files
    run.commit("neighbors", table)              # staged, then committed atomically (io/tables.py)

The file system is resolved once from the output root and the storage options and travels with the
handle when it is pickled into Ray tasks. Every path a stage reads or writes is derived here: stages
never build a table path or call ``url_to_fs`` themselves. The storage options (credentials) are never
part of the handle's ``repr``.
"""
from __future__ import annotations

import logging
import uuid
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Optional, Union

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dml_ray.config import validate_run_id
from dml_ray.io import schemas, tables
from dml_ray.io.fs import is_local, join, url_to_fs
from dml_ray.io.lock import output_lock

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

TableLike = Union[pa.Table, "ray.data.Dataset"]


@dataclass(eq=False)
class Run:
    """A run of an output root: ``<output_root>/runs/<run_id>/``, its tables, manifest, lock and figures."""

    output_root: str
    run_id: str
    storage_options: Optional[dict] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        validate_run_id(self.run_id)
        self.storage_options = dict(self.storage_options) if self.storage_options else None
        self._fs: Optional[fsspec.AbstractFileSystem] = None

    def __repr__(self) -> str:
        return f"Run(output_root={self.output_root!r}, run_id={self.run_id!r})"

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fs"] = None  # re-resolved on first use in the process that unpickles it
        state.pop("_index", None)  # the search index and model are reloaded where needed
        state.pop("_embedder", None)
        return state

    # ---- where things are ----
    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The fsspec file system of the output root (resolved once)."""
        if self._fs is None:
            self._fs = url_to_fs(self.output_root, self.storage_options)[0]
        return self._fs

    @property
    def uri(self) -> str:
        """URI of the run's folder."""
        return tables.run_uri(self.output_root, self.run_id)

    @property
    def train_storage(self) -> str:
        """Where Ray Train keeps this run's per-epoch checkpoints (``<output_root>/_train/<run_id>``)."""
        return join(self.output_root, "_train", self.run_id)

    def path(self, *parts: str) -> str:
        """URI of a file or folder inside the run's folder (figures, the report, logs, the model)."""
        return join(self.uri, *parts)

    def table_uri(self, name: str, part: Optional[str] = None) -> str:
        """URI of one table (or one stage's part of a table several stages write: metrics, errors)."""
        return tables.table_uri(self.output_root, self.run_id, name, part)

    def staging(self, name: str, part: Optional[str] = None) -> str:
        """A fresh staging folder for writing ``name``; nothing reads it until it is committed."""
        return tables.staging_uri(self.output_root, self.run_id, name, part)

    def fs_path(self, uri: str) -> str:
        """The path inside :attr:`fs` of a URI under this output root."""
        return self.fs._strip_protocol(uri)

    def pyarrow_fs(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """A pyarrow file system and path for a URI under this output root (for Ray Data and pyarrow writers)."""
        if is_local(self.fs):
            return pafs.LocalFileSystem(), self.fs_path(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs)), self.fs_path(uri)

    # ---- tables ----
    def committed(self, name: str, part: Optional[str] = None) -> bool:
        """Whether the table (or its ``part``) is committed."""
        return tables.is_committed(self.table_uri(name, part), self.storage_options)

    def tables(self) -> dict[str, str]:
        """Names and URIs of the run's committed tables."""
        return tables.committed_tables(self.output_root, self.run_id, self.storage_options)

    def files(self, name: str, part: Optional[str] = None) -> list[str]:
        """Paths (inside :attr:`fs`) of the committed files of a table, or of all its committed parts."""
        return tables.committed_files(self.table_uri(name, part), self.storage_options)

    def read(self, name: str, part: Optional[str] = None, columns: Optional[list[str]] = None,
             filter: Optional[Any] = None) -> pa.Table:  # noqa: A002 - the name users expect
        """A committed table as Arrow (``.to_pandas()`` for a frame); ``filter`` as pyarrow.parquet takes it."""
        return tables.read_table(self.table_uri(name, part), self.storage_options, columns=columns, filters=filter)

    def dataset(self, name: str, part: Optional[str] = None, columns: Optional[list[str]] = None):
        """A Ray Dataset over the committed files of a table (nothing uncommitted is ever read)."""
        import ray

        files = self.files(name, part)
        fs, _ = self.pyarrow_fs(self.output_root)
        return ray.data.read_parquet(files, filesystem=fs, columns=columns)

    def commit(self, name: str, data: Union[TableLike, str], part: Optional[str] = None,
               replace: bool = False) -> dict[str, Any]:
        """Commit an Arrow table, a Ray Dataset, or an already written staging folder (a URI from
        :meth:`staging`) as ``name`` (``part``). Raises TableExistsError if it is committed, unless ``replace``."""
        final = self.table_uri(name, part)
        if isinstance(data, pa.Table):
            self._check(name, data)
            return tables.write_table(data, final, self.staging(name, part), self.storage_options, replace=replace)
        staging = data if isinstance(data, str) else self.staging(name, part)
        if not isinstance(data, str):
            fs, path = self.pyarrow_fs(staging)
            data.write_parquet(path, filesystem=fs)
        files = sorted(p for p in self.fs.find(self.fs_path(staging)) if p.endswith(".parquet"))
        if files:
            with self.fs.open(files[0], "rb") as f:
                schemas.check_contract(name, pq.read_schema(f))
        return tables.commit_table(staging, final, self.storage_options, replace=replace)

    def _check(self, name: str, table: pa.Table) -> None:
        """DESIGN.md's table contract: the table's columns and types, and every row carrying this run's id."""
        schemas.check_contract(name, table.schema)
        if "run_id" in table.column_names and table.num_rows:
            ids = table.column("run_id").unique().to_pylist()
            if ids != [self.run_id]:
                raise ValueError(f"table {name}: rows carry run_id {sorted(map(str, ids))[:3]}, "
                                 f"not this run's {self.run_id!r}")

    def write_part(self, staging: str, table: pa.Table, index: int) -> None:
        """Write one Parquet file of a staged table (sharded writers: one call per shard, then :meth:`commit`)."""
        fs, path = self.pyarrow_fs(staging)
        fs.create_dir(path, recursive=True)
        pq.write_table(table, f"{path}/part-{index:05d}.parquet", filesystem=fs, row_group_size=tables.row_group_rows(table),
                       use_dictionary=tables.dictionary_columns(table.schema))

    def discard(self, staging: str) -> None:
        """Remove a staging folder that will not be committed."""
        path = self.fs_path(staging)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def committed_at(self, name: str) -> str:
        """When a table was committed (ISO time from its marker)."""
        return tables.committed_at(self.table_uri(name), self.storage_options)

    # ---- files: figures, report, model ----
    def exists(self, uri: str) -> bool:
        """Whether a file or folder exists (a URI from :meth:`path`)."""
        return self.fs.exists(self.fs_path(uri))

    def write_bytes(self, uri: str, data: bytes) -> str:
        """Write a file (a URI from :meth:`path`) whole or not at all: through a temporary file and a rename on a
        local file system, one PUT on object stores. Returns the URI."""
        path = self.fs_path(uri)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if is_local(self.fs):
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        else:
            self.fs.pipe_file(path, data)
        return uri

    def read_bytes(self, uri: str) -> Optional[bytes]:
        """A file's bytes, or None if it does not exist."""
        path = self.fs_path(uri)
        return self.fs.cat_file(path) if self.fs.exists(path) else None

    def read_input(self, uri: str) -> bytes:
        """The bytes of an input the run reads (an image of the dataset, a checkpoint), wherever it lives,
        with the run's storage options."""
        fs, path = url_to_fs(uri, self.storage_options)
        return fs.cat_file(path)

    def input_exists(self, uri: str) -> bool:
        """Whether an input the run reads exists, wherever it lives (see :meth:`read_input`)."""
        fs, path = url_to_fs(uri, self.storage_options)
        return fs.exists(path)

    # ---- manifest, lock, latest ----
    @property
    def manifest(self) -> dict:
        """The run's manifest.json (config, versions, git sha, per-stage outputs and timings); {} before any."""
        return tables.read_json(self.path(tables.MANIFEST), self.storage_options) or {}

    def update_manifest(self, **fields: Any) -> dict:
        """Merge ``fields`` into the manifest (``stages`` entries are merged per stage)."""
        return tables.update_manifest(self.output_root, self.run_id, self.storage_options, **fields)

    def lock(self) -> AbstractContextManager[dict]:
        """The output root's writer lock, held for the block (io/lock.py)."""
        return output_lock(self.output_root, self.run_id, self.storage_options)

    def set_latest(self) -> None:
        """Point the output root's ``latest`` at this run unconditionally (see :meth:`advance_latest`)."""
        tables.set_latest(self.output_root, self.run_id, self.storage_options)

    def advance_latest(self, ran: bool) -> bool:
        """Move ``latest`` to this run only forward (io/tables.py ``advance_latest``); whether it moved."""
        return tables.advance_latest(self.output_root, self.run_id, ran, self.storage_options)

    def clean_staging(self) -> int:
        """Remove the output root's staging leftovers (hold :meth:`lock`); how many folders went."""
        return tables.clean_staging(self.output_root, self.storage_options)

    def other(self, run_id: str) -> "Run":
        """Another run of the same output root, sharing this handle's file system."""
        run = Run(self.output_root, run_id, self.storage_options)
        run._fs = self._fs
        return run

    def runs(self) -> list[str]:
        """Ids of the output root's runs that have at least one committed table."""
        return list_runs(self.output_root, self.storage_options)

    # ---- search ----
    def search(self, queries: Any, k: int = 10, rebuild: bool = False) -> pa.Table:
        """Top ``k`` of the run's embeddings for each query: an (n, d) array of vectors, or images (PIL images,
        paths or URIs, embedded with the run's checkpoint). Columns: query, rank, image_id, label, split, score
        (cosine similarity, or squared L2 for ``knn.metric: euclidean``). The faiss index is built on first use
        and saved under ``index/`` (dml_ray/explore/index.py)."""
        from dml_ray.explore.index import is_vectors, run_checkpoint, run_index
        from dml_ray.explore.model import load_model

        if rebuild or getattr(self, "_index", None) is None:
            self._index = run_index(self, rebuild=rebuild)
        if not is_vectors(queries):
            if getattr(self, "_embedder", None) is None:
                self._embedder = load_model(run_checkpoint(self), self.storage_options)
            queries = self._embedder.embed(queries)
        return self._index.search(queries, k)

    def exists_run(self) -> bool:
        """Whether the run has a manifest or at least one committed table."""
        return self.exists(self.path(tables.MANIFEST)) or bool(self.tables())


def storage_options_of(storage: Any) -> Optional[dict]:
    """Storage options from a ``StorageConfig``, a ``RunConfig``, a mapping, or None."""
    if storage is None:
        return None
    if hasattr(storage, "storage"):  # a RunConfig
        storage = storage.storage
    options = getattr(storage, "options", storage)
    if not isinstance(options, dict):
        raise TypeError(f"storage: expected a StorageConfig, a RunConfig or a dict, got {type(storage).__name__}")
    return dict(options) or None


def list_runs(output_root: str, storage: Any = None) -> list[str]:
    """Ids of the runs under ``output_root`` that have at least one committed table, sorted."""
    return tables.run_ids(output_root, storage_options_of(storage))


def open_run(output_root: str, run_id: Optional[str] = None, storage: Any = None, create: bool = False) -> Run:
    """Open a run of ``output_root``: ``run_id``, or the one ``latest`` names when it is None.

    ``storage`` is a ``StorageConfig`` (or a RunConfig, or a plain dict of fsspec storage options: credentials,
    endpoint). Unless ``create``, the run must exist (a manifest or a committed table); a missing one raises
    FileNotFoundError naming the runs there are.
    """
    options = storage_options_of(storage)
    if run_id is None:
        run_id = tables.latest_run(output_root, options)
        if run_id is None:
            raise FileNotFoundError(f"{output_root}: no runs yet (no 'latest' pointer); pass a run id")
    run = Run(output_root, run_id, options)
    if not create and not run.exists_run():
        known = list_runs(output_root, options)
        raise FileNotFoundError(f"{output_root}: no run {run_id!r}; runs there: {', '.join(known) or 'none'}")
    return run


def runs_of(output_root: str, run_ids: Iterable[str], storage: Any = None) -> list[Run]:
    """Handles of several runs of one output root sharing one file system."""
    ids = list(run_ids)
    if not ids:
        return []
    first = open_run(output_root, ids[0], storage)
    return [first, *(first.other(r) for r in ids[1:])]


__all__ = ["Run", "open_run", "list_runs", "runs_of", "storage_options_of"]
