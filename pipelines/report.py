"""The run report: one self-contained HTML page from a run's committed tables and figures."""
from __future__ import annotations

import logging
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from dml_ray.config import DataConfig, EvaluateConfig, ReportConfig
from dml_ray.data.transforms import decode_image, display_view
from dml_ray.explore.projection import project_2d, resolve_method
from dml_ray.io.run import Run
from dml_ray.metrics.names import display_value
from dml_ray.report.html import Grid, GridRow, Section, Tile, render_report
from dml_ray.report.overlays import boxes_gallery
from dml_ray.report.plots import (attention_png, localization_curves_png, per_class_recall_png, projection_png,
                                  run_summary_png)
from dml_ray.report.retrieval_views import (Neighbours, best_and_worst, confused_pairs, jpeg_thumbnail,
                                            per_class_recall_at_1, query_neighbours, query_quality)
from pipelines.evaluate import by_image_id, evaluated_splits, evaluation_pairs
from pipelines.explain import GALLERY_FILE
from pipelines.localize import ground_truth

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
PRIMARY_SPLIT = "test"


def build_sections(run: Run, cfg: Optional[ReportConfig] = None) -> list[Section]:
    """The report's sections for whatever stages the run has committed; ``cfg`` defaults to the run's config's
    ``report`` section."""
    cfg = cfg or ReportConfig.model_validate((run.manifest.get("config") or {}).get("report") or {})
    tables = run.tables()
    run_id = run.run_id
    sections = []
    if "metrics" in tables:
        metrics = run.read("metrics")
        # training curves and localization have their own figures and tables
        rows = sorted((r["stage"], r["split"], r["metric"], r["k"], display_value(r["metric"], r["value"]))
                      for r in metrics.to_pylist() if r["stage"] not in ("train", "localize", "mpn"))
        sections.append(Section("Retrieval metrics", "metrics",
                                tables=[(["stage", "split", "metric", "k", "value"], rows)],
                                figures=[run_summary_png(metrics, f"run {run_id}")]))
        sections += mpn_sections(metrics, run_id)
    if "embeddings" in tables:
        sections += retrieval_sections(run, cfg)
    gallery = run.read_bytes(run.path(GALLERY_FILE))
    if gallery is not None:
        sections.append(Section("Activation maps", "maps", text="A sample of explained images, each method's map "
                                "against the image's nearest neighbour.", figures=[gallery]))
    if "localization" in tables and "metrics" in tables:
        sections += localization_sections(run, run.read("metrics"))
    return sections


def mpn_sections(metrics: pa.Table, run_id: str) -> list[Section]:
    """Backbone vs MPN embeddings side by side (intra-batch-mpn-reproduction Table 3) and the attention curves."""
    rows = metrics.to_pylist()
    refined = {(r["split"], r["metric"], r["k"]): display_value(r["metric"], r["value"]) for r in rows
               if r["stage"] == "mpn"}
    sections = []
    if refined:
        backbone = {(r["split"], r["metric"], r["k"]): display_value(r["metric"], r["value"]) for r in rows
                    if r["stage"] == "evaluate"}
        table = [[*key, backbone.get(key), value] for key, value in sorted(refined.items(), key=str)]
        sections.append(Section("Backbone vs MPN", "mpn",
                                text="The same images embedded by the backbone alone and refined by the message "
                                     "passing network within their reciprocal-kNN batches (Table 3).",
                                tables=[(["split", "metric", "k", "backbone", "MPN"], table)]))
    if any(r["stage"] == "train" and r["metric"].startswith("mpn_same_class_mass") for r in rows):
        sections.append(Section("MPN attention during training", "mpn-attention",
                                text="Per layer and head, mean over nodes of training batches (Sec. 4.2.2).",
                                figures=[attention_png(metrics, f"run {run_id}")]))
    return sections


def primary_pair(embeddings: pa.Table, cfg: EvaluateConfig) -> tuple[str, str, str]:
    """The evaluated (name, query split, database split) the retrieval views show: In-Shop's query vs gallery,
    else test, else the first evaluated split (``pipelines.evaluate.evaluation_pairs``)."""
    pairs = evaluation_pairs(evaluated_splits(embeddings, cfg))
    return next((p for p in pairs if p[0] == "query_gallery"), next((p for p in pairs if p[0] == PRIMARY_SPLIT),
                                                                    pairs[0]))


def _embedding_arrays(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return (x.reshape(table.num_rows, -1).astype(np.float32, copy=False), table.column("label").to_numpy(),
            np.asarray(table.column("image_id").to_pylist(), dtype=object))


def retrieval_sections(run: Run, cfg: ReportConfig) -> list[Section]:
    """Per-class Recall@1 and the most-confused class pairs, the best and worst queries with their top-k, and the
    embedding projection, for the evaluated split (the query itself excluded, as the evaluate stage searches)."""
    evaluate = EvaluateConfig.model_validate((run.manifest.get("config") or {}).get("evaluate") or {})
    embeddings = run.read("embeddings", columns=["image_id", "label", "split", "embedding"])
    name, q_split, d_split = primary_pair(embeddings, evaluate)
    query = by_image_id(embeddings.filter(pc.equal(embeddings.column("split"), q_split)))
    db = query if d_split == q_split else by_image_id(embeddings.filter(pc.equal(embeddings.column("split"),
                                                                                  d_split)))
    if query.num_rows == 0 or db.num_rows < 2:
        log.info("report: split %s has too few embeddings for the retrieval views", name)
        return []
    q_emb, q_labels, q_ids = _embedding_arrays(query)
    d_emb, d_labels, d_ids = (q_emb, q_labels, q_ids) if db is query else _embedding_arrays(db)
    found = query_neighbours(q_emb, q_ids, d_emb, d_ids, d_labels, cfg.grid_k, evaluate.metric)
    images = run.read("images", columns=["image_id", "uri", "label", "class_name"]) if run.committed("images") \
        else None
    names = {} if images is None else {int(label): cls for label, cls in zip(
        images.column("label").to_pylist(), images.column("class_name").to_pylist()) if cls is not None}

    def class_name(label: int) -> str:
        return names.get(int(label), str(int(label)))

    sections = [_class_section(name, q_labels, found.labels[:, 0], class_name, cfg, run.run_id)]
    if cfg.grid_queries > 0:
        uris = {} if images is None else dict(zip(images.column("image_id").to_pylist(),
                                                  images.column("uri").to_pylist()))
        sections.append(_grid_section(run, name, q_ids, q_labels, d_ids, d_labels, found, uris, class_name, cfg,
                                      evaluate.metric))
    sections.append(_projection_section(name, query if db is query else pa.concat_tables([query, db]), cfg,
                                        evaluate.seed, run.run_id))
    return sections


def _class_section(split: str, labels: np.ndarray, top1: np.ndarray, class_name: Callable[[int], str],
                   cfg: ReportConfig, run_id: str) -> Section:
    per_class = per_class_recall_at_1(labels, top1).to_pylist()
    overall = float((labels == top1).mean())
    rows = [[class_name(r["label"]), r["label"], r["n_queries"], r["n_correct"], r["recall_at_1"]]
            for r in per_class[:cfg.per_class_rows]]
    pairs = [[class_name(r["label"]), class_name(r["retrieved_label"]), r["count"], r["share"]]
             for r in confused_pairs(labels, top1, cfg.confused_pairs).to_pylist()]
    shown = "every class" if len(rows) == len(per_class) else f"the worst {len(rows)} of {len(per_class)} classes"
    return Section(
        f"Per-class Recall@1 ({split})", "per-class-recall",
        text=f"Recall@1 of each query class, worst first: {shown} ({len(labels)} queries, overall {overall:.4f}; "
             "the query itself excluded). Most-confused pairs: queries of a class whose nearest neighbour is of "
             "another class.",
        tables=[(["class", "label", "queries", "correct at 1", "Recall@1"], rows),
                (["query class", "nearest neighbour's class", "queries", "share of the class"], pairs)],
        figures=[per_class_recall_png([r[0] for r in rows], [r[4] for r in rows], overall,
                                      f"run {run_id}, split {split}")])


def _grid_section(run: Run, split: str, q_ids: np.ndarray, q_labels: np.ndarray, d_ids: np.ndarray,
                  d_labels: np.ndarray, found: Neighbours, uris: dict[str, str], class_name: Callable[[int], str],
                  cfg: ReportConfig, metric: str) -> Section:
    precision, first_rank = query_quality(q_labels, found.labels)
    k = found.indices.shape[1]
    best, worst = best_and_worst(q_ids, precision, first_rank, found.scores[:, 0], cfg.grid_queries,
                                 higher_is_closer=metric == "cosine", query_labels=q_labels)
    thumbnails: dict[str, Optional[bytes]] = {}

    def tile(image_id: str, label: int, score: Optional[float] = None, match: Optional[bool] = None) -> Tile:
        if image_id not in thumbnails:
            thumbnails[image_id] = _thumbnail(run, uris.get(image_id), cfg.thumbnail_px)
        return Tile(image_id, class_name(label), thumbnails[image_id], score, match)

    def row(q: int) -> GridRow:
        hits = [tile(d_ids[j], d_labels[j], float(score), bool(d_labels[j] == q_labels[q]))
                for j, score in zip(found.indices[q], found.scores[q])]
        where = f"first correct at rank {first_rank[q] + 1}" if first_rank[q] < k else f"no correct in the top {k}"
        return GridRow(tile(q_ids[q], q_labels[q]), hits, f"precision@{k} {precision[q]:.2f}; {where}")

    score_name = "cos" if metric == "cosine" else "sq. L2"
    return Section(
        f"Best and worst queries ({split})", "retrieval-grid",
        text=f"Each query's top {k} (the query itself excluded), green border: same class, red: another class; "
             f"under each, its {'cosine similarity' if metric == 'cosine' else 'squared L2 distance'}. Queries "
             f"ranked by precision@{k}, then by the rank of the first correct neighbour, then by the top-1 score "
             "(the worst: confident mistakes first), one query per class before a class repeats.",
        grids=[Grid("Best queries", [row(q) for q in best], score_name),
               Grid("Worst queries", [row(q) for q in worst], score_name)])


def _thumbnail(run: Run, uri: Optional[str], size: int) -> Optional[bytes]:
    """A JPEG thumbnail of the image at ``uri`` (read with the run's storage options); None when unreadable."""
    if uri is None:
        return None
    try:
        return jpeg_thumbnail(run.read_input(uri), size)
    except (OSError, ValueError, Image.DecompressionBombError) as err:  # a placeholder, not a failed report
        log.warning("report: no thumbnail for %s (%s)", uri, type(err).__name__)
        return None


def _projection_section(split: str, table: pa.Table, cfg: ReportConfig, seed: int, run_id: str) -> Section:
    table = by_image_id(table)
    ids = table.column("image_id").to_pylist()
    keep = [i for i, image_id in enumerate(ids) if i == 0 or image_id != ids[i - 1]]  # query and gallery may overlap
    x, labels, _ = _embedding_arrays(table.take(pa.array(keep, pa.int64())))
    method = resolve_method(cfg.projection)
    xy = project_2d(x, method, seed=seed)
    return Section(f"Embedding projection ({split})", "projection",
                   text=f"{len(x)} embeddings projected to 2-D by {method.upper()}, coloured by class.",
                   figures=[projection_png(xy, labels, method.upper(), f"run {run_id}, split {split}")])


def _summary_table(metrics: pa.Table) -> list[list[object]]:
    values: dict[tuple[str, str], dict[str, float]] = {}
    for r in metrics.to_pylist():
        if r["stage"] == "localize" and not r["metric"].startswith("loc_acc/"):
            metric, name = r["metric"].split("/", 1)
            values.setdefault((r["split"], name), {})[metric] = display_value(metric, r["value"])
    keys = ["loc_best_threshold", "loc_best_acc", "loc_holdout_threshold", "loc_holdout_acc", "maxboxacc_v2",
            "top1_loc_error", "n_images"]
    order = sorted(values.items(), key=lambda kv: (kv[0][0] != PRIMARY_SPLIT, kv[0][0], -kv[1].get("loc_best_acc", 0)))
    return [[split, name, *(v.get(k) for k in keys)] for (split, name), v in order]


def localization_sections(run: Run, metrics: pa.Table, method: str = "decomposition", kind: str = "neighbor",
                          n: int = 6) -> list[Section]:
    """Accuracy vs threshold (Table I) and best / worst localized images of the primary split (test when
    localized) for ``kind`` / ``method`` (else the first localized map kind), best thresholds of every split
    (Table II)."""
    localized = set(metrics.filter(pc.equal(metrics.column("stage"), "localize")).column("split").to_pylist())
    run_id = run.run_id
    split = PRIMARY_SPLIT if PRIMARY_SPLIT in localized else sorted(localized)[0]
    header = ["split", "reference / method", "best threshold", "best accuracy", "held-out threshold", "accuracy at it",
              "MaxBoxAccV2", "top-1 loc. error", "images"]
    sections = [
        Section("Localization accuracy vs threshold", "localization-curves",
                text="IoU >= 0.5 between the tight box of the largest 8-connected component of the thresholded "
                     "map and the ground-truth box (activation-decomposition-tip2021 Table I). Dotted: baselines.",
                figures=[localization_curves_png(metrics.filter(pc.equal(metrics.column("split"), split)),
                                                 f"run {run_id}, split {split}")]),
        Section("Best thresholds", "localization-table",
                text="Best threshold on the whole split (as the papers grid-search it), and a threshold chosen "
                     "on a held-out part of the split, with the accuracy on the rest (Table II).",
                tables=[(header, _summary_table(metrics))]),
    ]
    thresholds = {r["metric"].split("/", 1)[1]: r["value"] for r in metrics.to_pylist()
                  if r["split"] == split and r["metric"].startswith("loc_best_threshold/")
                  and not r["metric"].startswith("loc_best_threshold/none/")}
    if f"{kind}/{method}" not in thresholds and thresholds:  # e.g. a DeML run: its maps are oam / self
        kind, method = sorted(thresholds)[0].split("/", 1)
    best = thresholds.get(f"{kind}/{method}")
    if best is None:
        return sections
    data = DataConfig.model_validate(run.manifest.get("config", {}).get("data", {}))
    loc = run.read("localization")
    loc = loc.filter(pc.and_(pc.and_(pc.equal(loc.column("method"), method), pc.equal(loc.column("reference_kind"),
                                                                                     kind)),
                             pc.less(pc.abs(pc.subtract(loc.column("threshold"), best)), 1e-4))).sort_by("iou")
    images = run.read("images")
    in_split = images.filter(pc.equal(images.column("split"), split)).column("image_id")
    loc = loc.filter(pc.is_in(loc.column("image_id"), in_split))
    maps = run.read("activation_maps")
    maps = maps.filter(pc.and_(pc.equal(maps.column("method"), method), pc.equal(maps.column("reference_kind"), kind)))
    gt = ground_truth(images, data)
    for title, rows in (("Best localized", loc.slice(max(0, loc.num_rows - n)).to_pylist()[::-1]),
                        ("Worst localized", loc.slice(0, n).to_pylist())):
        sections.append(Section(f"{title} ({split}, {method}, {kind} reference, threshold {best:.2f})",
                                title.lower().replace(" ", "-"),
                                text="White: predicted box; green: ground truth.",
                                figures=[_boxes_figure(rows, images, maps, gt, data, run)]))
    return sections


def _boxes_figure(rows: list[dict], images: pa.Table, maps: pa.Table, gt: dict, data: DataConfig,
                  run: Run) -> bytes:
    """Overlays of ``rows``' maps and boxes on their images (read with the run's storage options: the
    manifest's data config never holds them)."""
    ids = [r["image_id"] for r in rows]
    uris = dict(zip(images.column("image_id").to_pylist(), images.column("uri").to_pylist()))
    chosen = maps.filter(pc.is_in(maps.column("image_id"), pa.array(ids))).to_pylist()
    by_id = {m["image_id"]: np.asarray(m["map"], np.float32).reshape(m["map_h"], m["map_w"]) for m in chosen}
    views = []
    for image_id in ids:
        views.append(display_view(decode_image(run.read_input(uris[image_id])), data.input_resize(),
                                  data.image_size).numpy())
    titles = [f"IoU {r['iou']:.2f}" for r in rows]
    return boxes_gallery(views, [by_id[i] for i in ids], [r["box"] for r in rows], [gt[i] for i in ids], titles)


def write_report(run: Run, cfg: Optional[ReportConfig] = None) -> str:
    """Write ``runs/<run_id>/report.html`` and return its URI (``cfg``: as in ``build_sections``)."""
    manifest, run_id = run.manifest, run.run_id
    sections = build_sections(run, cfg)
    if not sections:
        raise FileNotFoundError(f"{run.output_root}: run {run_id!r} has nothing to report yet")
    model = manifest.get("config", {}).get("model", {})
    meta = f"run {run_id} · {model.get('backbone', '?')} · git {str(manifest.get('git_sha') or '?')[:10]}"
    uri = run.write_bytes(run.path(REPORT_FILE), render_report(f"dml_ray run {run_id}", sections, meta).encode())
    log.info("report written to %s", uri)
    return uri
