"""Batch inference: a callable that turns decoded image batches into embeddings-table rows."""
from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import torch

from dml_ray.io.schemas import embedding_type
from dml_ray.models.checkpoint import load_checkpoint
from dml_ray.precision import as_float32, autocast

EMBEDDING_COLUMNS = ["run_id", "image_id", "label", "split", "model_id", "embedding", "norm"]
FEATURE_MAP_COLUMNS = ["run_id", "image_id", "label", "split", "model_id", "channels", "map_h", "map_w",
                       "feature_map", "gap_feature", "bias"]


def select_device(use_gpu: bool) -> torch.device:
    """CUDA when asked for and present, else CPU."""
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def _fixed_list(values: np.ndarray, ok: np.ndarray) -> pa.Array:
    """An N x k float32 array as fixed_size_list<float32>[k], null where not ``ok``."""
    flat = pa.array(values.reshape(-1), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1], mask=pa.array(~ok))


class Embedder:
    """Loads a checkpoint once; each call embeds a decoded batch (rows with an error pass through).

    The forward pass runs under autocast for ``precision`` (fp32 | bf16 | fp16); what is stored is float32
    (the feature map fp16), computed from the float32 copy of the outputs.
    With ``feature_maps`` the rows also carry the feature map (fp16), its GAP feature and the head's
    bias for the input (DESIGN.md invariant), computed in the same forward pass. Any model whose output
    has ``embedding`` and ``raw`` embeds (EmbeddingModel, DeMLModel); feature maps need an EmbeddingModel's head.
    """

    def __init__(self, checkpoint_uri: str, run_id: str, num_threads: int = 1, use_gpu: bool = False,
                 storage_options: Optional[dict] = None, feature_maps: bool = False, precision: str = "fp32") -> None:
        torch.set_num_threads(num_threads)
        self.device = select_device(use_gpu)
        self.precision = precision
        loaded = load_checkpoint(checkpoint_uri, storage_options)
        self.model = loaded.model.to(self.device).eval()
        self.model_id = loaded.model_id
        self.run_id = run_id
        self.dim = self.model.embedding_dim
        self.feature_maps = feature_maps
        self.map_shape = self._feature_map_shape(loaded.image_size) if feature_maps else None

    def _feature_map_shape(self, image_size: int) -> tuple[int, ...]:
        """(C, H, W) of the model's feature map, probed with one blank image."""
        with torch.inference_mode():
            probe = torch.zeros(1, 3, image_size, image_size, device=self.device)
            return tuple(self.model(probe).feature_map.shape[1:])

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["image_id"])
        # an all-null error column arrives as NaN floats: only strings are errors
        errors = [e if isinstance(e, str) else None for e in batch["error"]]
        ok = np.array([e is None for e in errors], dtype=bool)
        emb = np.zeros((n, self.dim), dtype=np.float32)
        norm = np.zeros(n, dtype=np.float32)
        maps = None
        if ok.any():
            with torch.inference_mode():
                with autocast(self.precision, self.device):
                    out = self.model(torch.from_numpy(batch["image"][ok]).to(self.device))
                out = as_float32(out)
                emb[ok] = out.embedding.float().cpu().numpy()
                norm[ok] = out.raw.norm(dim=1).float().cpu().numpy()
                if self.feature_maps:
                    maps = self._feature_map_columns(out.feature_map, ok)
        columns = {
            "run_id": pa.array([self.run_id] * n, pa.string()),
            "image_id": pa.array(batch["image_id"], pa.string()),
            "uri": pa.array(batch["uri"], pa.string()),
            "label": pa.array(batch["label"], pa.int64()),
            "split": pa.array(batch["split"], pa.string()),
            "model_id": pa.array([self.model_id] * n, pa.string()),
            "embedding": _fixed_list(emb, ok).cast(embedding_type(self.dim)),
            "norm": pa.array(norm, pa.float32(), mask=~ok),
            "error": pa.array(errors, pa.string()),
        }
        if self.feature_maps:
            columns.update(maps if maps is not None else self._null_feature_maps(n))
        return pa.table(columns)

    def _feature_map_columns(self, feature_map: torch.Tensor, ok: np.ndarray) -> dict[str, pa.Array]:
        _, bias = self.model.equivalent_features(feature_map)
        c, h, w = feature_map.shape[1:]
        n = len(ok)
        a = np.zeros((n, c * h * w), dtype=np.float16)
        gap = np.zeros((n, c), dtype=np.float32)
        b = np.zeros((n, self.dim), dtype=np.float32)
        a[ok] = feature_map.flatten(1).half().cpu().numpy()
        gap[ok] = feature_map.mean(dim=(2, 3)).float().cpu().numpy()
        b[ok] = bias.float().cpu().numpy()
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * (c * h * w))
        return {
            "channels": pa.array(np.full(n, c, np.int32)),
            "map_h": pa.array(np.full(n, h, np.int32)),
            "map_w": pa.array(np.full(n, w, np.int32)),
            "feature_map": pa.ListArray.from_arrays(offsets, pa.array(a.reshape(-1), pa.float16()),
                                                    mask=pa.array(~ok)),
            "gap_feature": _fixed_list(gap, ok),
            "bias": _fixed_list(b, ok),
        }

    def _null_feature_maps(self, n: int) -> dict[str, pa.Array]:
        return {
            "channels": pa.nulls(n, pa.int32()), "map_h": pa.nulls(n, pa.int32()), "map_w": pa.nulls(n, pa.int32()),
            "feature_map": pa.nulls(n, pa.list_(pa.float16())),
            "gap_feature": pa.nulls(n, pa.list_(pa.float32(), self.map_shape[0])),
            "bias": pa.nulls(n, pa.list_(pa.float32(), self.dim)),
        }
