"""Dataset readers: ``read_images`` dispatches by kind; the fsspec helpers every format shares.

Every reader returns the ``images`` table (DESIGN.md "Tables") validated by ``validate_images``:
``image_id`` is the image's path relative to the dataset root, ``uri`` its full fsspec URI,
labels are 0-based and contiguous in class order, width and height come from the image headers
(read by a thread pool, never decoding pixels).
"""
from __future__ import annotations

import importlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Hashable, Iterable, Optional, Sequence

import pyarrow as pa
from fsspec import AbstractFileSystem
from PIL import Image, UnidentifiedImageError

from dml_ray.io.fs import is_local, join, url_to_fs
from dml_ray.io.schemas import BBOX_TYPE, IMAGES_SCHEMA, validate_images

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]
"""A bounding box as (x, y, w, h) in pixels, (x, y) its top-left corner."""

HEADER_READ_THREADS = 32

_READERS: dict[str, tuple[str, str]] = {
    "synthetic": ("dml_ray.data.cub", "read_cub"),
    "cub": ("dml_ray.data.cub", "read_cub"),
    "cars196": ("dml_ray.data.cars196", "read_cars196"),
    "sop": ("dml_ray.data.sop", "read_sop"),
    "inshop": ("dml_ray.data.inshop", "read_inshop"),
    "folder": ("dml_ray.data.folder", "read_folder"),
}

# DESIGN.md "Evaluation protocols": Recall@K per dataset.
_DEFAULT_KS: dict[str, list[int]] = {
    "synthetic": [1, 2, 4, 8],
    "cub": [1, 2, 4, 8],
    "cars196": [1, 2, 4, 8],
    "folder": [1, 2, 4, 8],
    "sop": [1, 10, 100, 1000],
    "inshop": [1, 10, 20, 30, 40],
}


def _check_kind(kind: str) -> None:
    if kind not in _READERS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of: {', '.join(_READERS)}")


def read_images(kind: str, root: str, storage_options: Optional[dict[str, Any]] = None) -> pa.Table:
    """Read the images table of the dataset of format ``kind`` at the fsspec URI ``root``."""
    _check_kind(kind)
    module, name = _READERS[kind]
    reader = getattr(importlib.import_module(module), name)
    return reader(root, storage_options)


def default_ks(kind: str) -> list[int]:
    """The Recall@K list of the paper protocol for datasets of format ``kind``."""
    _check_kind(kind)
    return list(_DEFAULT_KS[kind])


def open_root(root: str, storage_options: Optional[dict[str, Any]] = None) -> tuple[AbstractFileSystem, str]:
    """The file system and the protocol-less path of the dataset root URI ``root``."""
    if not root:
        raise ValueError("dataset root is empty; set data.root to a local path or fsspec URI")
    fs, path = url_to_fs(root, storage_options)
    return fs, path.rstrip("/") or path


def to_uri(fs: AbstractFileSystem, path: str) -> str:
    """The full URI of ``path`` on ``fs``: an absolute path for local files, ``proto://...`` otherwise."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def read_text(fs: AbstractFileSystem, path: str) -> str:
    """The UTF-8 text of the required file ``path``; FileNotFoundError naming it when missing."""
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"missing required file {to_uri(fs, path)}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{to_uri(fs, path)}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _short(line: str, limit: int = 80) -> str:
    return repr(line if len(line) <= limit else line[:limit] + "...")


def parse_rows(
    text: str,
    uri: str,
    converters: Sequence[Callable[[str], Any]],
    header: Sequence[str] = (),
    skip: int = 0,
) -> list[tuple[Any, ...]]:
    """Whitespace-separated rows of ``text``, one value per converter; the last field may hold spaces.

    The first ``skip`` lines are ignored; a non-empty ``header`` must be the next line. Blank lines
    are skipped. A malformed line raises ValueError naming ``uri`` and the 1-based line number.
    """
    lines = text.splitlines()
    start = skip
    if header:
        if len(lines) <= skip or lines[skip].split() != list(header):
            got = _short(lines[skip]) if len(lines) > skip else "end of file"
            raise ValueError(f"{uri} line {skip + 1}: expected header {' '.join(header)!r}, got {got}")
        start += 1
    rows = []
    for number, line in enumerate(lines[start:], start=start + 1):
        if not line.strip():
            continue
        fields = line.split(None, len(converters) - 1)
        if len(fields) != len(converters):
            raise ValueError(f"{uri} line {number}: expected {len(converters)} fields, got {_short(line)}")
        try:
            rows.append(tuple(convert(field) for convert, field in zip(converters, fields)))
        except ValueError as err:
            raise ValueError(f"{uri} line {number}: {err} in {_short(line)}") from None
    return rows


def read_rows(
    fs: AbstractFileSystem,
    path: str,
    converters: Sequence[Callable[[str], Any]],
    header: Sequence[str] = (),
    skip: int = 0,
) -> list[tuple[Any, ...]]:
    """The parsed rows of the required text file ``path`` (see ``parse_rows``)."""
    return parse_rows(read_text(fs, path), to_uri(fs, path), converters, header, skip)


def contiguous_labels(class_keys: Iterable[Hashable]) -> dict[Any, int]:
    """0-based contiguous labels of the distinct ``class_keys``, in sorted order."""
    return {key: label for label, key in enumerate(sorted(set(class_keys)))}


def zero_shot_split(class_keys: Iterable[Hashable]) -> dict[Any, tuple[int, str]]:
    """(label, split) of each class: sorted, the first floor(n/2) classes train, the rest test."""
    labels = contiguous_labels(class_keys)
    n_train = len(labels) // 2
    return {key: (label, "train" if label < n_train else "test") for key, label in labels.items()}


def _image_size(fs: AbstractFileSystem, path: str) -> tuple[Optional[int], Optional[int]]:
    try:
        with fs.open(path, "rb") as file, Image.open(file) as image:
            return image.size
    except FileNotFoundError:
        logger.warning("missing image %s", to_uri(fs, path))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as err:
        # a decompression bomb (over twice Pillow's MAX_IMAGE_PIXELS) is refused like any unreadable image: the
        # embed stage lists it in `errors` when it fails to decode it
        logger.warning("%s: unreadable image header (%s: %s)", to_uri(fs, path), type(err).__name__, err)
    return None, None


def image_sizes(fs: AbstractFileSystem, paths: Sequence[str]) -> list[tuple[Optional[int], Optional[int]]]:
    """(width, height) of each image in ``paths``, read from the file headers by a thread pool.

    A missing or unreadable image gets (None, None) and a warning naming it: one bad file never stops
    a run; the embed stage records it in the ``errors`` table.
    """
    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=min(HEADER_READ_THREADS, len(paths))) as pool:
        return list(pool.map(lambda path: _image_size(fs, path), paths))


def images_table(
    fs: AbstractFileSystem,
    base: str,
    rel_paths: Sequence[str],
    labels: Sequence[int],
    class_names: Sequence[str],
    splits: Sequence[str],
    bboxes: Optional[Sequence[Optional[Box]]] = None,
) -> pa.Table:
    """The validated images table of the images ``base/<rel_path>``; sizes come from their headers."""
    paths = [join(base, rel) for rel in rel_paths]
    sizes = image_sizes(fs, paths)
    boxes = bboxes if bboxes is not None else [None] * len(paths)
    table = pa.table(
        {
            "image_id": pa.array(rel_paths, pa.string()),
            "uri": pa.array([to_uri(fs, path) for path in paths], pa.string()),
            "label": pa.array(labels, pa.int64()),
            "class_name": pa.array(class_names, pa.string()),
            "split": pa.array(splits, pa.string()),
            "bbox": pa.array([None if b is None else dict(zip("xywh", b)) for b in boxes], BBOX_TYPE),
            "width": pa.array([w for w, _ in sizes], pa.int32()),
            "height": pa.array([h for _, h in sizes], pa.int32()),
        },
        schema=IMAGES_SCHEMA,
    )
    logger.info("read %d images of %d classes from %s", len(table), len(set(labels)), to_uri(fs, base))
    return validate_images(table)
