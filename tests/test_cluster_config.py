"""cluster.yaml (issue 7): Ray's own offline validation, loopback-only dashboard, token auth, project on every node."""
from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_validation(cluster):
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    nodes = prepared["available_node_types"]
    assert prepared["provider"]["type"] == "aws" and prepared["head_node_type"] == "head"
    assert "GPU" not in nodes["head"]["resources"] and nodes["head"]["max_workers"] == 0
    gpu = nodes["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["min_workers"] < gpu["max_workers"] <= prepared["max_workers"]
    # the checks are real: a misspelled key or an unknown head type is refused
    with pytest.raises(Exception, match="head_node_typo"):
        validate_config(prepare_config({**copy.deepcopy(cluster), "head_node_typo": "head"}))
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config({**copy.deepcopy(cluster), "head_node_type": "gpu"}))


def test_cluster_is_locked_down_and_installs_the_project(cluster):
    prepared = prepare_config(copy.deepcopy(cluster))
    head = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    for commands in (prepared["head_start_ray_commands"], prepared["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start and 'RAY_AUTH_TOKEN="$(cat ~/.ray/auth_token)"' in start
    setup = " ".join(prepared["setup_commands"])
    assert prepared["file_mounts"] == {"~/dml_ray": "."} and 'pip install -q -e "$HOME/dml_ray"' in setup
    assert "secretsmanager get-secret-value" in setup and "chmod 600 ~/.ray/auth_token" in setup


def test_nothing_we_ship_binds_the_dashboard_beyond_loopback():
    shipped = subprocess.run(["git", "ls-files", "dml_ray", "pipelines", "jobs", "bench", "cluster.yaml", "README.md",
                              "pyproject.toml"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert "cluster.yaml" in shipped and "pipelines/ray_env.py" in shipped
    for path in shipped:
        text = (REPO / path).read_text(errors="replace")
        assert "0.0.0.0" not in text, path
        for line in text.splitlines():
            if "dashboard-host" in line or "dashboard_host" in line:
                assert "127.0.0.1" in line, f"{path}: {line.strip()}"
