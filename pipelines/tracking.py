"""Experiment tracking from the training loop: TensorBoard event files in the run, MLflow through Ray's setup_mlflow."""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Optional

from dml_ray.config import RunConfig, uri_scheme
from dml_ray.io.fs import is_local
from dml_ray.io.run import Run

log = logging.getLogger(__name__)

TENSORBOARD_DIR = ("logs", "tensorboard")


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = value
    return out


class Trackers:
    """The trackers a run logs per-epoch scalars to (rank 0 only): TensorBoard under ``runs/<id>/logs/tensorboard/``
    (written locally, copied into the run after each epoch when the output root is remote) and, with
    ``tracking.mlflow_uri``, an MLflow run named after the run id (Ray's ``setup_mlflow``: the config becomes the
    run's params)."""

    def __init__(self, cfg: RunConfig, run: Run) -> None:
        self.run = run
        self.writer = None
        self.mlflow = None
        self._local_dir: Optional[str] = None
        self._remote: Optional[str] = None
        if cfg.tracking.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            target = run.path(*TENSORBOARD_DIR)
            if is_local(run.fs):
                self._local_dir = run.fs_path(target)
            else:
                self._local_dir = tempfile.mkdtemp(prefix="dml_ray_tb_")
                self._remote = target
            self.writer = SummaryWriter(self._local_dir)
        if cfg.tracking.mlflow_uri:
            from ray.air.integrations.mlflow import setup_mlflow

            if uri_scheme(cfg.tracking.mlflow_uri) == "file":
                # MLflow 3 refuses its file store unless asked for explicitly: a file: URI in the config is that
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            config = cfg.model_dump(mode="json", exclude={"storage": {"options"}})
            self.mlflow = setup_mlflow(flat_params(config), tracking_uri=cfg.tracking.mlflow_uri,
                                       experiment_name=cfg.tracking.mlflow_experiment, run_name=cfg.run_id,
                                       create_experiment_if_not_exists=True, tags={"dml_ray.run_id": cfg.run_id})

    def log(self, scalars: dict[str, float], step: int) -> None:
        """Log one epoch's scalars (names like ``train/loss``, ``val/recall_at_1``)."""
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()
            self._upload()
        if self.mlflow is not None:
            # MLflow metric keys allow '/', but not '@'
            self.mlflow.log_metrics({name: float(value) for name, value in scalars.items()}, step=step)

    def _upload(self) -> None:
        if self._remote is None:
            return
        for name in os.listdir(self._local_dir):
            with open(os.path.join(self._local_dir, name), "rb") as f:
                self.run.write_bytes(f"{self._remote}/{name}", f.read())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self._upload()
        if self.mlflow is not None:
            self.mlflow.end_run()
