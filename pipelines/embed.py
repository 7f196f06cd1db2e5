"""Embedding on Ray Data: images table -> bytes (fsspec) -> decode + transform -> model actors -> embeddings."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import ray

from dml_ray.config import DataConfig, EmbedConfig
from dml_ray.data.batches import decode_batch, fetch_bytes, rows_failed, rows_ok
from dml_ray.io.fs import pyarrow_fs
from dml_ray.io.schemas import ERRORS_SCHEMA
from dml_ray.io.tables import commit_table, staging_uri, table_uri, write_table
from dml_ray.models.inference import Embedder

log = logging.getLogger(__name__)

READ_CPUS = 0.5


class ErrorBudgetExceeded(RuntimeError):
    """More inputs failed than the configured error budget allows; nothing was committed."""


@dataclass(frozen=True)
class EmbedResult:
    rows: int
    errors: int
    seconds: float
    embeddings_uri: str
    errors_uri: str


def embed_dataset(images: pa.Table, checkpoint_uri: str, run_id: str, data: DataConfig, cfg: EmbedConfig,
                  num_threads: int = 1) -> ray.data.Dataset:
    """The lazy Ray Data pipeline producing embeddings rows (with a nullable ``error`` column)."""
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
                               "use_gpu": cfg.use_gpu, "storage_options": so},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.concurrency),
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_cpus=cfg.cpus_per_actor,
        num_gpus=1 if cfg.use_gpu else 0,
    )


def run_embed(images: pa.Table, checkpoint_uri: str, output_root: str, run_id: str, data: DataConfig,
              cfg: EmbedConfig, num_threads: int = 1) -> EmbedResult:
    """Embed every image of the configured splits; commit ``embeddings`` and ``errors`` or nothing at all."""
    start = time.perf_counter()
    so = data.storage_options or None
    ds = embed_dataset(images, checkpoint_uri, run_id, data, cfg, num_threads).materialize()
    failed = ds.map_batches(rows_failed, batch_format="pyarrow")
    errors = [pa.table(b) for b in failed.iter_batches(batch_format="pyarrow")]
    n_err = sum(t.num_rows for t in errors)
    n_total = ds.count()
    if n_total and n_err / n_total > cfg.max_error_fraction:
        raise ErrorBudgetExceeded(
            f"embed: {n_err} of {n_total} images failed ({n_err / n_total:.1%}), above "
            f"embed.max_error_fraction={cfg.max_error_fraction}; nothing committed")
    emb_final = table_uri(output_root, run_id, "embeddings")
    emb_staging = staging_uri(output_root, run_id, "embeddings")
    fs, path = pyarrow_fs(emb_staging, so)
    ds.map_batches(rows_ok, batch_format="pyarrow").drop_columns(["uri"]).write_parquet(
        path, filesystem=fs, min_rows_per_file=100_000)
    err_table = _errors_table(errors, run_id)
    err_final = table_uri(output_root, run_id, "errors", part="embed")
    # errors first, embeddings last: the stage is done iff embeddings is committed
    write_table(err_table, err_final, staging_uri(output_root, run_id, "errors", "embed"), so, replace=True)
    marker = commit_table(emb_staging, emb_final, so)
    seconds = time.perf_counter() - start
    log.info("embed: %d rows, %d errors in %.1f s", marker["rows"], n_err, seconds)
    return EmbedResult(marker["rows"], n_err, seconds, emb_final, err_final)


def _errors_table(failed: list[pa.Table], run_id: str) -> pa.Table:
    rows = [
        {"run_id": run_id, "image_id": r["image_id"], "uri": r["uri"], "stage": "embed", "error": r["error"]}
        for t in failed for r in t.select(["image_id", "uri", "error"]).to_pylist()
    ]
    return pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA)
