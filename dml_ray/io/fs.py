"""fsspec helpers: one way to turn a URI into a file system, for fsspec and pyarrow users alike."""
from __future__ import annotations

from typing import Optional

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem


def url_to_fs(uri: str, storage_options: Optional[dict] = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec file system of ``uri`` and the path inside it.

    Object stores get no listings cache: commit markers written by other processes must be seen.
    """
    options = dict(storage_options or {})
    protocol = fsspec.core.split_protocol(uri)[0]
    if protocol not in (None, "file", "local", "memory"):
        options.setdefault("use_listings_cache", False)
    return fsspec.core.url_to_fs(uri, **options)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local file system (atomic renames available)."""
    return isinstance(fs, LocalFileSystem)


def join(uri: str, *parts: str) -> str:
    """Join URI path parts with '/' (works for local paths and object-store URIs)."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def pyarrow_fs(uri: str, storage_options: Optional[dict] = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow file system and path for ``uri`` (local, or fsspec wrapped for object stores)."""
    fs, path = url_to_fs(uri, storage_options)
    if is_local(fs):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
