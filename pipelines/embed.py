"""Embedding on Ray Data: images table -> bytes (fsspec) -> decode + transform -> model actors -> tables.

Below ``embed.in_process_below`` images the same per-batch steps run in the driver instead
(pipelines/in_process.py): no Ray Data job and no actor start, the same rows.

The pipeline streams every output row (errors included) into one staging Parquet dataset; the
error budget is checked on its ``error`` column alone; then each output table is cut from the
staging files by column projection and committed, ``embeddings`` last. Nothing is held in memory
and nothing is computed twice. Rows of images an earlier run already embedded (same image_id,
content hash and model_id) are copied from that run instead of recomputed (pipelines/incremental.py).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray

from dml_ray import console
from dml_ray.config import DataConfig, EmbedConfig
from dml_ray.data.batches import decode_batch, fetch_bytes, rows_ok
from dml_ray.data.content_hash import add_content_hash
from dml_ray.errors import ErrorBudgetExceeded
from dml_ray.io.run import Run
from dml_ray.io.schemas import EMBEDDING_KEYS_SCHEMA, ERRORS_SCHEMA
from dml_ray.models.checkpoint import load_checkpoint
from dml_ray.models.inference import EMBEDDING_COLUMNS, FEATURE_MAP_COLUMNS, Embedder
from pipelines.in_process import (
    DriverThreads,
    apply_steps,
    file_batches,
    prefetched,
    runs_in_process,
    table_batches,
    write_parquet_stream,
)
from pipelines.incremental import KEYS_TABLE, ReusePlan, copy_rows, plan_reuse, source_runs

log = logging.getLogger(__name__)

READ_CPUS = 0.5
ROWS_PER_FILE = 100_000


@dataclass(frozen=True)
class EmbedResult:
    rows: int
    errors: int
    seconds: float
    embeddings_uri: str
    errors_uri: str
    feature_maps_uri: Optional[str] = None
    reused: int = 0


class HashedEmbedder(Embedder):
    """The Embedder, passing each row's content hash through (the incremental key).

    ``crash_once`` (a marker path; fault-injection tests) makes the actor process exit on its second
    batch, once, so that Ray Data has to retry it.
    """

    def __init__(self, *args, crash_once: Optional[str] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.crash_once = crash_once
        self.calls = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        self.calls += 1
        if self.crash_once and self.calls == 2 and not os.path.exists(self.crash_once):
            open(self.crash_once, "w").close()
            os._exit(1)
        hashes = [h if isinstance(h, str) else None for h in batch["content_hash"]]
        console.advance("embed", len(hashes))
        return super().__call__(batch).append_column("content_hash", pa.array(hashes, pa.string()))


def _fetch_and_hash(batch: pa.Table, storage_options: Optional[dict]) -> pa.Table:
    return add_content_hash(fetch_bytes(batch, storage_options))


_INPUT_COLUMNS = ["image_id", "uri", "label", "split"]


def embed_in_process(todo: pa.Table, checkpoint_uri: str, run: Run, data: DataConfig, cfg: EmbedConfig,
                     num_threads: int, raw_path: str, filesystem) -> None:
    """``embed_dataset``'s steps (fetch + hash, decode, ``HashedEmbedder``) in the driver, batch after batch,
    streamed into the staging dataset ``raw_path``; the next batches are read and decoded in a thread meanwhile."""
    so = run.storage_options
    with DriverThreads():
        embedder = HashedEmbedder(**_embedder_kwargs(checkpoint_uri, run.run_id, cfg, num_threads, so))
        read = [partial(_fetch_and_hash, storage_options=so),
                partial(decode_batch, resize=data.input_resize(), image_size=data.image_size)]
        decoded = prefetched(apply_steps(table_batches(todo.select(_INPUT_COLUMNS), cfg.batch_size), read))
        write_parquet_stream(apply_steps(decoded, [embedder]), raw_path, filesystem)


def _embedder_kwargs(checkpoint_uri: str, run_id: str, cfg: EmbedConfig, num_threads: int,
                     storage_options: Optional[dict], crash_once: Optional[str] = None) -> dict:
    """``HashedEmbedder``'s arguments, the same on both paths."""
    return {"checkpoint_uri": checkpoint_uri, "run_id": run_id, "num_threads": num_threads, "use_gpu": cfg.use_gpu,
            "storage_options": storage_options, "feature_maps": cfg.feature_maps, "precision": cfg.precision,
            "crash_once": crash_once}


def embed_dataset(images: pa.Table, checkpoint_uri: str, run_id: str, data: DataConfig, cfg: EmbedConfig,
                  num_threads: int = 1, crash_once: Optional[str] = None,
                  storage_options: Optional[dict] = None) -> ray.data.Dataset:
    """The lazy Ray Data pipeline producing output rows (with a nullable ``error`` column)."""
    images = images.filter(pc.is_in(images.column("split"), pa.array(cfg.splits)))
    n_blocks = max(1, min(images.num_rows // cfg.batch_size, 64))
    ds = ray.data.from_arrow(images.select(_INPUT_COLUMNS)).repartition(n_blocks)
    so = storage_options
    ds = ds.map_batches(_fetch_and_hash, fn_kwargs={"storage_options": so}, batch_format="pyarrow",
                        batch_size=cfg.batch_size, num_cpus=READ_CPUS)
    ds = ds.map_batches(decode_batch, fn_kwargs={"resize": data.input_resize(), "image_size": data.image_size},
                        batch_format="pyarrow", batch_size=cfg.batch_size, num_cpus=READ_CPUS)
    return ds.map_batches(
        HashedEmbedder,
        fn_constructor_kwargs=_embedder_kwargs(checkpoint_uri, run_id, cfg, num_threads, so, crash_once),
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.concurrency),
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_cpus=cfg.cpus_per_actor,
        num_gpus=1 if cfg.use_gpu else 0,
    )


def _cut(run: Run, source: ray.data.Dataset, columns: list[str], table: str) -> str:
    """Write the error-free rows' ``columns`` of the staged output as ``table``'s staging folder."""
    staging = run.staging(table)
    fs, path = run.pyarrow_fs(staging)
    source.select_columns([*columns, "error"]).map_batches(rows_ok, batch_format="pyarrow").write_parquet(
        path, filesystem=fs, min_rows_per_file=ROWS_PER_FILE)
    return staging


def _cut_in_process(run: Run, raw_path: str, filesystem, columns: list[str], table: str) -> str:
    """``_cut`` in the driver: the staged output's error-free rows, streamed batch by batch."""
    staging = run.staging(table)
    fs, path = run.pyarrow_fs(staging)
    write_parquet_stream((rows_ok(b) for b in file_batches(raw_path, filesystem, ROWS_PER_FILE, [*columns, "error"])),
                         path, fs)
    return staging


def _staged_table(run: Run, cut: Optional[Callable[[list[str], str], str]], columns: list[str], plan: ReusePlan,
                  keep: pa.Table, table: str) -> str:
    """``table``'s staging folder: the freshly embedded rows (``cut(columns, table)``) plus the rows copied from
    earlier runs."""
    staging = cut(columns, table) if cut is not None else run.staging(table)
    for source_run, ids in plan.sources.items():
        rows = keep.filter(pc.is_in(keep.column("image_id"), pa.array(ids, pa.string())))
        copy_rows(run, source_run, table, rows, staging)
    return staging


_STATUS_COLUMNS = {"image_id": pa.string(), "uri": pa.string(), "model_id": pa.string(),
                   "content_hash": pa.string(), "error": pa.string()}


def run_embed(images: pa.Table, checkpoint_uri: str, run: Run, data: DataConfig, cfg: EmbedConfig,
              num_threads: int = 1, crash_once: Optional[str] = None) -> EmbedResult:
    """Embed every image of the configured splits; commit ``embeddings`` (+ ``feature_maps``), ``embedding_keys``
    and ``errors``, or nothing at all when the error budget is exceeded.

    With ``cfg.incremental``, images an earlier run of the output root embedded with the same model and
    the same bytes are copied from it instead (pipelines/incremental.py).
    """
    start = time.perf_counter()
    so, run_id = run.storage_options, run.run_id
    images = images.filter(pc.is_in(images.column("split"), pa.array(cfg.splits)))
    tables = ["embeddings", *(["feature_maps"] if cfg.feature_maps else [])]
    runs = source_runs(run, tables) if cfg.incremental else []
    plan = ReusePlan()
    if runs:
        plan = plan_reuse(images, load_checkpoint(checkpoint_uri, so).model_id, run, runs, cfg.batch_size)
    todo = images.filter(pc.invert(pc.is_in(images.column("image_id"), pa.array(plan.image_ids(), pa.string()))))
    keep = images.select(["image_id", "label", "split"])
    raw = run.staging("embed-output")
    fs, raw_path = run.pyarrow_fs(raw)
    cut = None
    status = pa.schema(_STATUS_COLUMNS).empty_table()
    try:
        if todo.num_rows:
            console.expect("embed", todo.num_rows)
            # fault injection (crash_once) kills an actor process: it exists on the Ray Data path only
            if crash_once is None and runs_in_process(todo.num_rows, cfg.in_process_below, cfg.use_gpu):
                log.info("embed: %d images, below embed.in_process_below=%d: in the driver", todo.num_rows,
                         cfg.in_process_below)
                embed_in_process(todo, checkpoint_uri, run, data, cfg, num_threads, raw_path, fs)
                cut = partial(_cut_in_process, run, raw_path, fs)
            else:
                embed_dataset(todo, checkpoint_uri, run_id, data, cfg, num_threads, crash_once, so).write_parquet(
                    raw_path, filesystem=fs)
                cut = partial(_cut, run, ray.data.read_parquet(raw_path, filesystem=fs))
            status = pads.dataset(raw_path, filesystem=fs, format="parquet").to_table(columns=list(_STATUS_COLUMNS))
        failed = status.filter(pc.is_valid(status.column("error")))
        n_err, n_total = failed.num_rows, status.num_rows + plan.keys.num_rows
        if n_total and n_err / n_total > cfg.max_error_fraction:
            raise ErrorBudgetExceeded(
                f"embed: {n_err} of {n_total} images failed ({n_err / n_total:.1%}), above "
                f"embed.max_error_fraction={cfg.max_error_fraction}; nothing committed")
        emb_staging = _staged_table(run, cut, EMBEDDING_COLUMNS, plan, keep, "embeddings")
        if cfg.feature_maps:
            run.commit("feature_maps", _staged_table(run, cut, FEATURE_MAP_COLUMNS, plan, keep, "feature_maps"),
                       replace=True)
        run.commit("errors", _errors_table(failed, run_id), part="embed", replace=True)
        run.commit(KEYS_TABLE, pa.concat_tables([_new_keys(status, run_id), plan.keys]), replace=True)
        # embeddings last: the stage is done iff embeddings is committed
        marker = run.commit("embeddings", emb_staging)
    finally:
        run.discard(raw)
    seconds = time.perf_counter() - start
    log.info("embed: %d rows (%d embedded, %d reused), %d errors in %.1f s", marker["rows"],
             marker["rows"] - plan.keys.num_rows, plan.keys.num_rows, n_err, seconds)
    return EmbedResult(marker["rows"], n_err, seconds, run.table_uri("embeddings"), run.table_uri("errors", "embed"),
                       run.table_uri("feature_maps") if cfg.feature_maps else None, plan.keys.num_rows)


def _new_keys(status: pa.Table, run_id: str) -> pa.Table:
    ok = status.filter(pc.is_null(status.column("error")))
    run = pa.array([run_id] * ok.num_rows, pa.string())
    return pa.table({"run_id": run, "image_id": ok.column("image_id"), "model_id": ok.column("model_id"),
                     "content_hash": ok.column("content_hash"), "embedded_run_id": run}, schema=EMBEDDING_KEYS_SCHEMA)


def _errors_table(failed: pa.Table, run_id: str) -> pa.Table:
    n = failed.num_rows
    return pa.table({"run_id": pa.array([run_id] * n, pa.string()), "image_id": failed.column("image_id"),
                     "uri": failed.column("uri"), "stage": pa.array(["embed"] * n, pa.string()),
                     "error": failed.column("error")}, schema=ERRORS_SCHEMA)
