"""``python -m jobs.nightly --config FILE``: the nightly incremental run (issue 7; exit codes: jobs/entry.py).

Run id = today's UTC date; every stage the config lists, committed ones skipped; embeddings computed
only for images whose (image_id, content hash, model_id) no earlier run embedded; ``latest`` moved
last; the output root locked meanwhile. It embeds with the fixed checkpoint ``model.weights`` and
retrains only when the config lists the train stage.
"""
from __future__ import annotations

import sys
from typing import Optional

from dml_ray.config import ConfigError, RunConfig
from jobs.entry import job_main


def check_nightly(cfg: RunConfig) -> None:
    """A nightly run needs a model: the train stage or a checkpoint in ``model.weights``."""
    if "train" not in cfg.stages and cfg.model.weights in ("none", "imagenet"):
        raise ConfigError("model.weights: the nightly run embeds with a fixed checkpoint; set model.weights to "
                          "its path (or list the train stage to retrain)")


def main(argv: Optional[list[str]] = None) -> int:
    """Run the nightly job; returns its exit code."""
    return job_main("nightly", __doc__.splitlines()[0], check=check_nightly, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
