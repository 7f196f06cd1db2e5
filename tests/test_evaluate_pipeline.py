"""pipelines/evaluate.py on a local Ray instance: metrics are a function of the rows, not of their order."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from dml_ray.config import EvaluateConfig
from dml_ray.io.schemas import embedding_type
from pipelines.evaluate import run_evaluate


def _embeddings_table(n: int = 400, seed: int = 5) -> pa.Table:
    """Overlapping classes plus exact duplicates across classes, in a test split and a train split."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    emb = (0.6 * rng.normal(size=(10, 6))[labels] + rng.normal(size=(n, 6))).astype(np.float32)
    emb[n // 2: n // 2 + 40] = emb[:40]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    column = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), 6).cast(embedding_type(6))
    return pa.table({"image_id": [f"img{i:04d}" for i in range(n)], "label": pa.array(labels, pa.int64()),
                     "split": ["test" if i % 4 else "train" for i in range(n)], "model_id": ["m"] * n,
                     "embedding": column, "norm": pa.array(np.ones(n, np.float32))})


def test_evaluation_is_a_function_of_the_rows_not_their_order(ray_session):
    table = _embeddings_table()
    cfg = EvaluateConfig(splits=["test", "train"], query_shards=3)
    expected = run_evaluate(table, [1, 2, 4, 8], cfg, "r").to_pylist()
    assert {r["metric"] for r in expected} >= {"recall", "map_at_r", "nmi"}
    for seed in range(3):
        shuffled = table.take(np.random.default_rng(seed).permutation(table.num_rows))
        assert run_evaluate(shuffled, [1, 2, 4, 8], cfg, "r").to_pylist() == expected
