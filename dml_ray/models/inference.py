"""Batch inference: a callable that turns decoded image batches into embeddings-table rows."""
from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import torch

from dml_ray.io.schemas import embedding_type
from dml_ray.models.checkpoint import load_checkpoint


def select_device(use_gpu: bool) -> torch.device:
    """CUDA when asked for and present, else CPU."""
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


class Embedder:
    """Loads a checkpoint once; each call embeds a decoded batch (rows with an error pass through)."""

    def __init__(self, checkpoint_uri: str, run_id: str, num_threads: int = 1, use_gpu: bool = False,
                 storage_options: Optional[dict] = None) -> None:
        torch.set_num_threads(num_threads)
        self.device = select_device(use_gpu)
        loaded = load_checkpoint(checkpoint_uri, storage_options)
        self.model = loaded.model.to(self.device).eval()
        self.model_id = loaded.model_id
        self.run_id = run_id
        self.dim = self.model.embedding_dim

    def embed(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised embeddings (N x d) and raw-embedding norms (N) of an N x 3 x S x S batch."""
        with torch.inference_mode():
            out = self.model(torch.from_numpy(images).to(self.device))
        return out.embedding.float().cpu().numpy(), out.raw.norm(dim=1).float().cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["image_id"])
        # an all-null error column arrives as NaN floats: only strings are errors
        errors = [e if isinstance(e, str) else None for e in batch["error"]]
        ok = np.array([e is None for e in errors], dtype=bool)
        emb = np.zeros((n, self.dim), dtype=np.float32)
        norm = np.zeros(n, dtype=np.float32)
        if ok.any():
            emb[ok], norm[ok] = self.embed(batch["image"][ok])
        flat = pa.array(emb.reshape(-1), pa.float32())
        embedding = pa.FixedSizeListArray.from_arrays(flat, self.dim, mask=pa.array(~ok))
        return pa.table({
            "run_id": pa.array([self.run_id] * n, pa.string()),
            "image_id": pa.array(batch["image_id"], pa.string()),
            "uri": pa.array(batch["uri"], pa.string()),
            "label": pa.array(batch["label"], pa.int64()),
            "split": pa.array(batch["split"], pa.string()),
            "model_id": pa.array([self.model_id] * n, pa.string()),
            "embedding": embedding.cast(embedding_type(self.dim)),
            "norm": pa.array(np.where(ok, norm, np.nan), pa.float32(), mask=~ok),
            "error": pa.array(errors, pa.string()),
        })
