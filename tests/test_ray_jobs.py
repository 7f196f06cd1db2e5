"""The nightly job through the real Ray Jobs CLI on a token-authenticated cluster this test starts and stops.

The head runs on loopback with its own ports and temp dir; RAY_AUTH_MODE / RAY_AUTH_TOKEN are set
explicitly for the server and every client call. It is stopped by ending its own processes (its
process group, then anything naming its temp dir): ``ray stop`` would stop every Ray on the machine.
"""
from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dml_ray.cli import main as cli_main
from jobs.entry import utc_date
from tests.nightly_setup import write_nightly_setup
from tests.processes import kill_processes_mentioning, pids_mentioning

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _wait_for_dashboard(url: str, token: str, head: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while True:
        assert head.poll() is None, log.read_text()
        try:
            with opener.open(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        assert time.monotonic() < deadline, "the dashboard never came up:\n" + log.read_text()
        time.sleep(0.5)


@pytest.fixture
def token_cluster(tmp_path):
    """A head node on 127.0.0.1 with token auth; yields (dashboard URL, client env); stops only its own processes."""
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash, client, node, objects, agent, agent_grpc, runtime_env, metrics = _free_ports(9)
    worker_base = random.randrange(20_000, 30_000, 100)
    log = tmp_path / "head.log"
    with open(log, "wb") as out:
        head = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
             f"--node-manager-port={node}", f"--object-manager-port={objects}",
             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
             f"--min-worker-port={worker_base}", f"--max-worker-port={worker_base + 99}", "--num-cpus=2",
             f"--temp-dir={temp}", "--disable-usage-stats"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_dashboard(url, token, head, log)
        yield url, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(10)
        kill_processes_mentioning(temp)
        assert not pids_mentioning(temp), "processes of the test cluster survived"
        shutil.rmtree(temp, ignore_errors=True)


def test_nightly_job_submitted_with_token_auth(token_cluster, tmp_path, capsys):
    url, env = token_cluster
    assert "RAY_ADDRESS" not in os.environ
    setup = write_nightly_setup(tmp_path / "nightly.yaml", str(tmp_path / "data"), str(tmp_path / "out"))

    # the Jobs API refuses a client without the cluster's token
    wrong = {**env, "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    refused = subprocess.run([RAY, "job", "list", "--address", url], env=wrong, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode != 0

    submission = f"nightly-{utc_date()}"
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", url, "--working-dir", ".", "--submission-id", submission, "--",
         "python", "-m", "jobs.nightly", "--config", setup["config"]],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=480)
    output = submit.stdout + submit.stderr
    assert submit.returncode == 0, output
    assert f"nightly: ok run_id={utc_date()} ran=data,embed,evaluate,knn" in output
    # the job ran the uploaded working dir's code, not an installed copy, and joined the cluster
    assert "runtime_resources/working_dir_files" in output and re.search(r"Ray at [\d.]+:\d+", output)
    request = urllib.request.Request(f"{url}/api/jobs/{submission}",
                                     headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30) as response:
        assert json.load(response)["status"] == "SUCCEEDED"

    assert cli_main(["query", "--root", setup["out"], "--all-runs", "--format", "csv",
                     "SELECT run_id, count(DISTINCT image_id) AS n FROM embeddings GROUP BY run_id"]) == 0
    assert capsys.readouterr().out.split() == ["run_id,n", f"{utc_date()},49"]
