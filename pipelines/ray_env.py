"""Starting or joining Ray the same way from the CLI, the jobs and the tests."""
from __future__ import annotations

import logging
import os
import secrets
from typing import Optional

import ray

from dml_ray.console import ray_progress_bars, route_worker_output

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
    if not address:
        token_for_unwritable_home(os.environ)
    log.info("starting Ray (%s)", address or "local")
    ray.init(log_to_driver=True, configure_logging=False, **kwargs)
    _started_here = not address
    route_worker_output()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.isatty(2) and ray_progress_bars()


def token_for_unwritable_home(environ: dict) -> bool:
    """Give a private local Ray instance an auth token in ``environ`` when Ray could not store one in ``$HOME``.

    Ray 2.60 enables token auth and writes ``~/.ray/auth_token`` on ``ray.init()``; with an unwritable (or
    missing) home that is a traceback. A random token in RAY_AUTH_TOKEN, seen by this process and the Ray
    processes it starts, needs no file. Returns whether it set one.
    """
    if environ.get("RAY_AUTH_TOKEN") or environ.get("RAY_AUTH_TOKEN_PATH"):
        return False
    folder = os.path.join(os.path.expanduser("~"), ".ray")
    if os.path.isfile(os.path.join(folder, "auth_token")):
        return False
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
        return False
    except OSError as err:
        log.warning("%s is not writable (%s): the private Ray instance gets an auth token for this process only",
                    folder, err.strerror or err)
    environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
    return True


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
