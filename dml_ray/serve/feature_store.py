"""A run's stored feature maps by image id, read one Parquet row group at a time.

Holding the whole ``feature_maps`` table in memory costs N x C x H x W x 2 bytes (20 GB for 100k images of a
2048-channel backbone at 7 x 7) and a full read before the first map. This reader keeps only the ids and where
each row lives (file, row group, offset); a request decodes the one row group holding its row (only the
``feature_map`` column) and a byte-bounded LRU keeps recent groups. Tables written by ``dml_ray.io.tables`` have
row groups of about ``ROW_GROUP_BYTES``, so a miss decodes a few MiB; a table written as one huge row group
degrades to one full read, kept while the budget allows.

Hand-written: pyarrow reads whole row groups (``ParquetFile.read_row_group``) but has no id -> row index.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from dml_ray.io.run import Run

log = logging.getLogger(__name__)

CACHE_BYTES = 512 * 1024 * 1024


class FeatureMapReader:
    """Row-indexed access to a run's committed ``feature_maps`` table."""

    def __init__(self, run: Run, cache_bytes: int = CACHE_BYTES) -> None:
        self.run = run
        self.cache_bytes = cache_bytes
        self._files = run.files("feature_maps")
        self._handles: list[Any] = []
        self._parquet: list[pq.ParquetFile] = []
        self.where: dict[str, tuple[int, int, int]] = {}
        self.shape: tuple[int, int, int] | None = None
        for f, path in enumerate(self._files):
            handle = run.fs.open(path, "rb")
            parquet = pq.ParquetFile(handle)
            self._handles.append(handle)
            self._parquet.append(parquet)
            for g in range(parquet.num_row_groups):
                head = parquet.read_row_group(g, columns=["image_id", "channels", "map_h", "map_w"])
                if self.shape is None and head.num_rows:
                    self.shape = tuple(int(head.column(n)[0].as_py()) for n in ("channels", "map_h", "map_w"))
                for offset, image_id in enumerate(head.column("image_id").to_pylist()):
                    self.where[image_id] = (f, g, offset)
        self._groups: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached = 0
        self._lock = threading.Lock()
        log.debug("feature maps: %d rows in %d files", len(self.where), len(self._files))

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.where

    def __len__(self) -> int:
        return len(self.where)

    def _group(self, f: int, g: int) -> np.ndarray:
        """Row group ``g`` of file ``f``'s feature maps, rows x (C * H * W) float16 (cached, least recent out)."""
        key = (f, g)
        with self._lock:
            if key in self._groups:
                self._groups.move_to_end(key)
                return self._groups[key]
            column = self._parquet[f].read_row_group(g, columns=["feature_map"]).column(0).combine_chunks()
            values = np.asarray(column.flatten().to_numpy(zero_copy_only=False), np.float16)
            group = values.reshape(len(column), -1)
            self._groups[key] = group
            self._cached += group.nbytes
            while self._cached > self.cache_bytes and len(self._groups) > 1:
                _, old = self._groups.popitem(last=False)
                self._cached -= old.nbytes
            return group

    def get(self, image_id: str) -> np.ndarray:
        """The image's feature map, C x H x W float16; KeyError when the table has no row for it."""
        if image_id not in self.where:
            raise KeyError(f"no stored feature map for {image_id!r} (embed.feature_maps was off?)")
        f, g, offset = self.where[image_id]
        return self._group(f, g)[offset].reshape(self.shape)

    def close(self) -> None:
        for handle in self._handles:
            handle.close()
        self._handles, self._parquet = [], []
