"""Start-up checks of a run, in the driver, before any stage: what would otherwise fail minutes later inside Ray.

Each failure is one line and exit code 2 (bad config or input, dml_ray/errors.py).
"""
from __future__ import annotations

import logging

from dml_ray.config import RunConfig
from dml_ray.io.run import Run
from dml_ray.models.checkpoint import load_checkpoint
from pipelines.train import check_batch_fits, train_class_count

log = logging.getLogger(__name__)

# stages that load model.weights when it names a checkpoint
_USES_WEIGHTS = ("train", "embed", "mpn", "explain")


def preflight(cfg: RunConfig, run: Run, stages: list[str]) -> None:
    """Check that ``model.weights`` (a checkpoint path) loads and that the P x K batch fits the train split.

    The train split is known from the committed images table, or, for synthetic data, from the config
    (the zero-shot split trains on floor(n_classes / 2) classes); otherwise the train stage checks it
    in the driver before Ray Train starts.
    """
    if cfg.model.weights not in ("none", "imagenet") and any(s in stages for s in _USES_WEIGHTS):
        load_checkpoint(cfg.model.weights, run.storage_options)  # BadInput naming the file: truncated, or code
    if "train" in stages:
        if run.committed("images"):
            check_batch_fits(train_class_count(run.table_uri("images"), run.storage_options), cfg.train)
        elif cfg.data.kind == "synthetic" and not cfg.data.root:
            check_batch_fits(cfg.data.synthetic.n_classes // 2, cfg.train)
