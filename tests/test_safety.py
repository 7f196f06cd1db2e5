"""Safety (issue 7): Pillow's decompression-bomb limit stays in force for every image we decode."""
from __future__ import annotations

import io

import pyarrow as pa
from PIL import Image

import dml_ray.data.readers  # noqa: F401 - every module that opens images is imported
import pipelines.embed  # noqa: F401
from dml_ray.data.batches import decode_batch

PILLOW_DEFAULT_LIMIT = int(1024 * 1024 * 1024 // 4 // 3)


def test_decompression_bomb_is_a_row_error():
    assert Image.MAX_IMAGE_PIXELS == PILLOW_DEFAULT_LIMIT
    bomb = io.BytesIO()
    Image.new("1", (20_000, 10_000)).save(bomb, format="PNG")  # 200 Mpx: over twice the limit, 25 kB on disk
    assert len(bomb.getvalue()) < 100_000
    batch = pa.table({"image_id": ["bomb"], "bytes": [bomb.getvalue()], "error": pa.array([None], pa.string())})
    out = decode_batch(batch, resize=32, image_size=32)
    assert out["error"][0].startswith("decode: DecompressionBombError")
