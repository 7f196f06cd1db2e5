"""What the explorer shows, as plain functions of a run: gallery, top-k, pair and point maps, region re-ranking,
uploads, projection. The web app (app.py) only serialises these; tests compare the page against them.

Maps come from the stored ``feature_maps`` table and the model's head alone (no backbone pass for stored images,
DESIGN.md "The one invariant behind every activation map"): ``explain.batch.reference_maps`` for the pair maps,
``explain.decomposition.point_specific_map`` for a clicked point, ``explain.interactive`` for a region.
"""
from __future__ import annotations

import copy
import io
import logging
from functools import lru_cache
from typing import Any, Optional

import faiss
import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from dml_ray.config import DataConfig
from dml_ray.errors import BadInput
from dml_ray.explain.batch import reference_maps
from dml_ray.explain.decomposition import pixel_to_grid, point_specific_map
from dml_ray.explain.interactive import box_coverage_mask, partial_query, rank_gallery
from dml_ray.explore.index import run_checkpoint, run_index
from dml_ray.explore.model import load_model
from dml_ray.explore.projection import project_2d, resolve_method
from dml_ray.io.run import Run
from dml_ray.serve.feature_store import FeatureMapReader
from dml_ray.serve.localization import LocalizationView, input_view_png

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 8 * 1024 * 1024
MAX_UPLOAD_PIXELS = 40_000_000  # below Pillow's decompression-bomb limit (~89 M), refused before decoding
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
DEFAULT_METHODS = ("decomposition", "decomposition_bias", "distcam")


class Explorer:
    """A run opened for interactive use: its index, stored embeddings and feature maps, and its model's head."""

    def __init__(self, run: Run, methods: Optional[list[str]] = None, cache_size: int = 1024,
                 use_gpu: bool = False, num_threads: Optional[int] = 1) -> None:
        """``num_threads``: torch and faiss threads of this process (None leaves them). A request's math is
        milliseconds of small tensor ops; on a busy machine two OpenMP threads per op stalled at their barriers and
        made every request 5-50 x slower (bench/serve_latency.py, BENCHMARKS.md): serve concurrency comes from
        concurrent requests and Ray Serve replicas, not from threads inside one request."""
        if num_threads is not None:
            torch.set_num_threads(num_threads)
            faiss.omp_set_num_threads(num_threads)
        self.run = run
        explain = (run.manifest.get("config") or {}).get("explain") or {}
        self.methods = list(methods or explain.get("methods") or DEFAULT_METHODS)
        self.index = run_index(run)
        emb = run.read("embeddings", columns=["image_id", "label", "split", "embedding"])
        self.ids = emb.column("image_id").to_pylist()
        self.row_of = {i: r for r, i in enumerate(self.ids)}
        self.labels = np.asarray(emb.column("label").to_numpy(), np.int64)
        self.splits = emb.column("split").to_pylist()
        self.embeddings = torch.from_numpy(np.array(  # one writable float32 copy of Arrow's read-only buffer
            emb.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
            .reshape(emb.num_rows, -1))
        images = run.read("images", columns=["image_id", "uri", "class_name"]) if run.committed("images") else None
        self.uris = dict(zip(images.column("image_id").to_pylist(), images.column("uri").to_pylist())) \
            if images is not None else {}
        self.class_names = dict(zip(images.column("image_id").to_pylist(), images.column("class_name").to_pylist())) \
            if images is not None else {}
        # uploads run the backbone on CUDA when asked for and present; stored maps need only the head, kept on CPU
        self.embedder = load_model(run_checkpoint(run), run.storage_options, use_gpu=use_gpu)
        head = self.embedder.model.head
        self.head = (copy.deepcopy(head).cpu() if self.embedder.device.type != "cpu" else head).eval()
        self.image_size = (self.embedder.image_size, self.embedder.image_size)
        resize = self.embedder.resize  # the checkpoint's frame, for runs whose manifest has no data config
        self.localization = LocalizationView(run, fallback=DataConfig(
            image_size=self.embedder.image_size, resize=resize if isinstance(resize, int) else max(resize),
            frame="resize_crop" if isinstance(resize, int) else "resize"))
        self._reader: Optional[FeatureMapReader] = None
        self._projections: dict[str, np.ndarray] = {}
        self._features = lru_cache(maxsize=cache_size)(self._read_features)
        self.pair_maps = lru_cache(maxsize=cache_size)(self._pair_maps)

    # ---- ids: everything a request names is resolved through the run's tables ----
    def check_id(self, image_id: str) -> int:
        """The row of a stored image id; anything else (a path, a URL) is refused."""
        row = self.row_of.get(image_id)
        if row is None:
            raise KeyError(f"unknown image id {image_id[:80]!r}")
        return row

    def image_bytes(self, image_id: str) -> bytes:
        """The stored image's bytes, read from the uri the images table gives for the id."""
        self.check_id(image_id)
        uri = self.uris.get(image_id)
        if uri is None:
            raise KeyError(f"image {image_id!r} has no uri in the images table")
        return self.run.read_input(uri)

    def input_view(self, image_id: str) -> bytes:
        """A stored image in the model-input frame (resize + centre crop) as PNG: the frame of localization boxes."""
        return input_view_png(self.image_bytes(image_id), self.localization.data)

    # ---- gallery, top-k ----
    def gallery(self, split: Optional[str] = None, label: Optional[int] = None, offset: int = 0,
                limit: int = 100) -> list[dict[str, Any]]:
        rows = [i for i in range(len(self.ids))
                if (split is None or self.splits[i] == split) and (label is None or self.labels[i] == label)]
        return [self._row(i) for i in rows[offset:offset + limit]]

    def _row(self, r: int) -> dict[str, Any]:
        return {"image_id": self.ids[r], "label": int(self.labels[r]), "split": self.splits[r],
                "class_name": self.class_names.get(self.ids[r])}

    def topk(self, image_id: str, k: int = 10) -> list[dict[str, Any]]:
        """The ``k`` nearest stored images of a stored one (itself excluded), with whether the labels match."""
        r = self.check_id(image_id)
        result = self.index.search(self.embeddings[r:r + 1].numpy(), k + 1)
        return self._hits(result, exclude=image_id, label=int(self.labels[r]), k=k)

    def _hits(self, result: pa.Table, exclude: Optional[str], label: Optional[int], k: int) -> list[dict[str, Any]]:
        out = []
        for row in result.to_pylist():
            if row["image_id"] == exclude:
                continue
            out.append({"image_id": row["image_id"], "label": row["label"], "split": row["split"],
                        "score": float(row["score"]), "match": None if label is None else row["label"] == label})
        return out[:k]

    # ---- maps from stored feature maps + the head ----
    def _feature_maps(self) -> FeatureMapReader:
        """The stored feature maps, opened on first use (ids and row positions only; rows are read on demand)."""
        if self._reader is None:
            if not self.run.committed("feature_maps"):
                raise KeyError("the run has no stored feature maps (embed.feature_maps was off?)")
            self._reader = FeatureMapReader(self.run)
        return self._reader

    def _read_features(self, image_id: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(feature map C x H x W, equivalent features H x W x d, raw embedding d, bias d) of a stored image."""
        self.check_id(image_id)
        return self._features_of(torch.from_numpy(self._feature_maps().get(image_id).astype(np.float32)))

    def _features_of(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            e, bias = self.head.equivalent_features(a.unsqueeze(0))
        return a, e[0], (e[0].sum(dim=(0, 1)) + bias[0]), bias[0]

    def _pair_maps(self, query_id: str, ref_id: str) -> dict[str, np.ndarray]:
        """Every configured map (H x W) of the query against the reference, and their cosine (``cosine``)."""
        a_q = self._features(query_id)[0]
        a_r, _, raw_r, bias_r = self._features(ref_id)
        maps, scores = reference_maps(self.head, a_q.unsqueeze(0), raw_r.unsqueeze(0), bias_r.unsqueeze(0),
                                      a_r.mean(dim=(1, 2)).unsqueeze(0), self.methods)
        out = {m: v[0].float().numpy() for m, v in maps.items()}
        out["cosine"] = np.float32(scores[0])
        return out

    def point_map(self, query_id: str, ref_id: str, row: float, col: float) -> np.ndarray:
        """The point-specific map on the reference of the query's pixel (row, col) in the model-input frame
        (activation-decomposition-tip2021 Eq. 5, I(x, y)), H x W."""
        _, e_q, raw_q, _ = self._features(query_id)
        _, e_r, raw_r, _ = self._features(ref_id)
        grid = pixel_to_grid(torch.tensor([[row, col]], dtype=torch.float32), self.image_size, tuple(e_q.shape[:2]))
        return point_specific_map(e_q[None], e_r[None], raw_q[None], raw_r[None], grid)[0].numpy()

    def region_rerank(self, query_id: str, box: tuple[float, float, float, float], k: int = 10) -> list[dict]:
        """The stored gallery re-ranked by the share of similarity of a box (x, y, width, height, model-input
        pixels) of the query (activation-decomposition-tip2021 Sec. VII-B), from stored embeddings only."""
        _, e_q, raw_q, _ = self._features(query_id)
        mask = box_coverage_mask(torch.tensor([box], dtype=torch.float32), self.image_size, tuple(e_q.shape[:2]))
        if float(mask.sum()) == 0:
            raise ValueError("the box covers no part of the image")
        vector = partial_query(e_q[None], raw_q[None], mask)
        scores, idx = rank_gallery(vector, self.embeddings, k + 1)
        label = int(self.labels[self.check_id(query_id)])
        hits = [{"image_id": self.ids[i], "label": int(self.labels[i]), "split": self.splits[i], "score": float(s),
                 "match": int(self.labels[i]) == label} for s, i in zip(scores[0].tolist(), idx[0].tolist())
                if self.ids[i] != query_id]
        return hits[:k]

    # ---- uploads ----
    def check_upload(self, data: bytes) -> Image.Image:
        """An uploaded image, refused when too large, not an image of an allowed type, or too many pixels (checked
        from the header before decoding: the decompression-bomb guard)."""
        if len(data) > MAX_UPLOAD_BYTES:
            raise BadInput(f"upload of {len(data)} bytes exceeds {MAX_UPLOAD_BYTES}")
        try:
            with Image.open(io.BytesIO(data)) as probe:
                fmt, (w, h) = probe.format, probe.size
                if fmt not in UPLOAD_FORMATS:
                    raise BadInput(f"upload: {fmt} images are not accepted ({', '.join(UPLOAD_FORMATS)})")
                if w * h > MAX_UPLOAD_PIXELS:
                    raise BadInput(f"upload: {w} x {h} pixels exceeds {MAX_UPLOAD_PIXELS}")
                probe.load()
                return probe.convert("RGB")
        except (Image.UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as err:
            if isinstance(err, BadInput):
                raise
            raise BadInput(f"upload: not a readable image ({type(err).__name__})") from None

    def upload_topk(self, data: bytes, k: int = 10, maps_for: int = 3
                    ) -> tuple[list[dict[str, Any]], np.ndarray, dict[str, dict[str, np.ndarray]]]:
        """One forward of an uploaded image: its top-k, its embedding, and the configured maps of the upload
        against its first ``maps_for`` hits (the hits' stored feature maps; empty when the run stores none)."""
        out = self.embedder.forward(self.embedder.tensors([self.check_upload(data)]))
        vector = out.embedding.float().cpu().numpy()
        hits = self._hits(self.index.search(vector, k), None, None, k)
        maps: dict[str, dict[str, np.ndarray]] = {}
        if self.run.committed("feature_maps"):
            a_q = out.feature_map.float().cpu()
            for hit in hits[:maps_for]:
                a_r, _, raw_r, bias_r = self._features(hit["image_id"])
                arrays, _ = reference_maps(self.head, a_q, raw_r[None], bias_r[None], a_r.mean(dim=(1, 2))[None],
                                           self.methods)
                maps[hit["image_id"]] = {m: v[0].numpy() for m, v in arrays.items()}
        return hits, vector[0], maps

    # ---- projection ----
    def projection(self, method: str = "pca") -> tuple[str, np.ndarray]:
        """The method used and the 2-D projection (``explore.projection.project_2d``: pca, umap or auto) of the
        stored embeddings (N x 2), rows in ``self.ids`` order; computed once per method."""
        chosen = resolve_method(method)
        if chosen not in self._projections:
            self._projections[chosen] = project_2d(self.embeddings.numpy(), chosen)
        return chosen, self._projections[chosen]
