"""DeepFashion In-Shop Clothes Retrieval.

``list_eval_partition.txt``: a count line, the header ``image_name item_id evaluation_status``,
then one row per image with status train, query or gallery; ``image_name`` is relative to the
root (``img/WOMEN/Dresses/id_00000002/02_1_front.jpg``). Optional ``list_bbox_inshop.txt``: a
count line, the header ``image_name clothes_type pose_type x_1 y_1 x_2 y_2``, then corner boxes.
Both files sit at the root (flat layout) or, as distributed, in ``Eval/`` and ``Anno/`` with the
images under ``Img/``. The label comes from ``item_id``; query and gallery share labels.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import pyarrow as pa
from fsspec import AbstractFileSystem

from dml_ray.data.readers import (
    Box,
    contiguous_labels,
    images_table,
    join,
    open_root,
    parse_rows,
    read_text,
    to_uri,
)

PARTITION_HEADER = ("image_name", "item_id", "evaluation_status")
BBOX_HEADER = ("image_name", "clothes_type", "pose_type", "x_1", "y_1", "x_2", "y_2")
STATUSES = ("train", "query", "gallery")

logger = logging.getLogger(__name__)


def _layout(fs: AbstractFileSystem, base: str) -> tuple[str, str, str]:
    """(partition file, bbox file, image folder) of the flat or the distributed layout."""
    if fs.exists(join(base, "Eval", "list_eval_partition.txt")):
        return join(base, "Eval", "list_eval_partition.txt"), join(base, "Anno", "list_bbox_inshop.txt"), "Img/"
    return join(base, "list_eval_partition.txt"), join(base, "list_bbox_inshop.txt"), ""


def _counted_rows(fs: AbstractFileSystem, path: str, converters: tuple, header: tuple) -> list[tuple]:
    text, uri = read_text(fs, path), to_uri(fs, path)
    rows = parse_rows(text, uri, converters, header=header, skip=1)
    count = text.split("\n", 1)[0].strip()
    if count != str(len(rows)):
        raise ValueError(f"{uri} line 1: count {count!r} does not match the {len(rows)} rows that follow")
    return rows


def _status(value: str) -> str:
    if value not in STATUSES:
        raise ValueError(f"evaluation_status {value!r} not one of {STATUSES}")
    return value


def _bboxes(fs: AbstractFileSystem, path: str) -> dict[str, Box]:
    if not fs.exists(path):
        logger.warning("%s not found: the images have no bounding boxes", to_uri(fs, path))
        return {}
    rows = _counted_rows(fs, path, (str, int, int, float, float, float, float), BBOX_HEADER)
    return {name: (x1, y1, x2 - x1, y2 - y1) for name, _, _, x1, y1, x2, y2 in rows}


def read_inshop(root: str, storage_options: Optional[dict[str, Any]] = None) -> pa.Table:
    """Read In-Shop at ``root`` with its own train/query/gallery split and optional boxes."""
    fs, base = open_root(root, storage_options)
    partition_path, bbox_path, image_folder = _layout(fs, base)
    rows = _counted_rows(fs, partition_path, (str, str, _status), PARTITION_HEADER)
    label_of = contiguous_labels(item for _, item, _ in rows)
    bboxes = _bboxes(fs, bbox_path)
    return images_table(
        fs,
        base,
        rel_paths=[image_folder + name for name, _, _ in rows],
        labels=[label_of[item] for _, item, _ in rows],
        class_names=[item for _, item, _ in rows],
        splits=[status for _, _, status in rows],
        bboxes=[bboxes.get(name) for name, _, _ in rows],
    )
