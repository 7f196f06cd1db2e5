"""The run report: one self-contained HTML page from a run's committed tables and figures."""
from __future__ import annotations

import logging
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dml_ray.config import DataConfig
from dml_ray.data.transforms import decode_image, display_view
from dml_ray.io.run import Run
from dml_ray.report.html import Section, render_report
from dml_ray.report.overlays import boxes_gallery
from dml_ray.report.plots import attention_png, localization_curves_png, run_summary_png
from pipelines.explain import GALLERY_FILE
from pipelines.localize import ground_truth

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
PRIMARY_SPLIT = "test"


def build_sections(run: Run) -> list[Section]:
    """The report's sections for whatever stages the run has committed."""
    tables = run.tables()
    run_id = run.run_id
    sections = []
    if "metrics" in tables:
        metrics = run.read("metrics")
        # training curves and localization have their own figures and tables
        rows = sorted((r["stage"], r["split"], r["metric"], r["k"], r["value"]) for r in metrics.to_pylist()
                      if r["stage"] not in ("train", "localize", "mpn"))
        sections.append(Section("Retrieval metrics", "metrics",
                                tables=[(["stage", "split", "metric", "k", "value"], rows)],
                                figures=[run_summary_png(metrics, f"run {run_id}")]))
        sections += mpn_sections(metrics, run_id)
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
    refined = {(r["split"], r["metric"], r["k"]): r["value"] for r in rows if r["stage"] == "mpn"}
    sections = []
    if refined:
        backbone = {(r["split"], r["metric"], r["k"]): r["value"] for r in rows if r["stage"] == "evaluate"}
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


def _summary_table(metrics: pa.Table) -> list[list[object]]:
    values: dict[tuple[str, str], dict[str, float]] = {}
    for r in metrics.to_pylist():
        if r["stage"] == "localize" and not r["metric"].startswith("loc_acc/"):
            metric, name = r["metric"].split("/", 1)
            values.setdefault((r["split"], name), {})[metric] = r["value"]
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


def write_report(run: Run) -> str:
    """Write ``runs/<run_id>/report.html`` and return its URI."""
    manifest, run_id = run.manifest, run.run_id
    sections = build_sections(run)
    if not sections:
        raise FileNotFoundError(f"{run.output_root}: run {run_id!r} has nothing to report yet")
    model = manifest.get("config", {}).get("model", {})
    meta = f"run {run_id} · {model.get('backbone', '?')} · git {str(manifest.get('git_sha') or '?')[:10]}"
    uri = run.write_bytes(run.path(REPORT_FILE), render_report(f"dml_ray run {run_id}", sections, meta).encode())
    log.info("report written to %s", uri)
    return uri
