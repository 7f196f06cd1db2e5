"""The console (issue 15 item 5): stage lines and progress on the console, Ray's lines in the run's log file."""
from __future__ import annotations

import io
import json
import logging
import os
import pty
import re
import select
import subprocess
import sys
import time

import yaml

from dml_ray import console
from dml_ray.console import MARKER, ConsoleFilter, Progress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _record(name: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, "message", None, None)


def test_console_filter_shows_our_lines_and_hides_ray_lines_unless_verbose():
    quiet, verbose = ConsoleFilter(False), ConsoleFilter(True)
    assert quiet.filter(_record("pipelines.run")) and quiet.filter(_record("jobs"))
    assert not quiet.filter(_record("dml_ray.io.tables")) and quiet.filter(_record("dml_ray.io.tables", logging.WARNING))
    assert not quiet.filter(_record("ray.data._internal.execution.streaming_executor"))
    assert not quiet.filter(_record("ray.worker")) and not quiet.filter(_record("faiss.loader"))
    assert not quiet.filter(_record("ray.train", logging.WARNING))
    assert quiet.filter(_record("ray.train", logging.ERROR))
    assert not quiet.filter(_record("pipelines.run", logging.DEBUG))
    assert all(verbose.filter(_record(n)) for n in ("ray.worker", "faiss.loader", "ray.data"))


def test_progress_on_a_terminal_redraws_one_line_with_rate_and_eta():
    stream = io.StringIO()
    progress = Progress(stream, tty=True, interval=0.0)
    progress.expect("embed", 40)
    progress.expect("embed", 60)
    progress.advance("embed", 25)
    progress.advance("embed", 25)
    text = stream.getvalue()
    assert "\n" not in text and text.count("\r\033[K") == 2
    assert re.search(r"embed: 50/100 rows \(50%\), [\d.]+ rows/s, ETA \d+ s$", text)
    progress.finish()
    assert stream.getvalue().endswith("\r\033[K") and not progress.bars
    progress.advance("embed", 5)  # a late message of the finished stage draws nothing
    assert not progress.bars


def test_progress_elsewhere_is_a_log_line_at_most_every_interval(caplog):
    progress = Progress(io.StringIO(), tty=False, interval=3600.0)
    with caplog.at_level(logging.INFO, logger="dml_ray.progress"):
        progress.advance("evaluate", at=1, total=10)  # younger than the interval: no line
        for i in range(2, 11):  # the sender's pass began two intervals ago: one line, then none for an interval
            progress.advance("train", at=i, total=10, label="epoch 1/2", unit="steps", elapsed=7200.0)
        progress.advance("train", at=1, total=10, label="epoch 2/2", unit="steps", elapsed=7200.0)
    lines = [r.getMessage() for r in caplog.records if r.name == "dml_ray.progress"]
    assert len(lines) == 1 and lines[0].startswith("train: epoch 1/2 2/10 steps (20%), 0.0 steps/s, ETA")
    assert progress.bars["train"].label == "epoch 2/2" and progress.bars["train"].done == 1
    progress.advance("train", at=4, total=10, label="epoch 2/2", unit="steps", elapsed=2.0)
    assert progress.bars["train"].line().startswith("train: epoch 2/2 4/10 steps (40%), 2.0 steps/s, ETA 3 s")
    assert not progress.stream.getvalue()  # nothing drawn on a stream that is not a terminal
    progress.finish()
    with caplog.at_level(logging.INFO, logger="dml_ray.progress"):
        progress.advance("evaluate", at=3, total=4, elapsed=7200.0)
    assert caplog.records[-1].getMessage().startswith("evaluate: 3/4 rows (75%)")


def test_worker_lines_go_to_the_log_and_progress_messages_to_the_progress_line(caplog, monkeypatch):
    progress = Progress(io.StringIO(), tty=True, interval=0.0)
    monkeypatch.setattr(console._state, "progress", progress)
    progress.expect("embed", 10)
    message = MARKER + json.dumps({"stage": "embed", "rows": 4, "unit": "rows"})
    monkeypatch.setattr(logging.getLogger("ray"), "propagate", True)  # as quiet_ray_loggers leaves it
    with caplog.at_level(logging.INFO, logger="ray.worker"):
        console._worker_lines({"pid": 7, "actor_name": "MapWorker(HashedEmbedder)", "is_err": False,
                               "lines": ["Requesting resources: {'CPU': 1} * 2", message]})
    worker = [r.getMessage() for r in caplog.records if r.name == "ray.worker"]
    assert worker == ["(MapWorker(HashedEmbedder) pid=7) Requesting resources: {'CPU': 1} * 2"]
    assert progress.bars["embed"].done == 4


def test_counted_reports_the_last_position_of_each_pass(monkeypatch):
    calls = []
    monkeypatch.setattr(console, "advance", lambda stage, **kw: calls.append((stage, kw)))
    assert list(console.counted([10, 20, 30], "train", label="epoch 1/1", every_s=3600.0)) == [10, 20, 30]
    assert len(calls) == 1 and calls[0][1].pop("elapsed") >= 0
    assert calls == [("train", {"at": 3, "total": 3, "label": "epoch 1/1", "unit": "steps"})]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli_on_a_terminal(args: list[str], cwd: str, timeout_s: float = 900) -> tuple[int, str]:
    """Run the CLI with stdout and stderr on a pseudo-terminal (as a user at a shell sees it): exit code, output."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "dml_ray.cli", *args], cwd=cwd, env=_env(),
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    data = b""
                chunks.append(data)
                if not data and proc.poll() is not None:
                    break
            elif proc.poll() is not None:
                break
        rc = proc.wait(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return rc, b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


def test_demo_console_is_short_and_the_run_log_holds_ray_lines(tmp_path):
    """A demo-like run through the CLI on a terminal: at most ~40 console lines, one per stage start and end, the
    progress line redrawn in place (training steps, embedding rows); Ray's and Train's lines in
    runs/<id>/logs/run.log only; ``--verbose`` (not a terminal) shows them on the console."""
    from tests.conftest import demo_like_config

    tiny = {"data.synthetic.n_classes": 8, "data.synthetic.images_per_class": 6, "data.synthetic.image_size": 40,
            "data.resize": 32, "data.image_size": 32, "model.embedding_dim": 16, "train.epochs": 2,
            "train.classes_per_batch": 2, "train.samples_per_class": 2, "knn.k1": 5, "knn.batch_size": 6,
            "embed.batch_size": 16, "explain.methods": ["gradcam"], "explain.splits": ["test"],
            "localize.threshold_interval": 0.1}
    cfg = demo_like_config(str(tmp_path / "out"), run_id="quiet", **tiny)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude={"storage": {"options"}})))

    rc, text = _cli_on_a_terminal(["run", "--config", str(config)], str(tmp_path))
    assert rc == 0, text[-3000:]
    lines = text.split("\n")
    assert len(lines) <= 40, text
    for stage in cfg.stages:
        assert re.search(rf"stage {stage}: (running|.*skipped|.*nothing to refine)", text), stage
        assert stage in ("mpn",) or re.search(rf"stage {stage}: done in", text), stage
    frames = [f for line in lines for f in line.split("\r\033[K")[1:] if f]  # progress redrawn in place
    assert any(re.match(r"train: epoch [12]/2 \d+/\d+ steps", f) for f in frames), frames
    assert any(re.match(r"embed: \d+/48 rows \(\d+%\), [\d.]+ rows/s, ETA", f) for f in frames), frames
    for internal in ("faiss.loader", "TrainController", "RayTrainWorker", "pid=", "Execution plan", "ray.data"):
        assert internal not in text, internal
    log_text = (tmp_path / "out" / "runs" / "quiet" / "logs" / "run.log").read_text()
    assert "faiss.loader" in log_text and "ray.worker: (RayTrainWorker pid=" in log_text
    assert "TrainController" in log_text and "stage localize: done" in log_text

    # --verbose: a second run embeds with the first run's model; Ray Data's driver lines reach the console
    model = tmp_path / "out" / "runs" / "quiet" / "model" / "model.pt"
    verbose = subprocess.run([sys.executable, "-m", "dml_ray.cli", "--verbose", "run", "--config", str(config),
                              "--run-id", "loud", "--stages", "data,embed", "--set", f"model.weights={model}"],
                             cwd=str(tmp_path), env=_env(), capture_output=True, text=True, timeout=900)
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "faiss.loader" in verbose.stderr and " ray.data" in verbose.stderr
    assert "ray.data" in (tmp_path / "out" / "runs" / "loud" / "logs" / "run.log").read_text()


def test_the_mpn_metrics_are_printed_beside_the_backbones(capsys):
    import pyarrow as pa

    from dml_ray.cli import _print_metrics

    backbone = [{"split": s, "metric": m, "k": k, "value": v} for s in ("train", "test")
                for m, k, v in (("recall", 1, 0.5), ("recall", 2, 0.75), ("map_at_r", None, 0.25))]
    refined = [{"split": "test", "metric": "recall", "k": 1, "value": 0.625},
               {"split": "test", "metric": "map_at_r", "k": None, "value": 0.375}]
    _print_metrics(type("Summary", (), {"metrics": pa.Table.from_pylist(backbone)}), pa.Table.from_pylist(refined))
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["metric", "k", "test", "test+mpn", "train"]
    assert lines[1].split() == ["recall", "1", "0.5000", "0.6250", "0.5000"]
    assert lines[2].split() == ["recall", "2", "0.7500", "-", "0.7500"]
    assert lines[3].split() == ["map_at_r", "0.2500", "0.3750", "0.2500"]


def test_counts_are_printed_as_integers(capsys):
    import pyarrow as pa

    from dml_ray.cli import _print_metrics

    rows = [{"split": "test", "metric": m, "k": k, "value": v}
            for m, k, v in (("recall", 1, 0.5), ("n_queries", None, 192.0), ("map_at_r_excluded_queries", None, 0.0))]
    _print_metrics(type("Summary", (), {"metrics": pa.Table.from_pylist(rows)}))
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split() for line in lines[1:]] == [["recall", "1", "0.5000"], ["n_queries", "192"],
                                                    ["map_at_r_excluded_queries", "0"]]


def test_the_run_log_is_appended_only_when_the_run_changed(tmp_path, monkeypatch):
    from dml_ray.io.run import open_run

    run = open_run(str(tmp_path / "out"), "r", create=True)
    buffer = console._Buffer()
    monkeypatch.setattr(console._state, "buffer", buffer)
    monkeypatch.setattr(console._state, "verbose", False)
    log = logging.getLogger("ray.worker")
    monkeypatch.setattr(log, "level", logging.INFO)
    monkeypatch.setattr(logging.getLogger("ray"), "propagate", True)  # as quiet_ray_loggers leaves it
    logging.getLogger().addHandler(buffer)
    log.info("a rerun that changes nothing")
    with console.run_log(run) as uri:
        log.info("nothing ran")
    assert not run.exists(uri)  # re-running a finished run changes no file of it
    log.info("before the run")  # buffered, written first
    with console.run_log(run):
        log.info("a stage ran")
        run.update_manifest(stages={"data": {"rows": 1}})
    logging.getLogger().removeHandler(buffer)
    text = run.read_bytes(uri).decode()
    assert text.index("before the run") < text.index("INFO ray.worker: a stage ran")
    assert "nothing" not in text
