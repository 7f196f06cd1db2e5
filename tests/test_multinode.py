"""Multi-node faults (issue 11, item 10): a worker node removed mid-embed and mid-train on a ``ray.cluster_utils``
cluster (several raylets on this machine), and the run still commits every image exactly once / resumes from its
last checkpoint.

The module stops the suite's session Ray instance, runs its own cluster (a head without CPUs, so every task, actor
and Ray Train worker lands on a removable worker node; the driver and Ray Train's controller stay on the head; two
worker nodes of 2 logical CPUs, so the survivor can take over all the work), and restarts the session instance
afterwards.
"""
from __future__ import annotations

import os
import threading
import time

import pytest

from dml_ray.io.run import open_run
from dml_ray.config import DataConfig, EmbedConfig
from dml_ray.data.readers import read_images
from dml_ray.io.tables import read_table, table_uri
from pipelines.embed import run_embed
from tests.conftest import demo_like_config, start_session_ray
from tests.nightly_setup import SIZE, write_nightly_setup

# fast node-death detection: the GCS declares a raylet dead after 3 missed 300 ms health checks
FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 300,
                          "health_check_timeout_ms": 300, "health_check_failure_threshold": 3}


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    session_was_up = ray.is_initialized()
    ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": FAST_FAILURE_DETECTION})
    for _ in range(2):
        c.add_node(num_cpus=2)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_no_progress_timeout_s = 90
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if session_was_up:
            start_session_ray()


@pytest.fixture
def two_worker_nodes(cluster):
    """The module's cluster with two live worker nodes (a node an earlier test removed is replaced first)."""
    while len(cluster.worker_nodes) < 2:
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    return cluster


def _remove_node_when(cluster, node_id_ready, delay_s: float = 0.0) -> dict:
    """In a thread: wait until ``node_id_ready()`` names a node, then ``delay_s`` more, then remove that node without
    grace."""
    outcome: dict = {}

    def watch() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            node_id = node_id_ready()
            if node_id:
                time.sleep(delay_s)
                victim = next(n for n in cluster.worker_nodes if n.node_id == node_id)
                cluster.remove_node(victim, allow_graceful=False)
                outcome["removed"] = node_id
                return
            time.sleep(0.05)

    outcome["thread"] = threading.Thread(target=watch, daemon=True)
    outcome["thread"].start()
    return outcome


def _node_of_an_embedding_actor() -> str | None:
    import ray._private.state as state

    for actor in state.actors(actor_state_name="ALIVE").values():
        if "MapWorker" in actor.get("ActorClassName", "") and actor["Address"]["NodeID"]:
            return actor["Address"]["NodeID"]
    return None


def test_a_node_removed_mid_embed_still_embeds_every_image_once(two_worker_nodes, tmp_path):
    setup = write_nightly_setup(tmp_path / "nightly.yaml", str(tmp_path / "data"), str(tmp_path / "out"))
    images = read_images("cub", setup["data"])
    outcome = _remove_node_when(two_worker_nodes, _node_of_an_embedding_actor)
    cfg = EmbedConfig(batch_size=2, concurrency=2, max_error_fraction=0.1, incremental=False,
                      in_process_below=0)  # on Ray Data's actors, which the removed node hosts
    data = DataConfig(kind="cub", root=setup["data"], resize=SIZE, image_size=SIZE)
    checkpoint = os.path.join(setup["data"], "model.pt")
    result = run_embed(images, checkpoint, open_run(setup["out"], "lost-node", create=True), data, cfg)
    outcome["thread"].join(60)
    assert outcome.get("removed"), "no embedding actor ever ran on a worker node"
    ids = read_table(table_uri(setup["out"], "lost-node", "embeddings")).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == result.rows == setup["images"] - 1
    assert read_table(table_uri(setup["out"], "lost-node", "errors")).column("image_id").to_pylist() == \
        [setup["corrupt"]]


def test_a_node_removed_mid_train_resumes_from_the_last_checkpoint(two_worker_nodes, tmp_path, monkeypatch):
    """Also issue 11, item 1: the output root is relative; Ray Train's workers run in their own working directory."""
    import functools

    import pipelines.run
    from pipelines.run import run_pipeline

    marker = tmp_path / "in-epoch-1"
    # rank 1 writes its node id to the marker once it is inside epoch 1, then waits there to be removed with its node
    fail_once = {"epoch": 1, "rank": 1, "marker": str(marker), "after_s": 120}
    monkeypatch.setattr(pipelines.run, "run_train", functools.partial(pipelines.run.run_train, fail_once=fail_once))
    monkeypatch.chdir(tmp_path)
    cfg = demo_like_config("relative_out", run_id="lost-node", stages=["data", "train"], **{
        "data.synthetic": {"n_classes": 4, "images_per_class": 4, "image_size": 32, "seed": 0},
        "data.resize": 32, "data.image_size": 32, "train.epochs": 2, "train.steps_per_epoch": 1,
        "train.classes_per_batch": 1, "train.samples_per_class": 2, "train.num_workers": 2,
        "train.max_failures": 1})
    # removed 5 s into epoch 1: Ray Train's controller registers a reported checkpoint when it next polls the
    # workers; a node lost before that poll restarts from the checkpoint before (here: from scratch)
    outcome = _remove_node_when(two_worker_nodes, lambda: marker.exists() and marker.read_text(), delay_s=5.0)
    summary = run_pipeline(cfg)
    outcome["thread"].join(60)
    assert outcome.get("removed"), "the worker never reached epoch 1"
    history = summary.stages["train"]["history"]
    # epoch 1 ran again in a second attempt, restored from epoch 0's checkpoint, on the surviving node
    assert [(h["epoch"], h["attempt"]) for h in history] == [(0, 0), (1, 1)]
    assert (tmp_path / "relative_out" / "runs" / "lost-node" / "model" / "model.pt").is_file()
