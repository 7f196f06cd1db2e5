"""One error taxonomy for the CLI and the jobs (issue 11, items 7, 8, 9): 0 ok, 1 retry, 2 bad config or input,
3 locked, 4 error budget, 130 interrupted; one line each, a traceback only with --verbose."""
from __future__ import annotations

import pickle
import re

import pytest
import torch
import yaml

from dml_ray.cli import main as cli_main
from dml_ray.config import ModelConfig
from dml_ray.io.lock import output_lock
from dml_ray.models.checkpoint import checkpoint_bytes
from dml_ray.models.embedding import build_model
from jobs.entry import stage_main
from jobs.nightly import main as nightly


def _config(tmp_path, **fields) -> str:
    path = tmp_path / "c.yaml"
    doc = {"output_root": str(tmp_path / "out"), "stages": ["data"],
           "data": {"synthetic": {"n_classes": 4, "images_per_class": 2, "image_size": 32}, "resize": 32,
                    "image_size": 32}}
    doc.update(fields)
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err + captured.out, captured.err
    return lines[0]


def test_a_held_lock_is_exit_3_in_one_line(tmp_path, capsys):
    config = _config(tmp_path)
    with output_lock(str(tmp_path / "out"), "other"):
        assert cli_main(["run", "--config", config]) == 3
    assert re.fullmatch(r"dml-ray: locked \(exit 3\): .* is locked by \S+ pid \d+ \(run other\) since .*",
                        _one_error_line(capsys))


def test_an_unwritable_output_root_is_exit_2_in_one_line(tmp_path, capsys):
    config = _config(tmp_path, output_root="/sys/dml_ray_out")  # sysfs refuses mkdir, even to root
    assert cli_main(["run", "--config", config]) == 2
    assert _one_error_line(capsys).startswith("dml-ray: error: [Errno 1] Operation not permitted: '/sys/dml_ray_out")


def test_set_below_a_value_is_exit_2_in_one_line(tmp_path, capsys):
    config = _config(tmp_path, train={"epochs": 3})
    assert cli_main(["run", "--config", config, "--set", "train.epochs.x=1"]) == 2
    assert _one_error_line(capsys) == "dml-ray: error: --set train.epochs.x: train.epochs is a value (3), not a section"


def test_run_ids_are_names_for_every_command(tmp_path, capsys):
    config = _config(tmp_path)
    for argv in (["run", "--config", config, "--run-id", "../../escape"],
                 ["report", "--root", str(tmp_path / "out"), "--run", "../x"],
                 ["compare", "--root", str(tmp_path / "out"), "ok", "../x"]):
        assert cli_main(argv) == 2, argv
        assert "is not a name" in _one_error_line(capsys)
    assert nightly(["--config", config, "--run-id", "../../escape"]) == 2
    assert "config.run_id: Value error, run id '../../escape' is not a name" in capsys.readouterr().out
    assert not (tmp_path / "escape").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", "code"])
def test_a_damaged_checkpoint_is_exit_2_not_retry(tmp_path, capsys, damage):
    model = ModelConfig(backbone="tiny_cnn", embedding_dim=8)
    data = checkpoint_bytes(build_model(model, 32).eval(), model, 32, [])
    ckpt = tmp_path / "model.pt"
    if damage == "truncated":
        ckpt.write_bytes(data[: len(data) // 2])
    else:
        class Payload:
            def __reduce__(self):
                return (print, ("this ran",))
        ckpt.write_bytes(pickle.dumps({"format": 1, "state_dict": Payload()}))
    config = _config(tmp_path, stages=["data", "embed"],
                     model={"backbone": "tiny_cnn", "embedding_dim": 8, "weights": str(ckpt)})
    assert nightly(["--config", config, "--run-id", "n1"]) == 2
    out = capsys.readouterr().out
    assert "this ran" not in out
    line = out.strip().splitlines()[-1]
    want = "not a readable checkpoint" if damage == "truncated" else "refused: the checkpoint carries code"
    assert line.startswith("nightly: bad config or input (exit 2) run_id=n1 ") and f"{ckpt}: {want}" in line, line
    assert not (tmp_path / "out" / "runs").exists()  # refused at start-up, before any stage


def test_ctrl_c_prints_a_summary_line(tmp_path, capsys, monkeypatch):
    import pipelines.run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipelines.run, "run_pipeline", interrupted)
    config = _config(tmp_path)
    assert stage_main("data", ["--config", config, "--run-id", "n1"]) == 130
    assert re.fullmatch(r"data: interrupted \(exit 130\) run_id=n1 seconds=[\d.]+: committed stages are kept; "
                        r"the same command resumes", capsys.readouterr().out.strip().splitlines()[-1])
    assert cli_main(["run", "--config", config]) == 130
    assert _one_error_line(capsys) == ("dml-ray: interrupted (exit 130): committed tables are kept; the same command "
                                       "resumes")


def test_unexpected_failures_are_exit_1_with_the_traceback_only_when_verbose(tmp_path, capsys, monkeypatch):
    import pipelines.run

    def crash(*args, **kwargs):
        raise RuntimeError("the node went away\nsecond line")

    monkeypatch.setattr(pipelines.run, "run_pipeline", crash)
    config = _config(tmp_path)
    assert cli_main(["run", "--config", config]) == 1
    assert _one_error_line(capsys) == ("dml-ray: failed (exit 1): RuntimeError: the node went away second line "
                                       "(--verbose shows the traceback)")
    assert cli_main(["--verbose", "run", "--config", config]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    assert stage_main("data", ["--config", config, "--run-id", "n1"]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert captured.out.strip().splitlines()[-1].endswith("RuntimeError: the node went away second line "
                                                          "(-v shows the traceback)")


def test_the_taxonomy():
    from dml_ray.errors import ErrorBudgetExceeded, LockHeld, exit_code, one_line

    assert exit_code(LockHeld("x")) == 3 and exit_code(ErrorBudgetExceeded("x")) == 4
    assert exit_code(FileNotFoundError("x")) == 2 and exit_code(OSError(30, "Read-only file system")) == 2
    assert exit_code(OSError(5, "Input/output error")) == 1 and exit_code(KeyboardInterrupt()) == 130
    assert one_line(RuntimeError("boom\n\nTraceback (most recent call last):\n  File x\nValueError: deep")) == \
        "RuntimeError: ValueError: deep"
    with pytest.raises(pickle.UnpicklingError):  # CheckpointRefused is still an UnpicklingError for callers
        from dml_ray.models.checkpoint import load_checkpoint

        path = "/tmp/dml-ray-evil-test.pt"
        with open(path, "wb") as f:
            f.write(pickle.dumps({"format": 1, "x": torch.nn.Linear}))
        load_checkpoint(path)


def test_memory_roots_are_refused_with_the_reason(tmp_path, capsys):
    """memory:// lives in one process: Ray's workers never saw the driver's files (the issue's 'No match for
    FieldRef.Name(image_id)'). It is off the default allowed schemes and refused with the reason even when allowed."""
    config = _config(tmp_path)
    assert cli_main(["run", "--config", config, "--set", "output_root=memory://out"]) == 2
    assert _one_error_line(capsys) == ("dml-ray: error: config: Value error, output_root: scheme 'memory' is not in "
                                       "storage.allowed_schemes ['file', 's3']")
    assert cli_main(["run", "--config", config, "--set", "data.root=memory://data",
                     "--set", "storage.allowed_schemes=[file, memory]"]) == 2
    assert _one_error_line(capsys) == ("dml-ray: error: config: Value error, data.root: memory:// lives inside one "
                                       "process and Ray's workers cannot see it; use a local path or s3://")


def test_explain_checks_the_allowed_schemes(tmp_path, capsys):
    out = tmp_path / "fig.png"
    argv = ["explain", "--checkpoint", "http://127.0.0.1:9/model.pt", "--query", str(tmp_path / "a.jpg"),
            "--reference", str(tmp_path / "b.jpg"), "--out", str(out)]
    assert cli_main(argv) == 2
    assert _one_error_line(capsys) == ("dml-ray: error: --checkpoint: scheme 'http' is not in "
                                       "storage.allowed_schemes ['file', 's3']")
    assert not out.exists()
