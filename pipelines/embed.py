"""Embedding on Ray Data: images table -> bytes (fsspec) -> decode + transform -> model actors -> tables.

The pipeline streams every output row (errors included) into one staging Parquet dataset; the
error budget is checked on its ``error`` column alone; then each output table is cut from the
staging files by column projection and committed, ``embeddings`` last. Nothing is held in memory
and nothing is computed twice.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray

from dml_ray.config import DataConfig, EmbedConfig
from dml_ray.data.batches import decode_batch, fetch_bytes, rows_ok
from dml_ray.io.fs import pyarrow_fs, url_to_fs
from dml_ray.io.schemas import ERRORS_SCHEMA
from dml_ray.io.tables import commit_table, staging_uri, table_uri, write_table
from dml_ray.models.inference import EMBEDDING_COLUMNS, FEATURE_MAP_COLUMNS, Embedder

log = logging.getLogger(__name__)

READ_CPUS = 0.5
ROWS_PER_FILE = 100_000


class ErrorBudgetExceeded(RuntimeError):
    """More inputs failed than the configured error budget allows; nothing was committed."""


@dataclass(frozen=True)
class EmbedResult:
    rows: int
    errors: int
    seconds: float
    embeddings_uri: str
    errors_uri: str
    feature_maps_uri: Optional[str] = None


def embed_dataset(images: pa.Table, checkpoint_uri: str, run_id: str, data: DataConfig, cfg: EmbedConfig,
                  num_threads: int = 1) -> ray.data.Dataset:
    """The lazy Ray Data pipeline producing output rows (with a nullable ``error`` column)."""
    images = images.filter(pc.is_in(images.column("split"), pa.array(cfg.splits)))
    columns = ["image_id", "uri", "label", "split"]
    n_blocks = max(1, min(images.num_rows // cfg.batch_size, 64))
    ds = ray.data.from_arrow(images.select(columns)).repartition(n_blocks)
    so = data.storage_options or None
    ds = ds.map_batches(fetch_bytes, fn_kwargs={"storage_options": so}, batch_format="pyarrow",
                        batch_size=cfg.batch_size, num_cpus=READ_CPUS)
    ds = ds.map_batches(decode_batch, fn_kwargs={"resize": data.resize, "image_size": data.image_size},
                        batch_format="pyarrow", batch_size=cfg.batch_size, num_cpus=READ_CPUS)
    return ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"checkpoint_uri": checkpoint_uri, "run_id": run_id, "num_threads": num_threads,
                               "use_gpu": cfg.use_gpu, "storage_options": so, "feature_maps": cfg.feature_maps},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.concurrency),
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_cpus=cfg.cpus_per_actor,
        num_gpus=1 if cfg.use_gpu else 0,
    )


def _cut(source: ray.data.Dataset, columns: list[str], output_root: str, run_id: str, table: str,
         storage_options: Optional[dict]) -> str:
    """Write the error-free rows' ``columns`` of the staged output as ``table``'s staging folder."""
    staging = staging_uri(output_root, run_id, table)
    fs, path = pyarrow_fs(staging, storage_options)
    source.select_columns([*columns, "error"]).map_batches(rows_ok, batch_format="pyarrow").write_parquet(
        path, filesystem=fs, min_rows_per_file=ROWS_PER_FILE)
    return staging


def run_embed(images: pa.Table, checkpoint_uri: str, output_root: str, run_id: str, data: DataConfig,
              cfg: EmbedConfig, num_threads: int = 1) -> EmbedResult:
    """Embed every image of the configured splits; commit ``embeddings`` (+ ``feature_maps``) and ``errors``,
    or nothing at all when the error budget is exceeded."""
    start = time.perf_counter()
    so = data.storage_options or None
    raw = staging_uri(output_root, run_id, "embed-output")
    fs, raw_path = pyarrow_fs(raw, so)
    embed_dataset(images, checkpoint_uri, run_id, data, cfg, num_threads).write_parquet(raw_path, filesystem=fs)
    try:
        staged = pads.dataset(raw_path, filesystem=fs, format="parquet")
        status = staged.to_table(columns=["image_id", "uri", "error"])
        failed = status.filter(pc.is_valid(status.column("error")))
        n_err, n_total = failed.num_rows, status.num_rows
        if n_total and n_err / n_total > cfg.max_error_fraction:
            raise ErrorBudgetExceeded(
                f"embed: {n_err} of {n_total} images failed ({n_err / n_total:.1%}), above "
                f"embed.max_error_fraction={cfg.max_error_fraction}; nothing committed")
        source = ray.data.read_parquet(raw_path, filesystem=fs)
        emb_staging = _cut(source, EMBEDDING_COLUMNS, output_root, run_id, "embeddings", so)
        fm_final = None
        if cfg.feature_maps:
            fm_final = table_uri(output_root, run_id, "feature_maps")
            commit_table(_cut(source, FEATURE_MAP_COLUMNS, output_root, run_id, "feature_maps", so), fm_final, so,
                         replace=True)
        err_final = table_uri(output_root, run_id, "errors", part="embed")
        write_table(_errors_table(failed, run_id), err_final, staging_uri(output_root, run_id, "errors", "embed"),
                    so, replace=True)
        # embeddings last: the stage is done iff embeddings is committed
        emb_final = table_uri(output_root, run_id, "embeddings")
        marker = commit_table(emb_staging, emb_final, so)
    finally:
        raw_fs, raw_dir = url_to_fs(raw, so)
        if raw_fs.exists(raw_dir):
            raw_fs.rm(raw_dir, recursive=True)
    seconds = time.perf_counter() - start
    log.info("embed: %d rows, %d errors in %.1f s", marker["rows"], n_err, seconds)
    return EmbedResult(marker["rows"], n_err, seconds, emb_final, err_final, fm_final)


def _errors_table(failed: pa.Table, run_id: str) -> pa.Table:
    n = failed.num_rows
    return pa.table({"run_id": pa.array([run_id] * n, pa.string()), "image_id": failed.column("image_id"),
                     "uri": failed.column("uri"), "stage": pa.array(["embed"] * n, pa.string()),
                     "error": failed.column("error")}, schema=ERRORS_SCHEMA)
