"""Starting or joining Ray the same way from the CLI, the jobs and the tests."""
from __future__ import annotations

import logging
import os
from typing import Optional

import ray

log = logging.getLogger(__name__)


def ensure_ray(num_cpus: Optional[int] = None, address: Optional[str] = None) -> None:
    """Join the Ray instance named by ``address`` / RAY_ADDRESS, or start a private local one; no-op if connected.

    Without an address Ray would attach to whatever cluster ``ray start`` last left on this machine;
    ``address="local"`` keeps an unrelated cluster from receiving our work.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = {"address": address} if address else {"address": "local", "num_cpus": num_cpus,
                                                     "dashboard_host": "127.0.0.1"}
    log.info("starting Ray (%s)", address or "local")
    ray.init(log_to_driver=True, configure_logging=False, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.isatty(2)
