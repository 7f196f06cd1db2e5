"""Incremental embedding (DESIGN.md "Runs, commits, incremental nightly jobs").

An image whose (image_id, content hash, model_id) an earlier committed run of the same output root
embedded is copied from that run's tables, not recomputed. Every run's ``embedding_keys`` table
holds the key of each row it has and the run that computed it; since a run copies what it reuses,
the newest earlier run usually answers for every unchanged image.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import ray

from dml_ray.data.batches import fetch_bytes
from dml_ray.data.content_hash import add_content_hash
from dml_ray.io.fs import join, pyarrow_fs
from dml_ray.io.schemas import EMBEDDING_KEYS_SCHEMA
from dml_ray.io.tables import committed_at, committed_files, is_committed, read_table, run_ids, table_uri

log = logging.getLogger(__name__)

KEYS_TABLE = "embedding_keys"
READ_CPUS = 0.5
ROWS_PER_FILE = 100_000


@dataclass(frozen=True)
class ReusePlan:
    """What an embed run copies: the reused rows' keys (with this run's id) and where each comes from."""

    keys: pa.Table = field(default_factory=EMBEDDING_KEYS_SCHEMA.empty_table)
    sources: dict[str, list[str]] = field(default_factory=dict)

    def image_ids(self) -> set[str]:
        """Ids of every reused image."""
        return set(self.keys.column("image_id").to_pylist())


def _hash_batch(batch: pa.Table, storage_options: Optional[dict]) -> pa.Table:
    return add_content_hash(fetch_bytes(batch, storage_options)).select(["image_id", "content_hash"])


def hash_images(images: pa.Table, storage_options: Optional[dict], batch_size: int) -> pa.Table:
    """(image_id, content_hash) of every image, read on Ray Data; the hash is null where the read failed."""
    n_blocks = max(1, min(images.num_rows // batch_size, 64))
    ds = ray.data.from_arrow(images.select(["image_id", "uri"])).repartition(n_blocks)
    ds = ds.map_batches(_hash_batch, fn_kwargs={"storage_options": storage_options}, batch_format="pyarrow",
                        batch_size=batch_size, num_cpus=READ_CPUS)
    return pa.concat_tables(ray.get(ds.to_arrow_refs()))


def source_runs(output_root: str, run_id: str, tables: list[str], storage_options: Optional[dict]) -> list[str]:
    """Earlier runs with ``embedding_keys`` and every table of ``tables`` committed, newest first."""
    runs = [r for r in run_ids(output_root, storage_options) if r != run_id and all(
        is_committed(table_uri(output_root, r, t), storage_options) for t in (KEYS_TABLE, *tables))]
    return sorted(runs, key=lambda r: committed_at(table_uri(output_root, r, KEYS_TABLE), storage_options),
                  reverse=True)


def plan_reuse(images: pa.Table, model_id: str, output_root: str, run_id: str, runs: list[str],
               storage_options: Optional[dict], batch_size: int) -> ReusePlan:
    """Find the images one of ``runs`` (searched in order, see ``source_runs``) embedded with ``model_id`` and
    the same bytes."""
    hashes = hash_images(images, storage_options, batch_size)
    wanted = {i: h for i, h in zip(hashes.column("image_id").to_pylist(), hashes.column("content_hash").to_pylist())
              if h is not None}
    keys, sources = [], {}
    for run in runs:
        if not wanted:
            break
        found = read_table(table_uri(output_root, run, KEYS_TABLE), storage_options,
                           filters=[("model_id", "==", model_id)])
        hit = found.filter(pa.array([wanted.get(i) == h for i, h in zip(found.column("image_id").to_pylist(),
                                                                          found.column("content_hash").to_pylist())],
                                    pa.bool_()))
        if hit.num_rows:
            ids = hit.column("image_id").to_pylist()
            for i in ids:
                del wanted[i]
            sources[run] = ids
            keys.append(hit.set_column(0, "run_id", pa.array([run_id] * hit.num_rows, pa.string())))
    plan = ReusePlan(pa.concat_tables(keys).cast(EMBEDDING_KEYS_SCHEMA), sources) if keys else ReusePlan()
    log.info("incremental: %d of %d images reused from %s", plan.keys.num_rows, images.num_rows,
             {r: len(i) for r, i in sources.items()} or "no earlier run")
    return plan


def reassign_rows(batch: pa.Table, keep: pa.Table, run_id: str) -> pa.Table:
    """The rows of ``batch`` whose image_id is in ``keep``, with this run's run_id and ``keep``'s label and split."""
    index = pc.index_in(batch.column("image_id"), value_set=keep.column("image_id"))
    found = pc.is_valid(index)
    rows, index = batch.filter(found), index.filter(found)
    columns = {"run_id": pa.array([run_id] * rows.num_rows, pa.string()),
               "label": keep.column("label").take(index), "split": keep.column("split").take(index)}
    for name, values in columns.items():
        i = rows.schema.get_field_index(name)
        rows = rows.set_column(i, rows.schema.field(i), values.cast(rows.schema.field(i).type))
    return rows


def copy_rows(output_root: str, source_run: str, table: str, keep: pa.Table, run_id: str, staging: str,
              storage_options: Optional[dict]) -> None:
    """Copy ``table``'s rows of the images in ``keep`` (image_id, label, split) from ``source_run`` to ``staging``."""
    fs, _ = pyarrow_fs(output_root, storage_options)
    files = committed_files(table_uri(output_root, source_run, table), storage_options)
    _, dest = pyarrow_fs(join(staging, f"from-{source_run}"), storage_options)
    ray.data.read_parquet(files, filesystem=fs).map_batches(
        reassign_rows, fn_kwargs={"keep": keep, "run_id": run_id}, batch_format="pyarrow").write_parquet(
        dest, filesystem=fs, min_rows_per_file=ROWS_PER_FILE)
