"""The explorer as a Ray Serve application: the same FastAPI app (``dml_ray.serve.app.create_app``), one
:class:`~dml_ray.serve.explorer.Explorer` per replica, N replicas behind Ray Serve's HTTP proxy.

Ray 2.60's late-bound ingress is used: ``@serve.ingress()`` on a class that builds the app in
``__serve_build_asgi_app__`` after its constructor, so each replica opens the run itself and the app's routes are
exactly the single-process ones (nothing is re-declared for Serve).
"""
from __future__ import annotations

import logging
from typing import Optional

from fastapi import FastAPI
from ray import serve

from dml_ray.config import ServeConfig, absolute_local_uri
from dml_ray.explore.index import run_index
from dml_ray.io.run import open_run
from dml_ray.serve.app import create_app
from dml_ray.serve.explorer import Explorer
from pipelines.ray_env import check_gpu_request, ensure_ray

log = logging.getLogger(__name__)

APP_NAME = "dml_ray_explorer"


@serve.ingress()
class ExplorerReplica:
    """One replica: opens the run, builds its explorer, then serves ``create_app``'s app."""

    def __init__(self, root: str, run_id: str, storage_options: Optional[dict], token: Optional[str],
                 use_gpu: bool) -> None:
        # one torch / faiss thread per replica process (Explorer's default): replicas and concurrent requests scale
        self.explorer = Explorer(open_run(root, run_id, storage_options), use_gpu=use_gpu)
        self.token = token

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.explorer, token=self.token)


def deploy_explorer(root: str, run_id: Optional[str], storage_options: Optional[dict], cfg: ServeConfig,
                    token: Optional[str] = None) -> str:
    """Deploy the explorer of a run on Ray Serve (joining RAY_ADDRESS, else a private local instance) and return its
    URL. The run id is resolved here once (``None``: the latest run), and the run's search index built and saved
    before any replica starts, so replicas neither race to build it nor open different runs."""
    ensure_ray()
    check_gpu_request({"serve.gpus_per_replica": cfg.gpus_per_replica > 0})
    root = absolute_local_uri(root)  # replicas run in their own working directory
    run = open_run(root, run_id, storage_options)
    run_index(run)
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, proxy_location="HeadOnly")
    deployment = serve.deployment(
        name="explorer", num_replicas=cfg.replicas,
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica})(ExplorerReplica)
    serve.run(deployment.bind(root, run.run_id, storage_options, token, cfg.gpus_per_replica > 0),
              name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{cfg.host}:{cfg.port}/"
    log.info("explorer of run %s on Ray Serve (%d replica(s)) at %s", run.run_id, cfg.replicas, url)
    return url


def undeploy_explorer(shutdown: bool = True) -> None:
    """Remove the explorer application; ``shutdown`` also stops Serve's controller and proxies (the default for a
    Serve this process started; a shared cluster's other applications keep running with ``shutdown=False``)."""
    import ray

    if not ray.is_initialized():  # the deployment never got as far as Ray
        return
    if shutdown:
        serve.shutdown()
    else:
        serve.delete(APP_NAME)
