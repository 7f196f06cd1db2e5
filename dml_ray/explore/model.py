"""``load_model``: a checkpoint's model with its own eval transform, embedding images given as PIL, paths or URIs.

The counterpart of pytorch-metric-learning's ``InferenceModel.get_embeddings``: everything needed to embed comes
from the checkpoint alone (weights, model config, image size, resize frame), so a model file is enough.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image

from dml_ray.data.transforms import decode_image, eval_transform
from dml_ray.errors import BadInput
from dml_ray.io.fs import url_to_fs
from dml_ray.io.run import storage_options_of
from dml_ray.models.checkpoint import LoadedModel, load_checkpoint
from dml_ray.models.inference import select_device

log = logging.getLogger(__name__)

ImageLike = Union[Image.Image, str]


def checkpoint_resize(loaded: LoadedModel) -> int | tuple[int, ...]:
    """The resize the model was evaluated with (shorter side, or the (h, w) frame), as train.py records it."""
    resize = loaded.extra.get("resize", loaded.image_size)
    return int(resize) if isinstance(resize, (int, float)) else tuple(int(v) for v in resize)


class ImageEmbedder:
    """A loaded checkpoint and its eval transform; :meth:`embed` returns L2-normalised float32 embeddings."""

    def __init__(self, loaded: LoadedModel, storage_options: Optional[dict] = None, use_gpu: bool = False,
                 batch_size: int = 32) -> None:
        self.loaded = loaded
        self.device = select_device(use_gpu)
        self.model = loaded.model.to(self.device).eval()
        self.model_id = loaded.model_id
        self.image_size = loaded.image_size
        self.resize = checkpoint_resize(loaded)
        self.transform = eval_transform(self.resize, self.image_size)
        self.storage_options = storage_options
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return int(self.model.embedding_dim)

    def _image(self, image: ImageLike) -> Image.Image:
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        fs, path = url_to_fs(str(image), self.storage_options)
        try:
            return decode_image(fs.cat_file(path))
        except (Image.UnidentifiedImageError, Image.DecompressionBombError) as err:
            raise BadInput(f"{image}: not a usable image ({type(err).__name__})") from None

    def tensors(self, images: Iterable[ImageLike]) -> torch.Tensor:
        """The model inputs (N x 3 x S x S) of ``images``."""
        return torch.stack([self.transform(self._image(i)) for i in images])

    def forward(self, batch: torch.Tensor) -> Any:
        """The model's output for a batch of inputs (embedding, raw, feature_map)."""
        with torch.inference_mode():
            return self.model(batch.to(self.device))

    def embed(self, images: Union[ImageLike, Sequence[ImageLike]]) -> np.ndarray:
        """(N, d) float32 embeddings of ``images`` (PIL images, local paths or fsspec URIs), as the embed stage
        stores them."""
        if isinstance(images, (str, Image.Image)):
            images = [images]
        images = list(images)
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            out[start:start + len(chunk)] = self.forward(self.tensors(chunk)).embedding.float().cpu().numpy()
        return out


def load_model(uri: str, storage: Any = None, use_gpu: bool = False) -> ImageEmbedder:
    """An embedder from a checkpoint at any fsspec URI (``storage``: a StorageConfig, RunConfig or options dict)."""
    options = storage_options_of(storage)
    return ImageEmbedder(load_checkpoint(uri, options), options, use_gpu=use_gpu)
