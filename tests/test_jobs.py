"""Jobs (issue 7): a job module per stage, the nightly job end to end (incremental, idempotent, locked), a driver
killed mid-run, exit codes and summary lines."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from dml_ray.cli import main as cli_main
from dml_ray.config import load_config
from dml_ray.io.lock import lock_uri, output_lock, read_lock
from dml_ray.io.tables import is_committed, latest_run, read_table, table_uri
from jobs.entry import utc_date
from jobs.nightly import check_nightly
from jobs.nightly import main as nightly
from pipelines.run import STAGE_NAMES as STAGES
from tests.nightly_setup import write_nightly_setup
from tests.processes import kill_processes_mentioning, pids_mentioning

REPO = Path(__file__).resolve().parents[1]
STAGES_RUN = "data,embed,evaluate,knn"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("nightly")
    return write_nightly_setup(root / "nightly.yaml", str(root / "data"), str(root / "out"))


@pytest.fixture(scope="module")
def first_night(ray_session, setup):
    """The first nightly run, with the default run id; its exit code, summary line and run id."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = nightly(["--config", setup["config"]])
    return code, out.getvalue().strip().splitlines()[-1], latest_run(setup["out"])


def _last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def _vectors(out: str, run: str, table: str = "embeddings") -> dict[str, np.ndarray]:
    t = read_table(table_uri(out, run, table))
    column = "embedding" if table == "embeddings" else "gap_feature"
    return dict(zip(t.column("image_id").to_pylist(), np.stack(t.column(column).to_numpy(zero_copy_only=False))))


def _digests(root: str) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in Path(root).rglob("*") if p.is_file()}


def _ids(out: str, run: str, table: str) -> list[str]:
    return read_table(table_uri(out, run, table), columns=["image_id"]).column("image_id").to_pylist()


def test_nightly_job_embeds_everything_and_lists_the_corrupt_image(first_night, setup):
    code, line, run = first_night
    assert code == 0, line
    assert run == utc_date() and re.fullmatch(r"\d{4}-\d{2}-\d{2}", run)
    assert line.startswith(f"nightly: ok run_id={run} ran={STAGES_RUN} skipped=- embedded=49 reused=0 errors=1 "
                           f"latest=moved seconds="), line
    out = setup["out"]
    assert [e["image_id"] for e in read_table(table_uri(out, run, "errors")).to_pylist()] == [setup["corrupt"]]
    ids = _ids(out, run, "embeddings")
    assert len(ids) == len(set(ids)) == setup["images"] - 1 and setup["corrupt"] not in ids
    assert sorted(_ids(out, run, "feature_maps")) == sorted(ids)
    keys = read_table(table_uri(out, run, "embedding_keys")).to_pylist()
    assert sorted(k["image_id"] for k in keys) == sorted(ids)
    assert {k["embedded_run_id"] for k in keys} == {run} and all(len(k["content_hash"]) == 64 for k in keys)
    assert not os.path.exists(lock_uri(out))


def test_rerun_of_a_finished_night_changes_nothing(first_night, setup, capsys):
    _, _, run = first_night
    before = _digests(setup["out"])
    assert nightly(["--config", setup["config"], "--run-id", run]) == 0
    assert f"run_id={run} ran=- skipped={STAGES_RUN} latest=unchanged" in _last_line(capsys)  # nothing ran
    assert _digests(setup["out"]) == before


def test_next_night_embeds_only_the_changed_image(first_night, setup, capsys):
    _, _, first = first_night
    out, uris = setup["out"], setup["uris"]
    changed, twin = (u.split(setup["data"] + "/", 1)[1] for u in (uris[0], uris[20]))
    Path(uris[0]).write_bytes(Path(uris[20]).read_bytes())
    assert nightly(["--config", setup["config"], "--run-id", "night-2"]) == 0
    assert f"run_id=night-2 ran={STAGES_RUN} skipped=- embedded=1 reused=48 errors=1" in _last_line(capsys)
    keys = {k["image_id"]: k["embedded_run_id"]
            for k in read_table(table_uri(out, "night-2", "embedding_keys")).to_pylist()}
    assert [i for i, r in keys.items() if r == "night-2"] == [changed]
    assert set(keys.values()) == {first, "night-2"} and len(keys) == 49
    old, new = _vectors(out, first), _vectors(out, "night-2")
    assert set(old) == set(new)
    for image_id in set(old) - {changed}:
        assert np.array_equal(old[image_id], new[image_id]), image_id  # copied, not recomputed
    # recomputed from its new bytes (the random-init model embeds every image nearly alike: compare distances)
    to_twin, to_old = (float(np.abs(new[changed] - old[i]).max()) for i in (twin, changed))
    assert to_twin * 100 < to_old, (to_twin, to_old)
    maps = read_table(table_uri(out, "night-2", "feature_maps"), columns=["run_id", "image_id"])
    assert set(maps.column("run_id").to_pylist()) == {"night-2"} and sorted(maps.column("image_id").to_pylist()) == \
        sorted(new)
    assert latest_run(out) == "night-2"

    # across runs and on the latest run: the README's queries
    assert cli_main(["query", "--root", out, "--all-runs", "--format", "csv",
                     "SELECT run_id, count(*) AS n FROM embeddings GROUP BY run_id ORDER BY run_id"]) == 0
    assert capsys.readouterr().out.split() == ["run_id,n", f"{first},49", "night-2,49"]
    sql = ("SELECT e.image_id, array_cosine_similarity(e.embedding::FLOAT[16], q.embedding::FLOAT[16]) AS similarity "
           f"FROM embeddings e, (SELECT embedding FROM embeddings WHERE image_id = '{changed}') q "
           "ORDER BY similarity DESC")
    assert cli_main(["query", "--config", setup["config"], "--format", "csv", sql]) == 0
    rows = dict(r.rsplit(",", 1) for r in capsys.readouterr().out.split()[1:])
    assert len(rows) == 49 and abs(float(rows[twin]) - 1.0) < 1e-5
    other = next(i for i in new if i not in (changed, twin))
    want = float(new[changed] @ new[other] / np.linalg.norm(new[changed]) / np.linalg.norm(new[other]))
    assert abs(float(rows[other]) - want) < 1e-5


def test_above_the_error_budget_the_job_exits_4_and_commits_nothing(first_night, setup, capsys):
    out, latest = setup["out"], latest_run(setup["out"])
    args = ["--config", setup["config"], "--run-id", "strict", "--set", "embed.max_error_fraction=0.0"]
    assert nightly(args) == 4
    assert re.fullmatch(r"nightly: error budget exceeded \(exit 4\) run_id=strict seconds=[\d.]+: embed: 1 of 50 "
                        r"images failed \(2\.0%\), above embed\.max_error_fraction=0\.0; nothing committed",
                        _last_line(capsys))
    for table, part in (("embeddings", None), ("feature_maps", None), ("embedding_keys", None), ("errors", "embed")):
        assert not is_committed(table_uri(out, "strict", table, part)), table
    assert read_lock(out) is None and latest_run(out) == latest  # released on failure; latest untouched


def test_a_second_run_while_the_lock_is_held_is_refused(setup, capsys):
    out = setup["out"]
    with output_lock(out, "someone-else"):
        assert nightly(["--config", setup["config"], "--run-id", "night-3"]) == 3
        line = _last_line(capsys)
        assert re.fullmatch(rf"nightly: locked \(exit 3\) run_id=night-3 seconds=[\d.]+: {re.escape(out)} is locked by "
                            rf"\S+@{re.escape(socket.gethostname())} pid {os.getpid()} \(run someone-else\) since \S+; "
                            rf"another run is writing there\. If it is gone, clear the lock: dml-ray unlock --root "
                            rf"{re.escape(out)}", line), line
        assert read_lock(out)["run_id"] == "someone-else"
    assert read_lock(out) is None and not os.path.exists(f"{out}/runs/night-3")
    # a lock left by a dead run on another host is not guessed stale: refused until cleared by hand
    Path(lock_uri(out)).write_text(json.dumps({"owner": "cron", "host": "elsewhere", "pid": 1, "run_id": "old"}))
    assert nightly(["--config", setup["config"], "--run-id", "night-3"]) == 3
    assert "locked by cron@elsewhere pid 1 (run old)" in _last_line(capsys)
    assert cli_main(["unlock", "--config", setup["config"]]) == 0
    assert capsys.readouterr().out.strip() == f"{out}: removed the lock of cron@elsewhere pid 1 (run old) since ?"
    assert read_lock(out) is None


def test_every_stage_has_a_job_and_bad_input_exits_2(ray_session, setup, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("embed: {batchsize: 3}\n")
    for name in STAGES:
        assert (REPO / "jobs" / f"{name}.py").is_file(), name
        monkeypatch.setattr(sys, "argv", [f"jobs/{name}.py", "--config", str(bad)])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_module(f"jobs.{name}", run_name="__main__")
        assert exit_.value.code == 2, name
        assert re.fullmatch(rf"{name}: bad config or input \(exit 2\) run_id=\? seconds=[\d.]+: "
                            r"config\.embed\.batchsize: unknown key", _last_line(capsys))
    config = ["--config", setup["config"]]
    assert nightly([*config, "--set", "output_root=http://example.invalid/out"]) == 2
    assert ("config: Value error, output_root: scheme 'http' is not in storage.allowed_schemes "
            "['file', 's3']") in _last_line(capsys)
    assert nightly([*config, "--set", "model.weights=none"]) == 2
    assert "model.weights: the nightly run embeds with a fixed checkpoint" in _last_line(capsys)

    # one stage, for real: it runs alone and does not move `latest` to a run whose other stages are missing
    latest = latest_run(setup["out"])
    monkeypatch.setattr(sys, "argv", ["jobs/data.py", *config, "--run-id", "stage-job"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("jobs.data", run_name="__main__")
    assert exit_.value.code == 0
    assert "data: ok run_id=stage-job ran=data skipped=- latest=unchanged" in _last_line(capsys)
    assert is_committed(table_uri(setup["out"], "stage-job", "images"))
    assert not is_committed(table_uri(setup["out"], "stage-job", "embeddings"))
    assert latest_run(setup["out"]) == latest


def test_shipped_job_configs_are_valid():
    configs = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
    assert {c.name for c in configs} >= {"demo.yaml", "nightly.yaml"}
    for path in configs:
        load_config(path)
    nightly_cfg = load_config(REPO / "jobs" / "configs" / "nightly.yaml")
    check_nightly(nightly_cfg)
    assert "train" not in nightly_cfg.stages and nightly_cfg.embed.incremental


def test_driver_killed_mid_run_resumes_without_duplicates(ray_session, setup, tmp_path):
    out = str(tmp_path / "out")
    # embed on Ray Data (not the in-process fast path, which would finish before the kill)
    args = ["--config", setup["config"], "--run-id", "crash", "--set", f"output_root={out}",
            "--set", "embed.in_process_below=0"]
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    with open(tmp_path / "driver.log", "wb") as log:
        driver = subprocess.Popen([sys.executable, "-m", "jobs.nightly", *args], cwd=REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not is_committed(table_uri(out, "crash", "images")):
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()
            assert time.monotonic() < deadline, "the data stage never committed"
            time.sleep(0.2)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        kill_processes_mentioning(ray_tmp)
    assert not pids_mentioning(ray_tmp)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not is_committed(table_uri(out, "crash", "embeddings")), "killed too late: embed had finished"
    assert read_lock(out)["pid"] == driver.pid  # left behind by the killed driver, stale: taken over below

    assert nightly(args) == 0
    images = _ids(out, "crash", "images")
    embedded = _ids(out, "crash", "embeddings")
    assert len(images) == len(set(images)) == setup["images"]
    assert len(embedded) == len(set(embedded)) and sorted(embedded + [setup["corrupt"]]) == sorted(images)
    assert _ids(out, "crash", "errors") == [setup["corrupt"]]
    metrics = read_table(table_uri(out, "crash", "metrics")).to_pylist()
    keys = [(m["stage"], m["split"], m["metric"], m["k"]) for m in metrics]
    assert keys and len(keys) == len(set(keys))
    neighbors = _ids(out, "crash", "neighbors")
    assert len(neighbors) == len(set(neighbors)) and set(neighbors) <= set(embedded)
    manifest = json.loads(Path(out, "runs", "crash", "manifest.json").read_text())
    assert set(manifest["stages"]) == set(STAGES_RUN.split(",")) and read_lock(out) is None
