"""Stale-lock takeover is atomic (issue 11, item 3): of several runs that find the same dead holder's lock at the same
moment, exactly one holds the lock, locally (flock-guarded rename) and on S3 (PUT If-Match the stale record's ETag)."""
from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.lock_contenders import contend, contend_into

TRIALS = 120  # local: >= 100 contended takeovers
S3_TRIALS = 20  # each S3 trial is ~20 requests to moto
CONTENDERS = 4


def _dead_pid() -> int:
    """The pid of a process of this host that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _stale_record(pid: int) -> bytes:
    return json.dumps({"owner": "cron", "host": socket.gethostname(), "pid": pid, "run_id": "dead",
                       "since": "2026-01-01T00:00:00+00:00", "token": "stale"}).encode()


def test_concurrent_local_takeovers_have_exactly_one_winner(tmp_path):
    pid = _dead_pid()
    roots = []
    for trial in range(TRIALS):
        root = tmp_path / f"trial-{trial}"
        root.mkdir()
        (root / "_lock.json").write_bytes(_stale_record(pid))
        roots.append(str(root))
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may run Ray's threads
    start, decided, queue = ctx.Barrier(CONTENDERS), ctx.Barrier(CONTENDERS), ctx.Queue()
    procs = [ctx.Process(target=contend_into, args=(queue, i, roots, start, decided)) for i in range(CONTENDERS)]
    for proc in procs:
        proc.start()
    try:
        outcomes = [o for _, o in sorted(queue.get(timeout=120) for _ in procs)]
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    holders = [sum(o[trial] for o in outcomes) for trial in range(TRIALS)]
    assert holders == [1] * TRIALS, f"trials with 2+ holders: {sum(h > 1 for h in holders)}, with none: " \
                                    f"{holders.count(0)}"
    for root in roots:  # every winner released its lock
        assert not os.path.exists(os.path.join(root, "_lock.json"))


@pytest.fixture(scope="module")
def serial_s3(tmp_path_factory):
    """A moto S3 server on loopback that handles one request at a time, as S3 applies a conditional PUT atomically
    (moto's threaded server checks If-Match and writes in two steps, so it could let two conditional PUTs win)."""
    pytest.importorskip("moto.server", reason="needs moto[server] (pip install -e '.[test]')")
    s3fs = pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    from tests.test_s3 import _DUMMY_ENV, _UNSET_ENV

    with pytest.MonkeyPatch.context() as mp:
        for name, value in _DUMMY_ENV.items():
            mp.setenv(name, value)
        for name in _UNSET_ENV:
            mp.delenv(name, raising=False)
        nowhere = str(tmp_path_factory.mktemp("aws") / "none")
        mp.setenv("AWS_CONFIG_FILE", nowhere)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", nowhere)
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        mp.setenv("no_proxy", "127.0.0.1,localhost")
        server = make_server("127.0.0.1", 0, DomainDispatcherApplication(create_backend_app), threaded=False)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="locks")
            s3fs.S3FileSystem.clear_instance_cache()
            yield {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
        finally:
            server.shutdown()
            thread.join()
            s3fs.S3FileSystem.clear_instance_cache()


def test_concurrent_s3_takeovers_have_exactly_one_winner(serial_s3):
    import s3fs

    fs = s3fs.S3FileSystem(**serial_s3)
    pid = _dead_pid()
    roots = [f"s3://locks/trial-{trial}" for trial in range(S3_TRIALS)]
    for root in roots:
        fs.pipe_file(f"{root.removeprefix('s3://')}/_lock.json", _stale_record(pid))
    start, decided = threading.Barrier(CONTENDERS), threading.Barrier(CONTENDERS)
    with ThreadPoolExecutor(CONTENDERS) as pool:
        outcomes = list(pool.map(lambda _: contend(roots, start, decided, serial_s3), range(CONTENDERS)))
    holders = [sum(o[trial] for o in outcomes) for trial in range(S3_TRIALS)]
    assert holders == [1] * S3_TRIALS, f"trials with 2+ holders: {sum(h > 1 for h in holders)}, with none: " \
                                    f"{holders.count(0)}"
    assert fs.find("locks") == []  # every winner released its lock
