"""CUB-200-2011 (and the synthetic generator's copy of its layout).

Files under the root: ``images.txt`` (``<image_id> <path under images/>``),
``image_class_labels.txt`` (``<image_id> <class_id>``), ``classes.txt`` (``<class_id> <name>``),
optional ``bounding_boxes.txt`` (``<image_id> <x> <y> <w> <h>``); ids are 1-based.
``train_test_split.txt`` is not read: the zero-shot protocol (DESIGN.md "Evaluation protocols")
trains on the first half of the classes by class id (1-100 of CUB's 200) and tests on the rest.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import pyarrow as pa
from fsspec import AbstractFileSystem

from dml_ray.data.readers import (
    Box,
    images_table,
    join,
    open_root,
    read_rows,
    to_uri,
    zero_shot_split,
)

logger = logging.getLogger(__name__)


def _bboxes(fs: AbstractFileSystem, base: str) -> dict[int, Box]:
    path = join(base, "bounding_boxes.txt")
    if not fs.exists(path):
        logger.warning("%s not found: the images have no bounding boxes", to_uri(fs, path))
        return {}
    rows = read_rows(fs, path, (int, float, float, float, float))
    return {image_id: tuple(box) for image_id, *box in rows}


def read_cub(root: str, storage_options: Optional[dict[str, Any]] = None) -> pa.Table:
    """Read CUB-200-2011 at ``root`` with the zero-shot split (first half of the classes train)."""
    fs, base = open_root(root, storage_options)
    images = read_rows(fs, join(base, "images.txt"), (int, str))
    labels_path = join(base, "image_class_labels.txt")
    class_of = dict(read_rows(fs, labels_path, (int, int)))
    classes_path = join(base, "classes.txt")
    class_names = dict(read_rows(fs, classes_path, (int, str)))
    bboxes = _bboxes(fs, base)
    split_of = zero_shot_split(class_names)
    for image_id, _ in images:
        if image_id not in class_of:
            raise ValueError(f"{to_uri(fs, labels_path)}: no class for image id {image_id}")
        if class_of[image_id] not in class_names:
            raise ValueError(f"{to_uri(fs, classes_path)}: no class id {class_of[image_id]} (image id {image_id})")
    classes = [class_of[image_id] for image_id, _ in images]
    return images_table(
        fs,
        base,
        rel_paths=[f"images/{path}" for _, path in images],
        labels=[split_of[c][0] for c in classes],
        class_names=[class_names[c] for c in classes],
        splits=[split_of[c][1] for c in classes],
        bboxes=[bboxes.get(image_id) for image_id, _ in images],
    )
