"""Shared fixtures: one local Ray instance for the whole session, a small synthetic dataset, a demo run."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def start_session_ray():
    """Start (or restart, after a test that ran its own cluster) the suite's local Ray instance."""
    import ray

    from pipelines.ray_env import ensure_ray

    ensure_ray(num_cpus=2)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_no_progress_timeout_s = 120
    return ray


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance (2 CPUs) shared by every test that needs Ray."""
    ray = start_session_ray()
    yield ray
    ray.shutdown()


def demo_like_config(output_root: str, demo: str = "demo", **overrides):
    """A demo's config (jobs/configs/<demo>.yaml) with test-sized overrides."""
    from dml_ray.cli import _demo_config_path
    from dml_ray.config import load_config

    return load_config(_demo_config_path(demo), {"output_root": output_root, "run_id": "t", **overrides})
