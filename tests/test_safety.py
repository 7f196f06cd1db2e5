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


def test_a_decompression_bomb_in_a_folder_dataset_becomes_an_errors_row(tmp_path, monkeypatch):
    """issue 11, item 4: the data stage reads image headers; a bomb there is a row with no size, and the embed
    stage's decode turns it into an ``errors`` row, like any unreadable image. (The issue's bomb was a 15000 x 15000
    1-bit PNG; with the limit lowered, a 300 x 300 one trips the same check in a fraction of the time.)"""
    from dml_ray.data.batches import fetch_bytes
    from dml_ray.data.readers import read_images

    for cls in ("a_class", "b_class"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (32, 32), (i * 90, 10, 10)).save(tmp_path / cls / f"{i}.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40_000)
    Image.new("1", (300, 300)).save(tmp_path / "a_class" / "bomb.png")  # 90 000 px: over twice the limit
    table = read_images("folder", str(tmp_path))
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert len(rows) == 5 and rows["a_class/bomb.png"]["width"] is None and rows["a_class/0.png"]["width"] == 32
    out = decode_batch(fetch_bytes(table), resize=32, image_size=32)
    errors = dict(zip(table.column("image_id").to_pylist(), out["error"]))
    assert errors["a_class/bomb.png"].startswith("decode: DecompressionBombError")
    assert [i for i, e in errors.items() if e is not None] == ["a_class/bomb.png"]
