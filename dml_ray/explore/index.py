"""A run's search index: faiss over its ``embeddings`` table, built once, saved in the run, memory-mapped when local.

Files (``runs/<id>/index/``): ``<model_id>.faiss`` (the faiss index; exact ``IndexFlatIP``/``IndexFlatL2`` by
default, IVF or HNSW per ``knn.index`` of the run's config, built by ``retrieval.knn_graph.build_ann_index``) and
``<model_id>.rows.parquet`` (row i of the index -> image_id, label, split; its metadata records the embeddings
table's commit time, so a recommitted table rebuilds the index). Scores follow ``retrieval.search``: cosine
similarity descending, or squared L2 distance ascending.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dml_ray.io.fs import is_local
from dml_ray.io.run import Run
from dml_ray.retrieval.knn_graph import HNSW_DEFAULTS, IVF_DEFAULTS, build_ann_index

log = logging.getLogger(__name__)

INDEX_DIR = "index"
COMMITTED_KEY = b"embeddings_committed_at"


@dataclass
class RunIndex:
    """A faiss index over a run's embeddings and the rows it indexes (in index order)."""

    index: faiss.Index
    rows: pa.Table  # image_id, label, split
    metric: str
    model_id: str

    def search(self, vectors: np.ndarray, k: int = 10) -> pa.Table:
        """The top ``k`` rows for each query vector: query, rank, image_id, label, split, score."""
        x = np.ascontiguousarray(np.atleast_2d(np.asarray(vectors, dtype=np.float32)))
        if x.shape[1] != self.index.d:
            raise ValueError(f"search: queries have dimension {x.shape[1]}, the index {self.index.d}")
        if not np.isfinite(x).all():
            raise ValueError("search: queries contain NaN or infinite values")
        if self.metric == "cosine":
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            if (norms == 0).any():
                raise ValueError("search: a zero query vector has no cosine similarity")
            x = x / norms
        k = min(int(k), self.index.ntotal)
        if k < 1:
            raise ValueError("search: k must be >= 1 and the index non-empty")
        scores, idx = self.index.search(x, k)
        keep = idx.reshape(-1) >= 0  # approximate indexes may return fewer than k
        flat = idx.reshape(-1)[keep]
        picked = self.rows.take(pa.array(flat))
        return pa.table({
            "query": pa.array(np.repeat(np.arange(len(x)), k)[keep], pa.int64()),
            "rank": pa.array(np.tile(np.arange(1, k + 1), len(x))[keep], pa.int64()),
            "image_id": picked.column("image_id"),
            "label": picked.column("label"),
            "split": picked.column("split"),
            "score": pa.array(scores.reshape(-1)[keep], pa.float32()),
        })


def _knn_settings(run: Run) -> tuple[str, str, dict[str, Any]]:
    """(metric, index kind, index params) of the run's config ``knn`` section; cosine/exact without one."""
    knn = (run.manifest.get("config") or {}).get("knn") or {}
    return knn.get("metric", "cosine"), knn.get("index", "exact"), dict(knn.get("index_params") or {})


def build_index(vectors: np.ndarray, metric: str = "cosine", kind: str = "exact",
                params: Optional[dict[str, Any]] = None) -> faiss.Index:
    """An exact flat index (inner product of L2-normalised rows for cosine, L2 otherwise), or IVF/HNSW."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if kind != "exact":
        return build_ann_index(x, metric, kind, params or None, use_gpu=False)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        index = faiss.IndexFlatIP(x.shape[1])
    else:
        index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    return index


def _set_search_params(index: faiss.Index, kind: str, params: dict[str, Any]) -> None:
    if kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = int({**IVF_DEFAULTS, **params}["nprobe"])
    elif kind == "hnsw":
        index.hnsw.efSearch = int({**HNSW_DEFAULTS, **params}["efSearch"])


def _read_index(run: Run, uri: str) -> faiss.Index:
    """The saved index, memory-mapped on a local file system, else read into memory."""
    if is_local(run.fs):
        return faiss.read_index(run.fs_path(uri), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    return faiss.deserialize_index(np.frombuffer(run.read_bytes(uri), dtype=np.uint8))


def _index_bytes(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def run_index(run: Run, rebuild: bool = False) -> RunIndex:
    """The run's search index: loaded when saved and current, else built from ``embeddings`` and saved."""
    committed_at = run.committed_at("embeddings").encode()
    model_ids = run.read("embeddings", columns=["model_id"]).column("model_id").unique().to_pylist()
    if len(model_ids) != 1:
        raise ValueError(f"{run!r}: embeddings of {len(model_ids)} models ({model_ids[:3]}); expected one")
    model_id = model_ids[0]
    metric, kind, params = _knn_settings(run)
    index_uri = run.path(INDEX_DIR, f"{model_id}.faiss")
    rows_uri = run.path(INDEX_DIR, f"{model_id}.rows.parquet")
    rows_bytes = None if rebuild else run.read_bytes(rows_uri)
    if rows_bytes is not None and run.exists(index_uri):
        rows = pq.read_table(io.BytesIO(rows_bytes))
        meta = rows.schema.metadata or {}
        if meta.get(COMMITTED_KEY) == committed_at and meta.get(b"kind") == kind.encode():
            index = _read_index(run, index_uri)
            _set_search_params(index, kind, params)
            log.info("search index: loaded %s (%d rows, %s)", index_uri, index.ntotal, kind)
            return RunIndex(index, rows.replace_schema_metadata(None), metric, model_id)
    table = run.read("embeddings", columns=["image_id", "label", "split", "embedding"])
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vectors = vectors.reshape(table.num_rows, -1).astype(np.float32)
    index = build_index(vectors, metric, kind, params)
    rows = table.select(["image_id", "label", "split"])
    buf = io.BytesIO()
    pq.write_table(rows.replace_schema_metadata({COMMITTED_KEY: committed_at, b"kind": kind.encode(),
                                                 b"metric": metric.encode()}), buf)
    run.write_bytes(index_uri, _index_bytes(index))
    run.write_bytes(rows_uri, buf.getvalue())  # written last: its presence marks the index complete
    log.info("search index: built %s (%d rows, %s, %s)", index_uri, index.ntotal, kind, metric)
    if is_local(run.fs):
        index = _read_index(run, index_uri)
        _set_search_params(index, kind, params)
    return RunIndex(index, rows, metric, model_id)


def run_checkpoint(run: Run) -> str:
    """The checkpoint the run embedded with: its own trained model, else its config's ``model.weights`` file."""
    own = run.path("model", "model.pt")
    if run.exists(own):
        return own
    weights = ((run.manifest.get("config") or {}).get("model") or {}).get("weights")
    if weights in (None, "none", "imagenet"):
        raise FileNotFoundError(f"{run!r}: no model checkpoint (no model/model.pt and no model.weights file)")
    return weights


Queries = Union[np.ndarray, Sequence[Any], Any]


def is_vectors(queries: Queries) -> bool:
    """Whether ``queries`` are embedding vectors (a numeric array) rather than images."""
    return isinstance(queries, np.ndarray) and np.issubdtype(queries.dtype, np.number)


__all__ = ["RunIndex", "build_index", "run_index", "run_checkpoint", "is_vectors"]
