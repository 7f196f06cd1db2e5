"""Stanford Online Products from ``Ebay_train.txt`` and ``Ebay_test.txt``.

Each file starts with the header ``image_id class_id super_class_id path``; ``path`` is relative
to the root (``bicycle_final/111085122871_0.JPG``). The split is the file's; the label comes from
``class_id``; the class name is the super-class folder and the class id (``bicycle_final/1``).
SOP has no bounding boxes.
"""
from __future__ import annotations

from typing import Any, Optional

import pyarrow as pa

from dml_ray.data.readers import contiguous_labels, images_table, join, open_root, read_rows

HEADER = ("image_id", "class_id", "super_class_id", "path")
SPLIT_FILES = (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt"))


def read_sop(root: str, storage_options: Optional[dict[str, Any]] = None) -> pa.Table:
    """Read Stanford Online Products at ``root`` with its own train/test split."""
    fs, base = open_root(root, storage_options)
    rows = [
        (split, class_id, path)
        for split, name in SPLIT_FILES
        for _, class_id, _, path in read_rows(fs, join(base, name), (int, int, int, str), header=HEADER)
    ]
    label_of = contiguous_labels(class_id for _, class_id, _ in rows)
    return images_table(
        fs,
        base,
        rel_paths=[path for _, _, path in rows],
        labels=[label_of[class_id] for _, class_id, _ in rows],
        class_names=[f"{path.split('/')[0]}/{class_id}" for _, class_id, path in rows],
        splits=[split for split, _, _ in rows],
    )
