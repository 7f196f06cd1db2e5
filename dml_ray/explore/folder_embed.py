"""``dml-ray embed``: embed any folder (or fsspec URI) of images into one Parquet file with the ``embeddings`` schema.

Reuses the embed stage's Ray Data pipeline (pipelines/embed.py ``embed_dataset``: fetch, decode with the
checkpoint's eval transform, model actors) and streams its batches into a Parquet writer; nothing is held whole.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dml_ray.config import DataConfig, EmbedConfig
from dml_ray.data.folder import IMAGE_EXTENSIONS
from dml_ray.data.readers import open_root, to_uri
from dml_ray.errors import ErrorBudgetExceeded
from dml_ray.explore.model import checkpoint_resize
from dml_ray.io.fs import url_to_fs
from dml_ray.models.checkpoint import load_checkpoint
from dml_ray.models.inference import EMBEDDING_COLUMNS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FolderEmbedResult:
    rows: int
    errors: int
    out: str


def folder_images(root: str, storage_options: Optional[dict] = None) -> pa.Table:
    """Every visible image under ``root`` (recursively): image_id (path relative to root), uri, label -1, split
    ``embed``."""
    fs, base = open_root(root, storage_options)
    if not fs.isdir(base):
        raise FileNotFoundError(f"image folder {to_uri(fs, base)} does not exist")
    prefix = base.rstrip("/") + "/"
    rel = sorted(p[len(prefix):] for p in fs.find(base) if p.startswith(prefix))
    rel = [r for r in rel if r.lower().endswith(IMAGE_EXTENSIONS) and not any(x.startswith(".") for x in r.split("/"))]
    if not rel:
        raise ValueError(f"no images under {to_uri(fs, base)}")
    n = len(rel)
    return pa.table({"image_id": pa.array(rel, pa.string()), "uri": [to_uri(fs, prefix + r) for r in rel],
                     "label": pa.array([-1] * n, pa.int64()), "split": pa.array(["embed"] * n, pa.string())})


def embed_folder(root: str, checkpoint: str, out: str, run_id: str = "adhoc", cfg: Optional[EmbedConfig] = None,
                 storage_options: Optional[dict] = None) -> FolderEmbedResult:
    """Embed the images under ``root`` with ``checkpoint`` into ``out`` (Parquet, the ``embeddings`` columns).
    Images that fail to read or decode are skipped and counted; above ``cfg.max_error_fraction`` nothing is kept."""
    from pipelines.embed import embed_dataset

    cfg = (cfg or EmbedConfig()).model_copy(update={"splits": ["embed"], "feature_maps": False})
    loaded = load_checkpoint(checkpoint, storage_options)
    resize = checkpoint_resize(loaded)
    frame = "resize" if isinstance(resize, tuple) else "resize_crop"
    data = DataConfig.model_construct(image_size=loaded.image_size,
                                      resize=loaded.image_size if isinstance(resize, tuple) else resize, frame=frame)
    images = folder_images(root, storage_options)
    ds = embed_dataset(images, checkpoint, run_id, data, cfg, storage_options=storage_options)
    fs, path = url_to_fs(out, storage_options)
    tmp = f"{path}.partial"
    rows = errors = 0
    try:
        with fs.open(tmp, "wb") as f:
            writer = None
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=cfg.batch_size):
                bad = pc.is_valid(batch.column("error"))
                for image_id, error in zip(batch.filter(bad).column("image_id").to_pylist(),
                                           batch.filter(bad).column("error").to_pylist()):
                    log.warning("embed: %s: %s", image_id, error)
                good = batch.filter(pc.invert(bad)).select(EMBEDDING_COLUMNS)
                errors += batch.num_rows - good.num_rows
                rows += good.num_rows
                if writer is None:
                    writer = pq.ParquetWriter(f, good.schema)
                writer.write_table(good)
            if writer is not None:
                writer.close()
        total = rows + errors
        if total and errors / total > cfg.max_error_fraction:
            raise ErrorBudgetExceeded(f"embed: {errors} of {total} images failed, above max_error_fraction="
                                      f"{cfg.max_error_fraction}; {out} not written")
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)
    return FolderEmbedResult(rows, errors, out)
