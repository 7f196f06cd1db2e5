"""A torch Dataset over rows of the images table, reading each image through fsspec."""
from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import Dataset

from dml_ray.data.transforms import decode_image
from dml_ray.io.fs import url_to_fs

log = logging.getLogger(__name__)


class ImageTableDataset(Dataset):
    """(image tensor, label) pairs; an unreadable image is replaced by another image of its class."""

    def __init__(self, uris: Sequence[str], labels: Sequence[int], transform: Callable,
                 storage_options: Optional[dict] = None) -> None:
        if len(uris) != len(labels):
            raise ValueError("uris and labels differ in length")
        self.uris = list(uris)
        self.labels = [int(x) for x in labels]
        self.transform = transform
        self.storage_options = storage_options
        self._by_class: dict[int, list[int]] = {}
        for i, label in enumerate(self.labels):
            self._by_class.setdefault(label, []).append(i)

    def __len__(self) -> int:
        return len(self.uris)

    def _load(self, index: int) -> torch.Tensor:
        fs, path = url_to_fs(self.uris[index], self.storage_options)
        with fs.open(path, "rb") as f:
            return self.transform(decode_image(f.read()))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = self.labels[index]
        candidates = self._by_class[label]
        start = candidates.index(index)
        for offset in range(len(candidates)):
            i = candidates[(start + offset) % len(candidates)]
            try:
                return self._load(i), label
            except Exception as err:  # noqa: BLE001 - a corrupt training image must not stop training
                log.warning("skipping unreadable training image %s: %s", self.uris[i], err)
        raise RuntimeError(f"no readable image of label {label}")
