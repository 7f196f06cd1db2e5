"""Class prototypes (dist-cam Sec. 3.2): per class, the mean GAP feature and mean embedding of its training images."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from dml_ray.explain.distcam import class_prototypes as mean_per_class
from dml_ray.io.schemas import embedding_type


def fixed_list_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """An N-row fixed_size_list<float> column as an N x k float32 array."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.values.to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size).astype(np.float32)


def class_prototypes(labels: np.ndarray, gap_features: np.ndarray, embeddings: np.ndarray, raw: np.ndarray,
                     bias: np.ndarray, model_id: str, run_id: str) -> pa.Table:
    """The ``prototypes`` table: per label, mean GAP feature, mean (normalised) embedding, mean raw embedding
    and mean head bias (so that a prototype is a valid decomposition reference: mean raw = mean sum e + mean bias),
    and the number of samples."""
    classes, counts = np.unique(labels, return_counts=True)
    label_tensor = torch.from_numpy(np.asarray(labels))

    def means(x: np.ndarray) -> np.ndarray:
        return mean_per_class(torch.from_numpy(x).double(), label_tensor)[1].float().numpy()

    def column(x: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), x.shape[1])

    n = len(classes)
    return pa.table({
        "run_id": pa.array([run_id] * n, pa.string()),
        "label": pa.array(classes.astype(np.int64)),
        "model_id": pa.array([model_id] * n, pa.string()),
        "gap_feature": column(means(gap_features)),
        "embedding": column(means(embeddings)).cast(embedding_type(embeddings.shape[1])),
        "raw_embedding": column(means(raw)),
        "bias": column(means(bias)),
        "n_samples": pa.array(counts.astype(np.int64)),
    })
