"""Stanford Cars (Cars196) from ``cars_annos.mat``.

The file holds ``annotations``, a 1 x N struct array with fields ``relative_im_path`` (e.g.
``car_ims/000001.jpg``), ``bbox_x1``, ``bbox_y1``, ``bbox_x2``, ``bbox_y2`` (MATLAB 1-based,
inclusive pixel corners), ``class`` (1-based) and ``test``, and ``class_names``, a 1 x 196 cell.
The ``test`` flag is ignored: the zero-shot protocol trains on classes 1-98 and tests on 99-196
(the first and second half of the classes in general).
"""
from __future__ import annotations

import io
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import scipy.io
from fsspec import AbstractFileSystem

from dml_ray.data.readers import Box, images_table, join, open_root, to_uri, zero_shot_split

ANNOTATION_FIELDS = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class")


def _load_mat(fs: AbstractFileSystem, path: str) -> dict[str, Any]:
    uri = to_uri(fs, path)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"missing required file {uri}") from None
    try:
        mat = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)
    except (scipy.io.matlab.MatReadError, NotImplementedError, ValueError, TypeError, OSError) as err:
        raise ValueError(f"{uri}: not a readable MATLAB file ({err})") from None
    for key in ("annotations", "class_names"):
        if key not in mat:
            raise ValueError(f"{uri}: no variable {key!r}")
    fields = mat["annotations"].dtype.names or ()
    missing = [f for f in ANNOTATION_FIELDS if f not in fields]
    if missing:
        raise ValueError(f"{uri}: annotations lack fields {missing}")
    return mat


def matlab_box(x1: float, y1: float, x2: float, y2: float) -> Box:
    """(x, y, w, h) of the MATLAB 1-based inclusive pixel corners (x1, y1)-(x2, y2)."""
    return (x1 - 1.0, y1 - 1.0, x2 - x1 + 1.0, y2 - y1 + 1.0)


def read_cars196(root: str, storage_options: Optional[dict[str, Any]] = None) -> pa.Table:
    """Read Cars196 at ``root`` with the zero-shot split (first half of the classes train)."""
    fs, base = open_root(root, storage_options)
    path = join(base, "cars_annos.mat")
    mat = _load_mat(fs, path)
    annotations = np.atleast_1d(mat["annotations"])
    names = [str(name) for name in np.atleast_1d(mat["class_names"])]
    split_of = zero_shot_split(range(1, len(names) + 1))
    classes = [int(c) for c in annotations["class"]]
    for number, c in enumerate(classes, start=1):
        if c not in split_of:
            raise ValueError(f"{to_uri(fs, path)}: annotation {number} has class {c}, outside 1..{len(names)}")
    corners = zip(*(annotations[f] for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")))
    return images_table(
        fs,
        base,
        rel_paths=[str(p) for p in annotations["relative_im_path"]],
        labels=[split_of[c][0] for c in classes],
        class_names=[names[c - 1] for c in classes],
        splits=[split_of[c][1] for c in classes],
        bboxes=[matlab_box(*(float(v) for v in box)) for box in corners],
    )
