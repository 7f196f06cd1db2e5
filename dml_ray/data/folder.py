"""An image folder: ``root/<class_name>/<images>`` (images may sit in sub-folders of a class).

Classes are sorted by name; the first half trains and the rest tests (the zero-shot protocol).
Files whose extension is not an image's, files directly under the root, and hidden files or
folders (a name starting with '.') are ignored.
"""
from __future__ import annotations

from typing import Any, Optional

import pyarrow as pa

from dml_ray.data.readers import images_table, open_root, to_uri, zero_shot_split

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _is_class_image(rel_path: str) -> bool:
    """Whether ``rel_path`` (relative to the root) is a visible image inside a class folder."""
    parts = rel_path.split("/")
    return (
        len(parts) >= 2
        and not any(part.startswith(".") for part in parts)
        and rel_path.lower().endswith(IMAGE_EXTENSIONS)
    )


def read_folder(root: str, storage_options: Optional[dict[str, Any]] = None) -> pa.Table:
    """Read ``root/<class_name>/<images>``: classes sorted by name, first half train, rest test."""
    fs, base = open_root(root, storage_options)
    if not fs.isdir(base):
        raise FileNotFoundError(f"image folder {to_uri(fs, base)} does not exist")
    prefix = base.rstrip("/") + "/"
    rel_paths = sorted(
        rel for rel in (path[len(prefix):] for path in fs.find(base) if path.startswith(prefix)) if _is_class_image(rel)
    )
    if not rel_paths:
        raise ValueError(f"no images under {to_uri(fs, base)}; expected <root>/<class_name>/<image>")
    classes = [rel.split("/", 1)[0] for rel in rel_paths]
    split_of = zero_shot_split(classes)
    return images_table(
        fs,
        base,
        rel_paths=rel_paths,
        labels=[split_of[c][0] for c in classes],
        class_names=classes,
        splits=[split_of[c][1] for c in classes],
    )
