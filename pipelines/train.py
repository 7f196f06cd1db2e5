"""Training on Ray Train: DDP workers, rank-aware P x K batches, a checkpoint every epoch, resume on failure."""
from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

import pyarrow as pa
import pyarrow.compute as pc
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
from ray.train import RunConfig as RayRunConfig
from ray.train.torch import TorchTrainer

from dml_ray import console
from dml_ray.config import ConfigError, RunConfig, TrainConfig, parse_config
from dml_ray.data.dataset import ImageTableDataset
from dml_ray.data.samplers import RankAwarePKBatchSampler
from dml_ray.data.transforms import eval_transform, train_transform, warn_if_upsampling
from dml_ray.io.fs import join
from dml_ray.io.run import open_run, storage_options_of
from dml_ray.io.schemas import METRICS_SCHEMA
from dml_ray.io.tables import read_table, run_uri
from dml_ray.models.checkpoint import checkpoint_bytes, load_checkpoint
from dml_ray.models.embedding import build_model
from dml_ray.objectives import build_objective, distribute
from dml_ray.precision import grad_scaler
from dml_ray.training import build_optimizer, build_scheduler, train_epoch
from dml_ray.validation import ModelSelection, embed_batches, holdout_classes, validation_metrics
from pipelines.tracking import Trackers

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
MODEL_FILE = "model.pt"
BEST_FILE = "best_model.pt"
VAL_PREFIX = "val_"


@dataclass(frozen=True)
class TrainResult:
    checkpoint_uri: str
    history: list[dict[str, float]]
    seconds: float
    selected_epoch: Optional[int] = None
    stopped_early: bool = False


@dataclass(frozen=True)
class TrainSplit:
    """The images the loop trains on (labels 0..C-1 over the training classes) and the held-out validation images
    (their dataset labels), all from the images table's ``train`` split."""

    uris: list[str]
    labels: list[int]
    class_names: list[str]
    val_uris: list[str] = field(default_factory=list)
    val_labels: list[int] = field(default_factory=list)


def model_uri(output_root: str, run_id: str) -> str:
    """Where a run's trained model checkpoint lives (its presence marks the train stage done)."""
    return join(run_uri(output_root, run_id), "model", MODEL_FILE)


def _train_split(images_uri: str, storage_options: dict | None, fraction: float = 0.0,
                 seed: int = 0) -> TrainSplit:
    """The ``train`` split of the images table, minus ``holdout_classes`` (validation draws from training classes
    only: test, query and gallery images are never read)."""
    images = read_table(images_uri, storage_options, columns=["uri", "label", "class_name", "split"])
    train = images.filter(pc.equal(images.column("split"), "train"))
    if train.num_rows == 0:
        raise ValueError(f"{images_uri}: no images in split 'train'")
    uris, labels = train.column("uri").to_pylist(), train.column("label").to_pylist()
    held = holdout_classes(labels, fraction, seed)
    names = dict(zip(labels, train.column("class_name").to_pylist()))
    classes = sorted(set(labels) - held)
    index = {c: i for i, c in enumerate(classes)}
    kept = [i for i, x in enumerate(labels) if x not in held]
    val = [i for i, x in enumerate(labels) if x in held]
    return TrainSplit([uris[i] for i in kept], [index[labels[i]] for i in kept], [names[c] for c in classes],
                      [uris[i] for i in val], [labels[i] for i in val])


def _train_transform(cfg: RunConfig):
    return train_transform(cfg.data.image_size, cfg.train.random_erasing,
                           [(a.name, a.params) for a in cfg.train.augmentations], cfg.data.resize,
                           cfg.train.erasing_aspect)


def _validate(model: torch.nn.Module, loader, device: torch.device, precision: str, world: int) -> dict[str, float]:
    """Validation metrics of the held-out images: each rank embeds its shard, every rank gets every embedding
    (so all ranks take the same early-stopping decision) and computes the metrics."""
    emb, labels = embed_batches(model, loader, device, precision)
    if world > 1 and torch.distributed.is_initialized():
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, (emb, labels))
        parts = [(e, y) for e, y in gathered if len(y)]
        emb, labels = np.concatenate([e for e, _ in parts]), np.concatenate([y for _, y in parts])
    return validation_metrics(emb, labels)


def _scalars(record: dict[str, float]) -> dict[str, float]:
    """Tracker names of an epoch's record: ``train/<stat>`` and ``val/<metric>``."""
    skip = ("epoch", "attempt", "steps", "seconds")
    return {(f"val/{k[len(VAL_PREFIX):]}" if k.startswith(VAL_PREFIX) else f"train/{k}"): float(v)
            for k, v in record.items() if k not in skip}


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker loop (also runs in-process with num_workers=0)."""
    cfg: RunConfig = parse_config(loop_config["config"])
    torch.set_num_threads(cfg.num_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed + rank)
    so = storage_options_of(cfg)
    val_cfg = cfg.train.validation

    split = _train_split(loop_config["images_uri"], so, val_cfg.fraction, val_cfg.seed)
    class_names = split.class_names
    dataset = ImageTableDataset(split.uris, split.labels, _train_transform(cfg), so)
    sampler = RankAwarePKBatchSampler(split.labels, cfg.train.classes_per_batch, cfg.train.samples_per_class,
                                      num_replicas=world, rank=rank, seed=cfg.train.seed,
                                      steps_per_epoch=cfg.train.steps_per_epoch,
                                      random_factorisation=cfg.train.batch_factorisation == "random")
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.train.loader_workers,
                                         persistent_workers=cfg.train.loader_workers > 0)
    loader = ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False, move_to_device=False)
    device = ray.train.torch.get_device()
    val_loader = None
    if split.val_uris:
        val_set = ImageTableDataset(split.val_uris[rank::world], split.val_labels[rank::world],
                                    eval_transform(cfg.data.input_resize(), cfg.data.image_size), so)
        val_loader = torch.utils.data.DataLoader(val_set, batch_size=val_cfg.batch_size, shuffle=False)

    model = _initial_model(cfg)
    objective = build_objective(cfg.model, cfg.train, len(class_names), model.embedding_dim).to(device)
    optimizer = build_optimizer(cfg.train.optimizer, model, objective)
    scheduler = build_scheduler(cfg.train.scheduler, optimizer, cfg.train.epochs)
    scaler = grad_scaler(cfg.train.precision, device)
    selection = ModelSelection(val_cfg.metric, val_cfg.patience, val_cfg.min_delta)
    start_epoch, history, attempt, best_bytes = 0, [], 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)
            if os.path.exists(os.path.join(folder, BEST_FILE)):
                with open(os.path.join(folder, BEST_FILE), "rb") as f:
                    best_bytes = f.read()
        model.load_state_dict(state["model"])
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if state.get("selection"):
            selection.load_state_dict(state["selection"])
        start_epoch, history, attempt = state["epoch"] + 1, state["history"], state["attempt"] + 1
        log.info("rank %d resumed after epoch %d", rank, state["epoch"])
    ddp_model = ray.train.torch.prepare_model(model)
    dist_objective = distribute(objective)
    trackers = Trackers(cfg, open_run(cfg.output_root, cfg.run_id, cfg.storage, create=True)) if rank == 0 else None

    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            _maybe_fail(loop_config, epoch, rank)
            sampler.set_epoch(epoch)
            lr = optimizer.param_groups[0]["lr"]
            label = f"epoch {epoch + 1}/{cfg.train.epochs}"
            steps = console.counted(loader, "train", label=label) if rank == 0 else loader  # steps on the console
            stats = train_epoch(ddp_model, dist_objective, optimizer, steps, device, cfg.train.precision, scaler)
            if scheduler is not None:
                scheduler.step()
            images = stats.pop("images")
            record = {**stats, "epoch": epoch, "attempt": attempt, "lr": lr,
                      "images_per_s": images * world / max(stats["seconds"], 1e-9)}
            improved = False
            if val_loader is not None and ((epoch + 1) % val_cfg.every == 0 or epoch == cfg.train.epochs - 1):
                metrics = _validate(model, val_loader, device, cfg.train.precision, world)
                improved = selection.update(epoch, metrics)
                record.update({VAL_PREFIX + k: v for k, v in metrics.items()})
                log.info("epoch %d: validation %s", epoch,
                         ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            history.append(record)
            with _checkpoint_folder(loop_config, epoch) as folder:
                ckpt = None
                if rank == 0:
                    data = checkpoint_bytes(model, cfg.model, cfg.data.image_size, class_names,
                                            extra={"epoch": epoch, "loss": cfg.train.loss.name,
                                                   "resize": cfg.data.input_resize()},
                                            objective=objective)
                    if improved:
                        best_bytes = data
                    state = {"model": model.state_dict(), "objective": objective.state_dict(),
                             "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict() if scheduler is not None else {},
                             "scaler": scaler.state_dict() if scaler is not None else {},
                             "selection": selection.state_dict(),
                             "epoch": epoch, "attempt": attempt, "history": history}
                    torch.save(state, os.path.join(folder, STATE_FILE))
                    with open(os.path.join(folder, MODEL_FILE), "wb") as f:
                        f.write(data)
                    if best_bytes is not None:
                        with open(os.path.join(folder, BEST_FILE), "wb") as f:
                            f.write(best_bytes)
                    ckpt = ray.train.Checkpoint.from_directory(folder)
                    log.info("epoch %d: loss %.4f, %.1f images/s", epoch, record["loss"], record["images_per_s"])
                    trackers.log(_scalars(record), epoch)
                ray.train.report(record, checkpoint=ckpt)
            if selection.stop:
                log.info("early stop after epoch %d: no %s gain in %d evaluations (best %.4f at epoch %d)", epoch,
                         val_cfg.metric, selection.stale, selection.best_value, selection.best_epoch)
                break
    finally:
        if trackers is not None:
            trackers.close()
    # DDP wrappers hold the process group: free them before Ray Train destroys it
    del ddp_model, dist_objective
    gc.collect()


class _checkpoint_folder:
    """The folder an epoch's checkpoint is written to: a temporary one that Ray Train copies to storage, or, in
    local mode (num_workers 0, where Ray keeps a reference to the folder itself), ``loop_config['checkpoint_dir']``
    /epoch-N, the previous epoch's removed."""

    def __init__(self, loop_config: dict[str, Any], epoch: int) -> None:
        self.root = loop_config.get("checkpoint_dir")
        self.epoch = epoch
        self._tmp: Optional[tempfile.TemporaryDirectory] = None

    def __enter__(self) -> str:
        if self.root is None:
            self._tmp = tempfile.TemporaryDirectory()
            return self._tmp.name
        for old in os.listdir(self.root):
            shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)
        folder = os.path.join(self.root, f"epoch-{self.epoch:05d}")
        os.makedirs(folder)
        return folder

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def _initial_model(cfg: RunConfig) -> torch.nn.Module:
    if cfg.model.weights not in ("none", "imagenet"):
        return load_checkpoint(cfg.model.weights, storage_options_of(cfg)).model
    return build_model(cfg.model, cfg.data.image_size)


def _maybe_fail(loop_config: dict[str, Any], epoch: int, rank: int) -> None:
    """Fault injection for tests: kill this worker once, while it works on the given epoch, on the given rank.

    It dies a few seconds into the epoch, as a real crash would, so the controller has seen the last report.
    """
    spec = loop_config.get("fail_once")
    if not spec or spec["epoch"] != epoch or spec["rank"] != rank or os.path.exists(spec["marker"]):
        return
    with open(spec["marker"], "w") as f:  # where it happens: the multi-node tests remove this node
        f.write(ray.get_runtime_context().get_node_id())
    time.sleep(spec.get("after_s", 3.0))
    os._exit(1)


def train_class_count(images_uri: str, storage_options: dict | None) -> int:
    """Distinct classes of the committed images table's train split."""
    split = read_table(images_uri, storage_options, columns=["label", "split"])
    return len(set(split.filter(pc.equal(split.column("split"), "train")).column("label").to_pylist()))


def check_batch_fits(n_classes: int, train: TrainConfig) -> None:
    """Raise ConfigError (one line, exit 2) when a P x K batch asks for more distinct classes per step (P x workers,
    see RankAwarePKBatchSampler) than the training split's ``n_classes``: checked in the driver at start-up, not
    minutes later inside the Ray Train workers."""
    workers = max(train.num_workers, 1)
    needed = train.classes_per_batch * workers
    if n_classes < needed:
        raise ConfigError(f"train.classes_per_batch: {train.classes_per_batch} classes per batch x {workers} "
                          f"worker(s) = {needed} distinct classes per step, but the train split has {n_classes}; "
                          "lower train.classes_per_batch or train.num_workers")


def training_metrics(result: TrainResult, run_id: str) -> pa.Table:
    """``metrics`` rows of the train stage, k = epoch: per-epoch statistics (split ``train``), validation metrics
    (split ``val``: ``recall_at_1``, ``map_at_r``) and, with validation, ``selected_epoch`` (value = the epoch
    whose model the run kept)."""
    rows = []
    for h in result.history:
        for name, value in h.items():
            if name in ("epoch", "attempt", "steps", "seconds"):
                continue
            val = name.startswith(VAL_PREFIX)
            rows.append({"run_id": run_id, "stage": "train", "split": "val" if val else "train",
                         "metric": name[len(VAL_PREFIX):] if val else name, "k": int(h["epoch"]),
                         "value": float(value)})
    if result.selected_epoch is not None:
        rows.append({"run_id": run_id, "stage": "train", "split": "val", "metric": "selected_epoch",
                     "k": None, "value": float(result.selected_epoch)})
    return pa.Table.from_pylist(rows, schema=METRICS_SCHEMA)


def _check_inputs(images_uri: str, cfg: RunConfig) -> None:
    """Fail before starting workers on a bad augmentation; warn when the inputs upsample the training images."""
    _train_transform(cfg)
    images = read_table(images_uri, storage_options_of(cfg), columns=["split", "width", "height"])
    train = images.filter(pc.equal(images.column("split"), "train"))
    warn_if_upsampling(train.column("width").to_pylist(), train.column("height").to_pylist(), cfg.data.resize,
                       cfg.data.image_size)


def run_train(images_uri: str, cfg: RunConfig, fail_once: dict | None = None) -> TrainResult:
    """Train with Ray Train and store the run's model checkpoint in the run folder: the best validation epoch's
    model when ``train.validation`` holds classes out, else the last epoch's."""
    start = time.perf_counter()
    _check_inputs(images_uri, cfg)
    so = storage_options_of(cfg)
    run = open_run(cfg.output_root, cfg.run_id, cfg.storage, create=True)
    fs, path = run.pyarrow_fs(run.train_storage)
    fs.create_dir(path, recursive=True)
    check_batch_fits(train_class_count(images_uri, so), cfg.train)
    local_dir = tempfile.mkdtemp(prefix="dml_ray_ckpt_") if cfg.train.num_workers == 0 else None
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": cfg.model_dump(mode="json"), "images_uri": images_uri, "fail_once": fail_once,
                           "checkpoint_dir": local_dir},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RayRunConfig(
            name="train", storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    try:
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint")
        with result.checkpoint.as_directory() as folder:
            best = os.path.join(folder, BEST_FILE)
            with open(best if os.path.exists(best) else os.path.join(folder, MODEL_FILE), "rb") as f:
                data = f.read()
            state = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)
    finally:
        if local_dir is not None:
            shutil.rmtree(local_dir, ignore_errors=True)
    history = state["history"]
    selection = state.get("selection") or {}
    selected = selection.get("best_epoch")
    stopped = history[-1]["epoch"] < cfg.train.epochs - 1
    if selected is not None:
        log.info("train: kept the model of epoch %d (%s %.4f)%s", selected, cfg.train.validation.metric,
                 selection["best_value"], ", stopped early" if stopped else "")
    uri = run.write_bytes(model_uri(cfg.output_root, cfg.run_id), data)
    return TrainResult(uri, history, time.perf_counter() - start, selected, stopped)
