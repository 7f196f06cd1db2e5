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
from dml_ray.io.fs import join
from dml_ray.io.run import Run
from dml_ray.io.schemas import EMBEDDING_KEYS_SCHEMA

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


def source_runs(run: Run, tables: list[str]) -> list[Run]:
    """The output root's other runs with ``embedding_keys`` and every table of ``tables`` committed, newest first."""
    runs = [run.other(r) for r in run.runs() if r != run.run_id]
    runs = [r for r in runs if all(r.committed(t) for t in (KEYS_TABLE, *tables))]
    return sorted(runs, key=lambda r: r.committed_at(KEYS_TABLE), reverse=True)


def plan_reuse(images: pa.Table, model_id: str, run: Run, runs: list[Run], batch_size: int) -> ReusePlan:
    """Find the images one of ``runs`` (searched in order, see ``source_runs``) embedded with ``model_id`` and
    the same bytes."""
    hashes = hash_images(images, run.storage_options, batch_size)
    wanted = {i: h for i, h in zip(hashes.column("image_id").to_pylist(), hashes.column("content_hash").to_pylist())
              if h is not None}
    keys, sources = [], {}
    for source in runs:
        if not wanted:
            break
        found = source.read(KEYS_TABLE, filter=[("model_id", "==", model_id)])
        hit = found.filter(pa.array([wanted.get(i) == h for i, h in zip(found.column("image_id").to_pylist(),
                                                                          found.column("content_hash").to_pylist())],
                                    pa.bool_()))
        if hit.num_rows:
            ids = hit.column("image_id").to_pylist()
            for i in ids:
                del wanted[i]
            sources[source.run_id] = ids
            keys.append(hit.set_column(0, "run_id", pa.array([run.run_id] * hit.num_rows, pa.string())))
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


def copy_rows(run: Run, source_run: str, table: str, keep: pa.Table, staging: str) -> None:
    """Copy ``table``'s rows of the images in ``keep`` (image_id, label, split) from ``source_run`` of the same
    output root into ``run``'s ``staging`` folder."""
    fs, dest = run.pyarrow_fs(join(staging, f"from-{source_run}"))
    run.other(source_run).dataset(table).map_batches(
        reassign_rows, fn_kwargs={"keep": keep, "run_id": run.run_id}, batch_format="pyarrow").write_parquet(
        dest, filesystem=fs, min_rows_per_file=ROWS_PER_FILE)
