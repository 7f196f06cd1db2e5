"""Training on Ray Train: DDP workers, rank-aware P x K batches, a checkpoint every epoch, resume on failure."""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
from ray.train import RunConfig as RayRunConfig
from ray.train.torch import TorchTrainer

from dml_ray.config import ConfigError, RunConfig, TrainConfig, parse_config
from dml_ray.data.dataset import ImageTableDataset
from dml_ray.data.samplers import RankAwarePKBatchSampler
from dml_ray.data.transforms import train_transform
from dml_ray.io.fs import join, pyarrow_fs
from dml_ray.io.run import storage_options_of
from dml_ray.io.tables import read_table, run_uri
from dml_ray.models.checkpoint import checkpoint_bytes, load_checkpoint, save_checkpoint
from dml_ray.models.embedding import build_model
from dml_ray.objectives import build_objective, distribute
from dml_ray.training import build_optimizer, build_scheduler, train_epoch

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
MODEL_FILE = "model.pt"


@dataclass(frozen=True)
class TrainResult:
    checkpoint_uri: str
    history: list[dict[str, float]]
    seconds: float


def model_uri(output_root: str, run_id: str) -> str:
    """Where a run's trained model checkpoint lives (its presence marks the train stage done)."""
    return join(run_uri(output_root, run_id), "model", MODEL_FILE)


def _train_split(images_uri: str, storage_options: dict | None):
    images = read_table(images_uri, storage_options)
    train = images.filter(pc.equal(images.column("split"), "train"))
    if train.num_rows == 0:
        raise ValueError(f"{images_uri}: no images in split 'train'")
    labels = train.column("label").to_pylist()
    classes = sorted(set(labels))
    names = dict(zip(labels, train.column("class_name").to_pylist()))
    index = {c: i for i, c in enumerate(classes)}
    return train.column("uri").to_pylist(), [index[x] for x in labels], [names[c] for c in classes]


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker loop (also runs in-process with num_workers=0)."""
    cfg: RunConfig = parse_config(loop_config["config"])
    torch.set_num_threads(cfg.num_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed + rank)
    so = storage_options_of(cfg)

    uris, labels, class_names = _train_split(loop_config["images_uri"], so)
    transform = train_transform(cfg.data.image_size, cfg.train.random_erasing, cfg.train.crop_scale,
                                cfg.train.erasing_aspect)
    dataset = ImageTableDataset(uris, labels, transform, so)
    sampler = RankAwarePKBatchSampler(labels, cfg.train.classes_per_batch, cfg.train.samples_per_class,
                                      num_replicas=world, rank=rank, seed=cfg.train.seed,
                                      steps_per_epoch=cfg.train.steps_per_epoch,
                                      random_factorisation=cfg.train.batch_factorisation == "random")
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.train.loader_workers,
                                         persistent_workers=cfg.train.loader_workers > 0)
    loader = ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False, move_to_device=False)
    device = ray.train.torch.get_device()

    model = _initial_model(cfg)
    objective = build_objective(cfg.model, cfg.train, len(class_names), model.embedding_dim).to(device)
    optimizer = build_optimizer(cfg.train.optimizer, model, objective)
    scheduler = build_scheduler(cfg.train.scheduler, optimizer, cfg.train.epochs)
    start_epoch, history, attempt = 0, [], 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        start_epoch, history, attempt = state["epoch"] + 1, state["history"], state["attempt"] + 1
        log.info("rank %d resumed after epoch %d", rank, state["epoch"])
    ddp_model = ray.train.torch.prepare_model(model)
    dist_objective = distribute(objective)

    for epoch in range(start_epoch, cfg.train.epochs):
        _maybe_fail(loop_config, epoch, rank)
        sampler.set_epoch(epoch)
        stats = train_epoch(ddp_model, dist_objective, optimizer, loader, device)
        if scheduler is not None:
            scheduler.step()
        images = stats.pop("images")
        record = {**stats, "epoch": epoch, "attempt": attempt,
                  "images_per_s": images * world / max(stats["seconds"], 1e-9)}
        history.append(record)
        keep = loop_config.get("checkpoint_root")  # in-process: Ray keeps the folder's path, not a copy
        with contextlib.nullcontext(tempfile.mkdtemp(dir=keep)) if keep else tempfile.TemporaryDirectory() as folder:
            ckpt = None
            if rank == 0:
                state = {"model": model.state_dict(), "objective": objective.state_dict(),
                         "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict() if scheduler is not None else {},
                         "epoch": epoch, "attempt": attempt, "history": history}
                torch.save(state, os.path.join(folder, STATE_FILE))
                with open(os.path.join(folder, MODEL_FILE), "wb") as f:
                    f.write(checkpoint_bytes(model, cfg.model, cfg.data.image_size, class_names,
                                             extra={"epoch": epoch, "loss": cfg.train.loss.name,
                                                    "resize": cfg.data.input_resize()},
                                             objective=objective))
                ckpt = ray.train.Checkpoint.from_directory(folder)
                log.info("epoch %d: loss %.4f, %.1f images/s", epoch, record["loss"], record["images_per_s"])
            ray.train.report(record, checkpoint=ckpt)
    # DDP wrappers hold the process group: free them before Ray Train destroys it
    del ddp_model, dist_objective
    gc.collect()


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


def run_train(images_uri: str, cfg: RunConfig, fail_once: dict | None = None) -> TrainResult:
    """Train with Ray Train and store the final model checkpoint in the run folder."""
    start = time.perf_counter()
    so = storage_options_of(cfg)
    storage = join(cfg.output_root, "_train", cfg.run_id)
    fs, path = pyarrow_fs(storage, so)
    fs.create_dir(path, recursive=True)
    check_batch_fits(train_class_count(images_uri, so), cfg.train)
    # with num_workers 0 the loop runs in this process and Ray Train does not copy its checkpoints to
    # storage_path: they must outlive the loop's temporary folders until the model is read back below
    in_process = tempfile.mkdtemp(prefix="dml_ray_train_") if cfg.train.num_workers == 0 else None
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": cfg.model_dump(mode="json"), "images_uri": images_uri, "fail_once": fail_once,
                           "checkpoint_root": in_process},
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
            with open(os.path.join(folder, MODEL_FILE), "rb") as f:
                data = f.read()
            history = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)["history"]
    finally:
        if in_process:
            shutil.rmtree(in_process, ignore_errors=True)
    uri = model_uri(cfg.output_root, cfg.run_id)
    save_checkpoint(uri, data, so)
    return TrainResult(uri, history, time.perf_counter() - start)
