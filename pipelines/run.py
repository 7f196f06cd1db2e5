"""A whole run: data -> train -> embed -> evaluate -> knn -> mpn -> explain -> localize -> report, each stage once."""
from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import pyarrow as pa

import dml_ray
from dml_ray.config import RunConfig, resolve_local_paths
from dml_ray.console import finish_progress, run_log
from dml_ray.data.readers import default_ks, read_images
from dml_ray.data.synthetic import generate_synthetic
from dml_ray.io.fs import join
from dml_ray.io.run import Run, open_run
from dml_ray.models.checkpoint import load_checkpoint, versions
from dml_ray.report.plots import run_summary_png
from pipelines.embed import run_embed
from pipelines.evaluate import evaluate_learners, evaluated_splits, run_evaluate
from pipelines.explain import GALLERY_FILE, maps_gallery_png, run_explain
from pipelines.knn import run_knn
from pipelines.localize import run_localize
from pipelines.mpn import run_mpn
from pipelines.preflight import preflight
from pipelines.ray_env import check_gpu_request, ensure_ray
from pipelines.report import REPORT_FILE, write_report
from pipelines.train import model_uri, run_train, training_metrics

log = logging.getLogger(__name__)

SUMMARY_FIGURE = "summary.png"


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


@dataclass(frozen=True)
class TableRef:
    """A table (or one stage's part of it) a stage reads or commits; ``when``: whether this config involves it."""

    table: str
    part: Optional[str] = None
    when: Optional[Callable[[RunConfig], bool]] = None

    def wanted(self, cfg: RunConfig) -> bool:
        return self.when is None or self.when(cfg)


@dataclass(frozen=True)
class Stage:
    """One stage of a run: what it does (``fn(cfg, run)``), the tables it reads, and what it writes.

    "Done" is derived from the declared outputs: every wanted output table committed and every file
    present. ``applies`` (when given) says whether the stage has anything to do for this run at all.
    """

    name: str
    fn: Callable[[RunConfig, Run], dict]
    reads: tuple[TableRef, ...] = ()
    writes: tuple[TableRef, ...] = ()
    files: tuple[str, ...] = ()
    applies: Optional[Callable[[RunConfig, Run], bool]] = None
    not_applicable: str = "nothing to do for this run"

    def done(self, cfg: RunConfig, run: Run) -> bool:
        if self.applies is not None and not self.applies(cfg, run):
            return True
        return (all(run.committed(o.table, o.part) for o in self.writes if o.wanted(cfg))
                and all(run.exists(run.path(f)) for f in self.files))

    def missing_inputs(self, cfg: RunConfig, run: Run) -> list[str]:
        return [o.table for o in self.reads if o.wanted(cfg) and not run.committed(o.table, o.part)]


def _stage_data(cfg: RunConfig, run: Run) -> dict:
    so = run.storage_options
    root = data_root(cfg)
    if cfg.data.kind == "synthetic" and not run.input_exists(join(root, "images.txt")):
        s = cfg.data.synthetic
        generate_synthetic(root, s.n_classes, s.images_per_class, s.image_size, s.seed, so)
    marker = run.commit("images", read_images(cfg.data.kind, root, so))
    return {"rows": marker["rows"]}


def _stage_train(cfg: RunConfig, run: Run) -> dict:
    result = run_train(run.table_uri("images"), cfg)
    run.commit("metrics", training_metrics(result, cfg.run_id), part="train", replace=True)
    return {"checkpoint": result.checkpoint_uri, "history": result.history, "selected_epoch": result.selected_epoch,
            "stopped_early": result.stopped_early}


def _stage_embed(cfg: RunConfig, run: Run) -> dict:
    result = run_embed(run.read("images"), _checkpoint(cfg, run), run, cfg.data, cfg.embed, cfg.num_threads)
    return {"rows": result.rows, "errors": result.errors, "reused": result.reused}


def _ks(cfg: RunConfig) -> list[int]:
    return cfg.evaluate.ks or default_ks(cfg.data.kind)


def _stage_evaluate(cfg: RunConfig, run: Run) -> dict:
    embeddings = run.read("embeddings")
    metrics = run_evaluate(embeddings, _ks(cfg), cfg.evaluate, cfg.run_id, num_threads=cfg.num_threads)
    if cfg.model.kind == "deml":
        learners = evaluate_learners(embeddings, cfg.model.deml, _ks(cfg), cfg.evaluate, cfg.run_id, cfg.num_threads)
        metrics = pa.concat_tables([metrics, learners])
    run.commit("metrics", metrics, part="evaluate")
    return {"rows": metrics.num_rows}


def _stage_knn(cfg: RunConfig, run: Run) -> dict:
    embeddings = run.read("embeddings")
    splits = cfg.knn.splits or evaluated_splits(embeddings, cfg.evaluate)
    neighbors = run_knn(embeddings, splits, cfg.knn, cfg.run_id)
    run.commit("neighbors", neighbors)
    return {"rows": neighbors.num_rows}


def _has_mpn(cfg: RunConfig, run: Run) -> bool:
    """Whether the run's model has a message passing network to refine with (assumed until there is a model)."""
    if cfg.model.weights in ("none", "imagenet") and not run.exists(model_uri(run.output_root, run.run_id)):
        return True
    return load_checkpoint(_checkpoint(cfg, run), run.storage_options).model_config.kind == "mpn"


def _stage_mpn(cfg: RunConfig, run: Run) -> dict:
    checkpoint = _checkpoint(cfg, run)
    loaded = load_checkpoint(checkpoint, run.storage_options)
    if loaded.model_config.kind != "mpn":
        log.info("stage mpn: the model has no message passing network, nothing to refine")
        return {"refined": False}
    embeddings, neighbors = run.read("embeddings"), run.read("neighbors")
    splits = sorted(set(neighbors.column("split").to_pylist()))
    refined = run_mpn(embeddings, neighbors, splits, checkpoint, f"{loaded.model_id}+mpn", cfg.run_id,
                      cfg.knn.shards, cfg.num_threads, run.storage_options)
    run.commit("mpn_embeddings", refined)
    evaluated = [s for s in evaluated_splits(refined, cfg.evaluate) if s in splits]
    metrics = run_evaluate(refined, _ks(cfg), cfg.evaluate, cfg.run_id, splits=evaluated, num_threads=cfg.num_threads,
                           stage="mpn")
    run.commit("metrics", metrics, part="mpn")
    return {"refined": True, "rows": refined.num_rows}


def _stage_explain(cfg: RunConfig, run: Run) -> dict:
    splits = cfg.explain.splits or evaluated_splits(run.read("embeddings", columns=["split"]), cfg.evaluate)
    result = run_explain(_checkpoint(cfg, run), run, cfg.explain, splits, cfg.num_threads)
    figure = run.write_bytes(run.path(GALLERY_FILE), maps_gallery_png(
        run, run.read("images"), run.read("activation_maps"), cfg.explain.methods, cfg.data, seed=cfg.evaluate.seed))
    return {"rows": result.rows, "gallery": figure}


def _stage_localize(cfg: RunConfig, run: Run) -> dict:
    result = run_localize(run, cfg.data, cfg.localize)
    run.commit("metrics", result.metrics, part="localize")
    return {"rows": result.rows}


def _stage_report(cfg: RunConfig, run: Run) -> dict:
    return {"report": write_report(run, cfg.report)}


def _checkpoint(cfg: RunConfig, run: Run) -> str:
    """The model the run embeds with: its own trained one, else ``model.weights`` when that is a file."""
    own = model_uri(run.output_root, run.run_id)
    if run.exists(own):
        return own
    if cfg.model.weights in ("none", "imagenet"):
        raise ValueError("embed: no trained model in this run and model.weights is not a checkpoint path; "
                         "add the train stage or set model.weights")
    return cfg.model.weights


STAGES: list[Stage] = [
    Stage("data", _stage_data, writes=(TableRef("images"),)),
    Stage("train", _stage_train, reads=(TableRef("images"),), writes=(TableRef("metrics", "train"),)),
    # embeddings last: the stage is done iff embeddings is committed
    Stage("embed", _stage_embed, reads=(TableRef("images"),),
          writes=(TableRef("feature_maps", when=lambda c: c.embed.feature_maps), TableRef("errors", "embed"),
                  TableRef("embedding_keys"), TableRef("embeddings"))),
    Stage("evaluate", _stage_evaluate, reads=(TableRef("embeddings"),), writes=(TableRef("metrics", "evaluate"),)),
    Stage("knn", _stage_knn, reads=(TableRef("embeddings"),), writes=(TableRef("neighbors"),)),
    Stage("mpn", _stage_mpn, reads=(TableRef("embeddings"), TableRef("neighbors")),
          writes=(TableRef("mpn_embeddings"), TableRef("metrics", "mpn")), applies=_has_mpn,
          not_applicable="the model has no message passing network, nothing to refine"),
    Stage("explain", _stage_explain,
          reads=(TableRef("images"), TableRef("embeddings"), TableRef("feature_maps", when=lambda c: c.model.kind != "deml")),
          writes=(TableRef("prototypes", when=lambda c: c.model.kind != "deml"), TableRef("activation_maps"))),
    Stage("localize", _stage_localize, reads=(TableRef("images"), TableRef("activation_maps")),
          writes=(TableRef("localization"), TableRef("metrics", "localize"))),
    Stage("report", _stage_report, files=(REPORT_FILE,)),
]
STAGE_NAMES: list[str] = [s.name for s in STAGES]


def stage(name: str) -> Stage:
    """The stage called ``name``."""
    for s in STAGES:
        if s.name == name:
            return s
    raise ValueError(f"unknown stage '{name}'; expected one of: {', '.join(STAGE_NAMES)}")


def run_pipeline(cfg: RunConfig, only: Optional[str] = None, lock: bool = True) -> RunSummary:
    """Run the configured stages (or just the stage ``only``) in order under the output root's lock; a stage
    whose outputs are committed is skipped. ``latest`` moves to this run last, once every configured stage is done.

    ``lock=False``: the caller holds the output root's lock for this run (a sweep's trials, pipelines/tune.py):
    staging leftovers are then not cleaned (other trials are writing) and ``latest`` is left alone."""
    cfg = resolve_local_paths(cfg)
    chosen = [stage(only)] if only is not None else [s for s in STAGES if s.name in cfg.stages]
    run = open_run(cfg.output_root, cfg.run_id, cfg.storage, create=True)
    summary = RunSummary(cfg.run_id, run.uri)
    preflight(cfg, run, [s.name for s in chosen])
    with run.lock() if lock else contextlib.nullcontext(), run_log(run):
        if lock:
            run.clean_staging()
        config = cfg.model_dump(mode="json", exclude={"storage": {"options"}})
        run.update_manifest(config=config, versions=versions(), git_sha=_git_sha())
        ensure_ray()
        check_gpu_request({f"{s.name}.use_gpu": getattr(cfg, s.name).use_gpu for s in chosen
                           if s.name in ("train", "embed", "explain")})
        for step in chosen:
            if step.done(cfg, run):
                idle = step.applies is not None and not step.applies(cfg, run)
                log.info("stage %s: %s", step.name, step.not_applicable if idle else "already committed, skipped")
                summary.skipped.append(step.name)
                continue
            missing = step.missing_inputs(cfg, run)
            if missing:
                raise ValueError(f"stage {step.name}: run {cfg.run_id} has no committed {', '.join(missing)}; "
                                 f"run the stage that writes it first")
            log.info("stage %s: running", step.name)
            start = time.perf_counter()
            info = step.fn(cfg, run)
            finish_progress()
            info["seconds"] = round(time.perf_counter() - start, 2)
            run.update_manifest(stages={step.name: info})
            log.info("stage %s: done in %.1f s", step.name, info["seconds"])
            summary.ran.append(step.name)
            summary.stages[step.name] = info
        if run.committed("metrics", "evaluate"):
            summary.metrics = run.read("metrics", "evaluate")
            figure = run.path(SUMMARY_FIGURE)
            if not run.exists(figure):
                run.write_bytes(figure, run_summary_png(run.read("metrics"), f"run {cfg.run_id}"))
            summary.figure = figure
        report = run.path(REPORT_FILE)
        summary.report = report if run.exists(report) else None
        if lock and all(s.done(cfg, run) for s in STAGES if s.name in cfg.stages):
            summary.latest = run.advance_latest(ran=bool(summary.ran))
    return summary
