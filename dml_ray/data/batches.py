"""Per-batch steps of the inference pipelines, as pure functions over Arrow tables / numpy batches.

Each step records a per-row ``error`` instead of raising, so one bad file never stops a job.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dml_ray.data.transforms import decode_image, eval_transform
from dml_ray.io.fs import url_to_fs

IO_THREADS = 8
# "<_io.BytesIO object at 0x7f...>" in PIL's messages: an address differs from run to run, the errors table must not
_OBJECT_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+>")


def _read_one(uri: str, storage_options: Optional[dict]) -> tuple[Optional[bytes], Optional[str]]:
    try:
        fs, path = url_to_fs(uri, storage_options)
        with fs.open(path, "rb") as f:
            return f.read(), None
    except Exception as err:  # noqa: BLE001 - any read failure is recorded per row
        return None, f"read: {type(err).__name__}: {err}"


def fetch_bytes(batch: pa.Table, storage_options: Optional[dict] = None) -> pa.Table:
    """Add ``bytes`` (binary) and ``error`` (string) columns by reading each ``uri`` through fsspec."""
    uris = batch.column("uri").to_pylist()
    with ThreadPoolExecutor(min(IO_THREADS, max(1, len(uris)))) as pool:
        results = list(pool.map(lambda u: _read_one(u, storage_options), uris))
    data = pa.array([r[0] for r in results], pa.binary())
    errors = pa.array([r[1] for r in results], pa.string())
    return batch.append_column("bytes", data).append_column("error", errors)


def decode_batch(batch: pa.Table, resize: int | Sequence[int], image_size: int) -> dict[str, np.ndarray]:
    """Decode and transform ``bytes`` into an N x 3 x S x S float32 ``image`` array; failures go to ``error``.

    Rows that fail keep a zero image and their error text; the ``bytes`` column is dropped.
    """
    transform = eval_transform(resize, image_size)
    n = batch.num_rows
    images = np.zeros((n, 3, image_size, image_size), dtype=np.float32)
    errors = batch.column("error").to_pylist()
    for i, data in enumerate(batch.column("bytes").to_pylist()):
        if errors[i] is not None:
            continue
        try:
            images[i] = transform(decode_image(data)).numpy()
        except Exception as err:  # noqa: BLE001 - corrupt images are recorded, not fatal
            errors[i] = f"decode: {type(err).__name__}: {_OBJECT_ADDRESS.sub('>', str(err))}"
    out = {name: batch.column(name).to_numpy(zero_copy_only=False)
           for name in batch.column_names if name not in ("bytes", "error")}
    out["error"] = np.array(errors, dtype=object)
    out["image"] = images
    return out


def rows_ok(table: pa.Table) -> pa.Table:
    """Rows without an error, error column dropped."""
    return table.filter(pc.is_null(table.column("error"))).drop_columns(["error"])

