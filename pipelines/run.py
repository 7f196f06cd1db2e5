"""A whole run: data -> train -> embed -> evaluate -> knn -> mpn -> explain -> localize -> report, each stage once."""
from __future__ import annotations

import logging
import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import pyarrow as pa

import dml_ray
from dml_ray.config import RunConfig, resolve_local_paths
from dml_ray.data.readers import default_ks, read_images
from dml_ray.data.synthetic import generate_synthetic
from dml_ray.io.fs import join, url_to_fs
from dml_ray.io.lock import output_lock
from dml_ray.io.schemas import METRICS_SCHEMA
from dml_ray.io.tables import (
    advance_latest,
    clean_staging,
    is_committed,
    read_table,
    run_uri,
    staging_uri,
    table_uri,
    update_manifest,
    write_table,
)
from dml_ray.models.checkpoint import load_checkpoint, versions
from dml_ray.report.plots import run_summary_png
from pipelines.embed import run_embed
from pipelines.evaluate import evaluate_learners, evaluated_splits, run_evaluate
from pipelines.explain import maps_gallery_png, run_explain
from pipelines.knn import run_knn
from pipelines.localize import run_localize
from pipelines.mpn import run_mpn
from pipelines.preflight import preflight
from pipelines.ray_env import check_gpu_request, ensure_ray
from pipelines.report import REPORT_FILE, write_report
from pipelines.train import model_uri, run_train

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    run_id: str
    run_uri: str
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    metrics: Optional[pa.Table] = None
    figure: Optional[str] = None
    report: Optional[str] = None
    stages: dict[str, dict] = field(default_factory=dict)
    latest: bool = False


def _git_sha() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True,
                             cwd=os.path.dirname(os.path.abspath(dml_ray.__file__)))
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def data_root(cfg: RunConfig) -> str:
    """Where the dataset lives: ``data.root``, or ``<output_root>/synthetic`` for generated data."""
    return cfg.data.root or join(cfg.output_root, "synthetic")


def _stage_data(cfg: RunConfig) -> dict:
    so = cfg.data.storage_options or None
    root = data_root(cfg)
    if cfg.data.kind == "synthetic":
        fs, path = url_to_fs(root, so)
        if not fs.exists(join(path, "images.txt")):
            s = cfg.data.synthetic
            generate_synthetic(root, s.n_classes, s.images_per_class, s.image_size, s.seed, so)
    images = read_images(cfg.data.kind, root, so)
    final = table_uri(cfg.output_root, cfg.run_id, "images")
    marker = write_table(images, final, staging_uri(cfg.output_root, cfg.run_id, "images"), so)
    return {"rows": marker["rows"]}


def _stage_train(cfg: RunConfig) -> dict:
    images = table_uri(cfg.output_root, cfg.run_id, "images")
    result = run_train(images, cfg)
    rows = [{"run_id": cfg.run_id, "stage": "train", "split": "train", "metric": name, "k": int(h["epoch"]),
             "value": float(value)} for h in result.history for name, value in h.items()
            if name not in ("epoch", "attempt", "steps", "seconds")]
    so = cfg.data.storage_options or None
    write_table(pa.Table.from_pylist(rows, schema=METRICS_SCHEMA),
                table_uri(cfg.output_root, cfg.run_id, "metrics", "train"),
                staging_uri(cfg.output_root, cfg.run_id, "metrics", "train"), so, replace=True)
    return {"checkpoint": result.checkpoint_uri, "history": result.history}


def _stage_embed(cfg: RunConfig) -> dict:
    so = cfg.data.storage_options or None
    images = read_table(table_uri(cfg.output_root, cfg.run_id, "images"), so)
    result = run_embed(images, _checkpoint(cfg), cfg.output_root, cfg.run_id, cfg.data, cfg.embed, cfg.num_threads)
    return {"rows": result.rows, "errors": result.errors, "reused": result.reused}


def _stage_evaluate(cfg: RunConfig) -> dict:
    so = cfg.data.storage_options or None
    embeddings = read_table(table_uri(cfg.output_root, cfg.run_id, "embeddings"), so)
    ks = cfg.evaluate.ks or default_ks(cfg.data.kind)
    metrics = run_evaluate(embeddings, ks, cfg.evaluate, cfg.run_id, num_threads=cfg.num_threads)
    if cfg.model.kind == "deml":
        learners = evaluate_learners(embeddings, cfg.model.deml, ks, cfg.evaluate, cfg.run_id, cfg.num_threads)
        metrics = pa.concat_tables([metrics, learners])
    write_table(metrics, table_uri(cfg.output_root, cfg.run_id, "metrics", "evaluate"),
                staging_uri(cfg.output_root, cfg.run_id, "metrics", "evaluate"), so)
    return {"rows": metrics.num_rows}


def _stage_knn(cfg: RunConfig) -> dict:
    so = cfg.data.storage_options or None
    embeddings = read_table(table_uri(cfg.output_root, cfg.run_id, "embeddings"), so)
    splits = cfg.knn.splits or evaluated_splits(embeddings, cfg.evaluate)
    neighbors = run_knn(embeddings, splits, cfg.knn, cfg.run_id)
    write_table(neighbors, table_uri(cfg.output_root, cfg.run_id, "neighbors"),
                staging_uri(cfg.output_root, cfg.run_id, "neighbors"), so)
    return {"rows": neighbors.num_rows}


def _stage_mpn(cfg: RunConfig) -> dict:
    so = cfg.data.storage_options or None
    checkpoint = _checkpoint(cfg)
    loaded = load_checkpoint(checkpoint, so)
    if loaded.model_config.kind != "mpn":
        log.info("stage mpn: the model has no message passing network, nothing to refine")
        return {"refined": False}
    embeddings = read_table(table_uri(cfg.output_root, cfg.run_id, "embeddings"), so)
    neighbors = read_table(table_uri(cfg.output_root, cfg.run_id, "neighbors"), so)
    splits = sorted(set(neighbors.column("split").to_pylist()))
    refined = run_mpn(embeddings, neighbors, splits, checkpoint, f"{loaded.model_id}+mpn", cfg.run_id,
                      cfg.knn.shards, cfg.num_threads, so)
    write_table(refined, table_uri(cfg.output_root, cfg.run_id, "mpn_embeddings"),
                staging_uri(cfg.output_root, cfg.run_id, "mpn_embeddings"), so)
    ks = cfg.evaluate.ks or default_ks(cfg.data.kind)
    evaluated = [s for s in evaluated_splits(refined, cfg.evaluate) if s in splits]
    metrics = run_evaluate(refined, ks, cfg.evaluate, cfg.run_id, splits=evaluated, num_threads=cfg.num_threads,
                           stage="mpn")
    write_table(metrics, table_uri(cfg.output_root, cfg.run_id, "metrics", "mpn"),
                staging_uri(cfg.output_root, cfg.run_id, "metrics", "mpn"), so)
    return {"refined": True, "rows": refined.num_rows}


def _mpn_done(cfg: RunConfig) -> bool:
    """Refined and evaluated, or nothing to refine because the run's model has no MPN."""
    if _committed("metrics", "mpn")(cfg):
        return True
    so = cfg.data.storage_options or None
    own = model_uri(cfg.output_root, cfg.run_id)
    if cfg.model.weights in ("none", "imagenet") and not _exists(own, so):
        return False
    return load_checkpoint(_checkpoint(cfg), so).model_config.kind != "mpn"


def _stage_explain(cfg: RunConfig) -> dict:
    so = cfg.data.storage_options or None
    splits = cfg.explain.splits or evaluated_splits(read_table(table_uri(cfg.output_root, cfg.run_id, "embeddings"),
                                                               so, columns=["split"]), cfg.evaluate)
    result = run_explain(_checkpoint(cfg), cfg.output_root, cfg.run_id, cfg.explain, splits, cfg.num_threads, so)
    figure = join(run_uri(cfg.output_root, cfg.run_id), "explain_gallery.png")
    fs, path = url_to_fs(figure, so)
    images = read_table(table_uri(cfg.output_root, cfg.run_id, "images"), so)
    maps = read_table(result.activation_maps_uri, so)
    fs.pipe_file(path, maps_gallery_png(images, maps, cfg.explain.methods, cfg.data, seed=cfg.evaluate.seed))
    return {"rows": result.rows, "gallery": figure}


def _stage_localize(cfg: RunConfig) -> dict:
    so = cfg.data.storage_options or None
    result = run_localize(cfg.output_root, cfg.run_id, cfg.data, cfg.localize, so)
    write_table(result.metrics, table_uri(cfg.output_root, cfg.run_id, "metrics", "localize"),
                staging_uri(cfg.output_root, cfg.run_id, "metrics", "localize"), so)
    return {"rows": result.rows}


def _stage_report(cfg: RunConfig) -> dict:
    return {"report": write_report(cfg.output_root, cfg.run_id, cfg.data.storage_options or None)}


def _exists(uri: str, storage_options: Optional[dict]) -> bool:
    fs, path = url_to_fs(uri, storage_options)
    return fs.exists(path)


def _checkpoint(cfg: RunConfig) -> str:
    """The model the run embeds with: its own trained one, else ``model.weights`` when that is a file."""
    own = model_uri(cfg.output_root, cfg.run_id)
    fs, path = url_to_fs(own, cfg.data.storage_options or None)
    if fs.exists(path):
        return own
    if cfg.model.weights in ("none", "imagenet"):
        raise ValueError("embed: no trained model in this run and model.weights is not a checkpoint path; "
                         "add the train stage or set model.weights")
    return cfg.model.weights


def _committed(table: str, part: Optional[str] = None) -> Callable[[RunConfig], bool]:
    return lambda c: is_committed(table_uri(c.output_root, c.run_id, table, part), c.data.storage_options or None)


# stage name -> (what it does, whether its output is already there)
STAGES: dict[str, tuple[Callable[[RunConfig], dict], Callable[[RunConfig], bool]]] = {
    "data": (_stage_data, _committed("images")),
    "train": (_stage_train, _committed("metrics", "train")),
    "embed": (_stage_embed, _committed("embeddings")),
    "evaluate": (_stage_evaluate, _committed("metrics", "evaluate")),
    "knn": (_stage_knn, _committed("neighbors")),
    "mpn": (_stage_mpn, _mpn_done),
    "explain": (_stage_explain, _committed("activation_maps")),
    "localize": (_stage_localize, _committed("metrics", "localize")),
    "report": (_stage_report, lambda c: _exists(join(run_uri(c.output_root, c.run_id), REPORT_FILE),
                                                c.data.storage_options or None)),
}


def run_pipeline(cfg: RunConfig, only: Optional[str] = None) -> RunSummary:
    """Run the configured stages (or just the stage ``only``) in order under the output root's lock; a stage
    whose output is committed is skipped. ``latest`` moves to this run last, once every configured stage is done."""
    cfg = resolve_local_paths(cfg)
    so = cfg.data.storage_options or None
    if only is not None and only not in STAGES:
        raise ValueError(f"unknown stage '{only}'; expected one of: {', '.join(STAGES)}")
    summary = RunSummary(cfg.run_id, join(cfg.output_root, "runs", cfg.run_id))
    preflight(cfg, [only] if only else cfg.stages)
    with output_lock(cfg.output_root, cfg.run_id, so):
        clean_staging(cfg.output_root, so)
        config = cfg.model_dump(mode="json", exclude={"data": {"storage_options"}})
        update_manifest(cfg.output_root, cfg.run_id, so, config=config, versions=versions(), git_sha=_git_sha())
        ensure_ray()
        stages = [only] if only else cfg.stages
        check_gpu_request({f"{stage}.use_gpu": getattr(cfg, stage).use_gpu for stage in ("train", "embed", "explain")
                           if stage in stages})
        for name in [only] if only else [s for s in STAGES if s in cfg.stages]:
            run, done = STAGES[name]
            if done(cfg):
                nothing_to_do = name == "mpn" and not _committed("metrics", "mpn")(cfg)
                log.info("stage %s: %s", name, "the model has no message passing network, nothing to refine"
                         if nothing_to_do else "already committed, skipped")
                summary.skipped.append(name)
                continue
            log.info("stage %s: running", name)
            start = time.perf_counter()
            info = run(cfg)
            info["seconds"] = round(time.perf_counter() - start, 2)
            update_manifest(cfg.output_root, cfg.run_id, so, stages={name: info})
            log.info("stage %s: done in %.1f s", name, info["seconds"])
            summary.ran.append(name)
            summary.stages[name] = info
        metrics_uri = table_uri(cfg.output_root, cfg.run_id, "metrics", "evaluate")
        if is_committed(metrics_uri, so):
            summary.metrics = read_table(metrics_uri, so)
            figure = join(summary.run_uri, "summary.png")
            fs, path = url_to_fs(figure, so)
            if not fs.exists(path):
                metrics = read_table(table_uri(cfg.output_root, cfg.run_id, "metrics"), so)
                fs.pipe_file(path, run_summary_png(metrics, f"run {cfg.run_id}"))
            summary.figure = figure
        report = join(summary.run_uri, REPORT_FILE)
        summary.report = report if _exists(report, so) else None
        if all(STAGES[s][1](cfg) for s in STAGES if s in cfg.stages):
            summary.latest = advance_latest(cfg.output_root, cfg.run_id, bool(summary.ran), so)
    return summary
