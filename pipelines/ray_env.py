"""Starting or joining Ray the same way from the CLI, the jobs and the tests."""
from __future__ import annotations

import logging
import os
from typing import Optional

import ray

log = logging.getLogger(__name__)

_started_here = False


def ensure_ray(num_cpus: Optional[int] = None, address: Optional[str] = None) -> None:
    """Join the Ray instance named by ``address`` / RAY_ADDRESS, or start a private local one; no-op if connected.

    Without an address Ray would attach to whatever cluster ``ray start`` last left on this machine;
    ``address="local"`` keeps an unrelated cluster from receiving our work.
    """
    global _started_here
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = {"address": address} if address else {"address": "local", "num_cpus": num_cpus,
                                                     "dashboard_host": "127.0.0.1"}
    log.info("starting Ray (%s)", address or "local")
    ray.init(log_to_driver=True, configure_logging=False, **kwargs)
    _started_here = not address
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.isatty(2)


def check_gpu_request(requests: dict[str, bool]) -> None:
    """Fail fast when a stage asks for a GPU that the private local Ray instance lacks: it would wait forever.

    ``requests`` maps a config field (``train.use_gpu``) to its value. On a joined cluster a missing
    GPU is only logged, since an autoscaler may be starting a GPU node.
    """
    wanted = [name for name, flag in requests.items() if flag]
    if not wanted or ray.cluster_resources().get("GPU", 0) > 0:
        return
    if _started_here:
        raise ValueError(f"{', '.join(wanted)}: true, but the local Ray instance has no GPU; set it to false "
                         "or join a GPU cluster (RAY_ADDRESS)")
    log.warning("%s asks for a GPU and the cluster has none yet: waiting for the autoscaler", ", ".join(wanted))
