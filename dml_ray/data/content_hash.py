"""Content hashes of image bytes: the content part of the incremental-embedding key (DESIGN.md nightly jobs)."""
from __future__ import annotations

import hashlib

import pyarrow as pa


def content_hash(data: bytes) -> str:
    """SHA-256 of ``data`` as hex."""
    return hashlib.sha256(data).hexdigest()


def add_content_hash(batch: pa.Table) -> pa.Table:
    """Add a ``content_hash`` column computed from ``bytes`` (null where the bytes are null)."""
    hashes = [None if b is None else content_hash(b) for b in batch.column("bytes").to_pylist()]
    return batch.append_column("content_hash", pa.array(hashes, pa.string()))
