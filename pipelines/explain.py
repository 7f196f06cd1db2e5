"""Dataset-scale activation maps on Ray Data: stored feature maps + reference vectors -> activation_maps.

Each image of the explained splits is paired with its nearest gallery neighbour (itself excluded)
and/or its nearest class prototype. References are joined in as vectors (raw embedding, head bias,
GAP feature), so no backbone runs in this stage: the maps are einsums over the stored feature maps
and, for the Grad-CAM family, one backward through the head. Below ``explain.in_process_below`` images
the same per-batch classes run in the driver instead (pipelines/in_process.py): no Ray Data job, no
actor start, the same rows.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch

from dml_ray import console
from dml_ray.config import DataConfig, ExplainConfig
from dml_ray.data.batches import decode_batch, fetch_bytes
from dml_ray.data.transforms import decode_image, display_view
from dml_ray.explain.batch import reference_maps
from dml_ray.explain.decomposition import point_to_point_map
from dml_ray.explain.distcam import nearest_prototype
from dml_ray.explain.oam import REFERENCE_KIND as SELF_KIND
from dml_ray.explain.oam import ObjectAttentionMapper
from dml_ray.io.schemas import ACTIVATION_MAPS_SCHEMA
from dml_ray.io.run import Run
from dml_ray.models.checkpoint import LoadedModel, load_checkpoint
from dml_ray.precision import autocast
from dml_ray.report.overlays import gallery_figure
from dml_ray.retrieval.prototypes import class_prototypes, fixed_list_to_numpy
from dml_ray.retrieval.search import search_excluding_self
from pipelines.in_process import (
    DriverThreads,
    apply_steps,
    file_batches,
    prefetched,
    runs_in_process,
    table_batches,
    write_parquet_stream,
)

log = logging.getLogger(__name__)

GALLERY_FILE = "explain_gallery.png"
SMALL_FEATURE_COLUMNS = ["image_id", "label", "split", "model_id", "gap_feature", "bias"]


@dataclass(frozen=True)
class ExplainResult:
    rows: int
    seconds: float
    activation_maps_uri: str
    prototypes_uri: Optional[str]


def _raw(embeddings: pa.Table) -> np.ndarray:
    return fixed_list_to_numpy(embeddings.column("embedding")) * embeddings.column("norm").to_numpy()[:, None]


def build_prototypes(embeddings: pa.Table, features: pa.Table, run_id: str, splits: list[str]) -> pa.Table:
    """The ``prototypes`` table (dist-cam Eq. 7): per split and class, over the train split and each explained split.

    Zero-shot splits hold classes the train split never saw, so an image's prototype reference is taken from
    its own split's prototypes (the mean over that class's images there, as Dist-CAM's support set).
    """
    parts = []
    # In-Shop queries take the gallery's prototypes
    for split in dict.fromkeys(["train", *splits, *(["gallery"] if "query" in splits else [])]):
        rows = embeddings.filter(pc.equal(embeddings.column("split"), split))
        if rows.num_rows == 0:
            raise ValueError(f"explain: no {split!r} embeddings to build class prototypes from (embed.splits)")
        feats = _aligned(features, rows.column("image_id"))
        table = class_prototypes(rows.column("label").to_numpy(), fixed_list_to_numpy(feats.column("gap_feature")),
                                 fixed_list_to_numpy(rows.column("embedding")), _raw(rows),
                                 fixed_list_to_numpy(feats.column("bias")), rows.column("model_id")[0].as_py(), run_id)
        parts.append(table.add_column(1, "split", pa.array([split] * table.num_rows, pa.string())))
    return pa.concat_tables(parts)


def _aligned(table: pa.Table, image_ids: pa.ChunkedArray) -> pa.Table:
    """Rows of ``table`` in the order of ``image_ids`` (every id must be present)."""
    index = pc.index_in(image_ids, value_set=table.column("image_id").combine_chunks())
    if index.null_count:
        raise ValueError("explain: some embedded images have no stored feature map")
    return table.take(index)


def build_references(embeddings: pa.Table, features: pa.Table, prototypes: pa.Table, splits: list[str],
                     kinds: list[str]) -> pa.Table:
    """One row per (image, reference): reference id and kind, and its raw embedding, bias and GAP feature."""
    parts = []
    for split in splits:
        q = embeddings.filter(pc.equal(embeddings.column("split"), split))
        # In-Shop queries search the gallery; every other split searches itself
        g = embeddings.filter(pc.equal(embeddings.column("split"), "gallery" if split == "query" else split))
        if q.num_rows == 0 or g.num_rows < 2:
            raise ValueError(f"explain: split {split!r} has too few embeddings")
        ids = np.asarray(q.column("image_id").to_pylist(), dtype=object)
        gap = fixed_list_to_numpy(_aligned(features, q.column("image_id")).column("gap_feature"))
        if "neighbor" in kinds:
            g_ids = np.asarray(g.column("image_id").to_pylist(), dtype=object)
            g_feats = _aligned(features, g.column("image_id"))
            _, idx = search_excluding_self(fixed_list_to_numpy(q.column("embedding")), ids,
                                           fixed_list_to_numpy(g.column("embedding")), g_ids, 1)
            nn_idx = idx[:, 0]
            parts.append(_reference_rows(ids, g_ids[nn_idx], "neighbor", _raw(g)[nn_idx],
                                         fixed_list_to_numpy(g_feats.column("bias"))[nn_idx],
                                         fixed_list_to_numpy(g_feats.column("gap_feature"))[nn_idx]))
        if "prototype" in kinds:
            own = prototypes.filter(pc.equal(prototypes.column("split"), "gallery" if split == "query" else split))
            proto_gap = fixed_list_to_numpy(own.column("gap_feature"))
            nearest, _ = nearest_prototype(torch.from_numpy(gap), torch.from_numpy(proto_gap))
            p = nearest.numpy()
            labels = own.column("label").to_numpy()[p]
            parts.append(_reference_rows(ids, np.array([f"prototype:{x}" for x in labels], dtype=object), "prototype",
                                         fixed_list_to_numpy(own.column("raw_embedding"))[p],
                                         fixed_list_to_numpy(own.column("bias"))[p], proto_gap[p]))
    return pa.concat_tables(parts)


def _reference_rows(ids, ref_ids, kind, raw, bias, gap) -> pa.Table:
    def col(x):
        return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), x.shape[1])
    return pa.table({"image_id": pa.array(list(ids), pa.string()), "reference_id": pa.array(list(ref_ids), pa.string()),
                     "reference_kind": pa.array([kind] * len(ids), pa.string()),
                     "ref_raw": col(raw), "ref_bias": col(bias), "ref_gap": col(gap)})


def feature_map_tensor(rows: pa.Table) -> torch.Tensor:
    """The stored fp16 feature maps of ``rows`` as one float32 N x C x H x W tensor."""
    c, h, w = (rows.column(n)[0].as_py() for n in ("channels", "map_h", "map_w"))
    flat = rows.column("feature_map").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return torch.from_numpy(flat.astype(np.float32).reshape(rows.num_rows, c, h, w))


class MapMaker:
    """Ray Data actor: stored feature maps of a batch -> activation-map rows for each of their references."""

    def __init__(self, checkpoint_uri: str, references: pa.Table, methods: list[str], run_id: str,
                 num_threads: int = 1, storage_options: Optional[dict] = None, precision: str = "fp32") -> None:
        torch.set_num_threads(num_threads)
        self.head = load_checkpoint(checkpoint_uri, storage_options).model.head.eval()
        self.precision = precision
        self.methods, self.run_id = methods, run_id
        self.references = references
        self.ref_ids = references.column("image_id").combine_chunks()

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch_ids = batch.column("image_id").combine_chunks()
        console.advance("explain", batch.num_rows)
        refs = self.references.filter(pc.is_in(self.ref_ids, value_set=batch_ids))
        if refs.num_rows == 0:
            return ACTIVATION_MAPS_SCHEMA.empty_table()
        a = feature_map_tensor(batch)
        h, w = a.shape[2:]
        q_index = torch.from_numpy(pc.index_in(refs.column("image_id"), value_set=batch_ids).to_numpy())
        with autocast(self.precision, torch.device("cpu")):
            maps, scores = reference_maps(
                self.head, a[q_index],
                torch.from_numpy(fixed_list_to_numpy(refs.column("ref_raw"))),
                torch.from_numpy(fixed_list_to_numpy(refs.column("ref_bias"))),
                torch.from_numpy(fixed_list_to_numpy(refs.column("ref_gap"))), self.methods)
        n = refs.num_rows
        out = []
        for method, m in maps.items():
            out.append(pa.table({
                "run_id": pa.array([self.run_id] * n, pa.string()),
                "image_id": refs.column("image_id"), "reference_id": refs.column("reference_id"),
                "reference_kind": refs.column("reference_kind"), "method": pa.array([method] * n, pa.string()),
                "map_h": pa.array(np.full(n, h, np.int32)), "map_w": pa.array(np.full(n, w, np.int32)),
                "map": pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * h * w),
                                                pa.array(m.float().numpy().reshape(-1), pa.float32())),
                "score": pa.array(scores.float().numpy(), pa.float32()),
            }, schema=ACTIVATION_MAPS_SCHEMA))
        return pa.concat_tables(out)


def pair_rows(checkpoint_uri: str, features: pa.Table, pairs: list[tuple[str, str]], run_id: str,
              storage_options: Optional[dict] = None) -> pa.Table:
    """Point-to-point tensors P[i,j,x,y] (activation-decomposition-tip2021 Eq. 5) of an explicit list of pairs."""
    head = load_checkpoint(checkpoint_uri, storage_options).model.head.eval()
    ids = [i for pair in pairs for i in pair]
    known = set(features.column("image_id").to_pylist())
    missing = sorted(set(ids) - known)
    if missing:
        raise ValueError(f"explain.pairs: unknown image ids {missing[:3]}")
    a = feature_map_tensor(_aligned(features, pa.chunked_array([pa.array(ids, pa.string())])))
    h, w = a.shape[2:]
    with torch.no_grad():
        e, bias = head.equivalent_features(a)
        raw = e.sum(dim=(1, 2)) + bias
        p = point_to_point_map(e[0::2], e[1::2], raw[0::2], raw[1::2])
        score = torch.nn.functional.cosine_similarity(raw[0::2], raw[1::2])
    n = len(pairs)
    return pa.table({
        "run_id": pa.array([run_id] * n, pa.string()),
        "image_id": pa.array([q for q, _ in pairs], pa.string()),
        "reference_id": pa.array([r for _, r in pairs], pa.string()),
        "reference_kind": pa.array(["pair"] * n, pa.string()),
        "method": pa.array(["point_to_point"] * n, pa.string()),
        "map_h": pa.array(np.full(n, h, np.int32)), "map_w": pa.array(np.full(n, w, np.int32)),
        "map": pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * h * w * h * w),
                                        pa.array(p.float().numpy().reshape(-1), pa.float32())),
        "score": pa.array(score.float().numpy(), pa.float32()),
    }, schema=ACTIVATION_MAPS_SCHEMA)


def run_object_attention(loaded: LoadedModel, checkpoint_uri: str, run: Run, cfg: ExplainConfig, splits: list[str],
                         num_threads: int = 1) -> ExplainResult:
    """Commit ``activation_maps`` with one ``oam`` row per image of ``splits``: a DeML model's object-attention
    proposal, from one scale-1 pass over the images decoded as the embedding pass decodes them."""
    start = time.perf_counter()
    so, run_id = run.storage_options, run.run_id
    if "resize" not in loaded.extra:
        raise ValueError(f"{checkpoint_uri}: no 'resize' recorded in the checkpoint; cannot reproduce the input frame")
    images = run.read("images", columns=["image_id", "uri", "split"])
    images = images.filter(pc.is_in(images.column("split"), pa.array(splits)))
    staging = run.staging("activation_maps")
    sfs, spath = run.pyarrow_fs(staging)
    mapper_kwargs = {"checkpoint_uri": checkpoint_uri, "run_id": run_id, "num_threads": num_threads,
                     "use_gpu": cfg.use_gpu, "storage_options": so, "precision": cfg.precision}
    decode_kwargs = {"resize": loaded.extra["resize"], "image_size": loaded.image_size}
    if runs_in_process(images.num_rows, cfg.in_process_below, cfg.use_gpu):
        log.info("explain: %d images, below explain.in_process_below=%d: in the driver", images.num_rows,
                 cfg.in_process_below)
        with DriverThreads():
            mapper = ObjectAttentionMapper(**mapper_kwargs)
            read = [partial(fetch_bytes, storage_options=so), partial(decode_batch, **decode_kwargs)]
            decoded = prefetched(apply_steps(table_batches(images, cfg.batch_size), read))
            write_parquet_stream(apply_steps(decoded, [mapper]), spath, sfs)
    else:
        ds = ray.data.from_arrow(images).repartition(max(1, min(images.num_rows // cfg.batch_size, 64)))
        ds = ds.map_batches(fetch_bytes, fn_kwargs={"storage_options": so}, batch_format="pyarrow",
                            batch_size=cfg.batch_size, num_cpus=0.5)
        ds = ds.map_batches(decode_batch, fn_kwargs=decode_kwargs, batch_format="pyarrow", batch_size=cfg.batch_size,
                            num_cpus=0.5)
        ds = ds.map_batches(ObjectAttentionMapper, fn_constructor_kwargs=mapper_kwargs,
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.concurrency),
                            batch_size=cfg.batch_size, batch_format="numpy", num_cpus=1,
                            num_gpus=1 if cfg.use_gpu else 0)
        ds.write_parquet(spath, filesystem=sfs)
    marker = run.commit("activation_maps", staging)
    seconds = time.perf_counter() - start
    log.info("explain: %d object-attention maps in %.1f s", marker["rows"], seconds)
    return ExplainResult(marker["rows"], seconds, run.table_uri("activation_maps"), None)


def run_explain(checkpoint_uri: str, run: Run, cfg: ExplainConfig, splits: list[str],
                num_threads: int = 1) -> ExplainResult:
    """Commit ``prototypes`` and ``activation_maps`` (one row per image, reference and method); for a DeML
    checkpoint, ``activation_maps`` of its object-attention proposals (``run_object_attention``)."""
    start = time.perf_counter()
    so, run_id = run.storage_options, run.run_id
    loaded = load_checkpoint(checkpoint_uri, so)
    if loaded.model_config.kind == "deml":
        return run_object_attention(loaded, checkpoint_uri, run, cfg, splits, num_threads)
    embeddings = run.read("embeddings")
    features = run.read("feature_maps", columns=SMALL_FEATURE_COLUMNS)
    prototypes = build_prototypes(embeddings, features, run_id, splits)
    run.commit("prototypes", prototypes, replace=True)
    references = build_references(embeddings, features, prototypes, splits, cfg.references)
    fm_files = run.files("feature_maps")
    fs, _ = run.pyarrow_fs(run.output_root)
    staging = run.staging("activation_maps")
    sfs, spath = run.pyarrow_fs(staging)
    maker_kwargs = {"checkpoint_uri": checkpoint_uri, "references": references, "methods": list(cfg.methods),
                    "run_id": run_id, "num_threads": num_threads, "storage_options": so, "precision": cfg.precision}
    console.expect("explain", features.num_rows)
    if runs_in_process(features.num_rows, cfg.in_process_below, use_gpu=False):
        log.info("explain: %d images, below explain.in_process_below=%d: in the driver", features.num_rows,
                 cfg.in_process_below)
        with DriverThreads():
            steps = [MapMaker(**maker_kwargs)]
            write_parquet_stream(apply_steps(file_batches(fm_files, fs, cfg.batch_size), steps), spath, sfs)
    else:
        ds = ray.data.read_parquet(fm_files, filesystem=fs)
        ds = ds.map_batches(MapMaker, fn_constructor_kwargs=maker_kwargs,
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.concurrency),
                            batch_size=cfg.batch_size, batch_format="pyarrow", num_cpus=1)
        ds.write_parquet(spath, filesystem=sfs)
    if cfg.pairs:
        wanted = sorted({i for pair in cfg.pairs for i in pair})
        pair_features = run.read("feature_maps", filter=pc.field("image_id").isin(wanted))
        pq.write_table(pair_rows(checkpoint_uri, pair_features, cfg.pairs, run_id, so), f"{spath}/pairs.parquet",
                       filesystem=sfs)
    marker = run.commit("activation_maps", staging)
    seconds = time.perf_counter() - start
    log.info("explain: %d activation-map rows in %.1f s", marker["rows"], seconds)
    return ExplainResult(marker["rows"], seconds, run.table_uri("activation_maps"), run.table_uri("prototypes"))


def maps_gallery_png(run: Run, images: pa.Table, maps: pa.Table, methods: list[str], data: DataConfig, n: int = 6,
                     seed: int = 0, kind: str = "neighbor") -> bytes:
    """PNG gallery: ``n`` sampled explained images (model-input frame), each method's map against its ``kind``
    reference overlaid; maps without a reference (``self``, e.g. DeML's ``oam``) are shown whatever ``kind``."""
    maps = maps.filter(pc.is_in(maps.column("reference_kind"), pa.array([kind, SELF_KIND])))
    ids = sorted(set(maps.column("image_id").to_pylist()))
    chosen = [ids[i] for i in np.random.default_rng(seed).choice(len(ids), size=min(n, len(ids)), replace=False)]
    rows = images.filter(pc.is_in(images.column("image_id"), pa.array(chosen)))
    uris = dict(zip(rows.column("image_id").to_pylist(), rows.column("uri").to_pylist()))
    views, per_image = [], []
    for image_id in chosen:
        views.append(display_view(decode_image(run.read_input(uris[image_id])), data.input_resize(),
                                  data.image_size).numpy())
        mine = maps.filter(pc.equal(maps.column("image_id"), image_id)).to_pylist()
        per_image.append({r["method"]: np.asarray(r["map"], np.float32).reshape(r["map_h"], r["map_w"]) for r in mine})
    titles = [i.rsplit("/", 1)[-1][-26:] for i in chosen]
    return gallery_figure(views, per_image, methods, titles)
