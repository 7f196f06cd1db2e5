"""Start-up checks of a run, in the driver, before any stage: what would otherwise fail minutes later inside Ray.

Each failure is one line and exit code 2 (bad config or input, dml_ray/errors.py).
"""
from __future__ import annotations

import logging

from dml_ray.config import RunConfig
from dml_ray.io.tables import is_committed, table_uri
from dml_ray.models.checkpoint import load_checkpoint
from pipelines.train import check_batch_fits, train_class_count

log = logging.getLogger(__name__)

# stages that load model.weights when it names a checkpoint
_USES_WEIGHTS = ("train", "embed", "mpn", "explain")


def preflight(cfg: RunConfig, stages: list[str]) -> None:
    """Check that ``model.weights`` (a checkpoint path) loads and that the P x K batch fits the train split.

    The train split is known from the committed images table, or, for synthetic data, from the config
    (the zero-shot split trains on floor(n_classes / 2) classes); otherwise the train stage checks it
    in the driver before Ray Train starts.
    """
    so = cfg.data.storage_options or None
    if cfg.model.weights not in ("none", "imagenet") and any(s in stages for s in _USES_WEIGHTS):
        load_checkpoint(cfg.model.weights, so)  # BadInput naming the file when truncated or carrying code
    if "train" in stages:
        images = table_uri(cfg.output_root, cfg.run_id, "images")
        if is_committed(images, so):
            check_batch_fits(train_class_count(images, so), cfg.train)
        elif cfg.data.kind == "synthetic" and not cfg.data.root:
            check_batch_fits(cfg.data.synthetic.n_classes // 2, cfg.train)
