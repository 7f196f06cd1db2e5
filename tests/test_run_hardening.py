"""Run-level fixes of issue 11 on the session's Ray instance: relative roots, P x K at start-up, in-process training,
staging leftovers, ``latest`` only forward, the package's git sha, the MPN stage's message, an unwritable $HOME."""
from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest
import torch

import dml_ray
from dml_ray.config import ConfigError, ModelConfig
from dml_ray.data.readers import read_images
from dml_ray.data.synthetic import generate_synthetic
from dml_ray.io.tables import latest_run, staging_uri, table_uri, write_table
from dml_ray.models.checkpoint import checkpoint_bytes, load_checkpoint, save_checkpoint
from dml_ray.models.embedding import build_model
from pipelines.run import run_pipeline
from pipelines.train import run_train
from tests.conftest import demo_like_config

SMALL = {"data.synthetic": {"n_classes": 4, "images_per_class": 4, "image_size": 32, "seed": 0},
         "data.resize": 32, "data.image_size": 32, "train.classes_per_batch": 2, "train.samples_per_class": 2}


def _config(root: str, **overrides):
    return demo_like_config(root, **{**SMALL, **overrides})


def test_relative_local_paths_are_resolved_once_in_the_driver(ray_session, tmp_path, monkeypatch):
    from dml_ray.config import resolve_local_paths

    monkeypatch.chdir(tmp_path)
    cfg = _config("rel_out", stages=["data"], **{"data.root": "rel_data", "model.weights": "ckpt/model.pt"})
    resolved = resolve_local_paths(cfg)
    assert (resolved.output_root, resolved.data.root, resolved.model.weights) == \
        (str(tmp_path / "rel_out"), str(tmp_path / "rel_data"), str(tmp_path / "ckpt" / "model.pt"))
    assert resolve_local_paths(_config("s3://b/out")).output_root == "s3://b/out"
    summary = run_pipeline(_config("rel_out", stages=["data"]))
    manifest = json.loads((tmp_path / "rel_out" / "runs" / "t" / "manifest.json").read_text())
    assert manifest["config"]["output_root"] == str(tmp_path / "rel_out") == summary.run_uri.rsplit("/runs/", 1)[0]


def test_a_batch_wider_than_the_train_split_fails_at_start_up(ray_session, tmp_path, capsys):
    from jobs.entry import stage_main

    cfg = _config(str(tmp_path / "out"), **{"train.classes_per_batch": 3})  # the train split has 4 // 2 = 2 classes
    with pytest.raises(ConfigError, match=r"^train.classes_per_batch: 3 classes per batch x 2 worker\(s\) = 6 distinct "
                                          r"classes per step, but the train split has 2; lower"):
        run_pipeline(cfg)
    assert not (tmp_path / "out" / "runs").exists()  # nothing ran: checked before the data stage
    # a dataset read from disk: the train stage checks the committed images table in the driver, before Ray Train
    data = str(tmp_path / "data")
    generate_synthetic(data, 4, 2, 32, seed=0)
    images = table_uri(cfg.output_root, "t", "images")
    write_table(read_images("cub", data), images, staging_uri(cfg.output_root, "t", "images"))
    with pytest.raises(ConfigError, match="but the train split has 2"):
        run_train(images, cfg)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"output_root": cfg.output_root, "data": {"kind": "cub", "root": data, "resize": 32,
                                  "image_size": 32}, "train": {"classes_per_batch": 3, "num_workers": 2}}))
    assert stage_main("train", ["--config", str(config), "--run-id", "t"]) == 2
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("train: bad config or input (exit 2) run_id=t ")
    assert "3 classes per batch x 2 worker(s) = 6" in line


def test_in_process_training_keeps_its_checkpoint(ray_session, tmp_path):
    cfg = _config(str(tmp_path), run_id="inproc", **{"train.num_workers": 0, "train.epochs": 1,
                                                     "train.steps_per_epoch": 1})
    data = str(tmp_path / "data")
    generate_synthetic(data, 4, 4, 32, seed=0)
    images = table_uri(cfg.output_root, cfg.run_id, "images")
    write_table(read_images("cub", data), images, staging_uri(cfg.output_root, cfg.run_id, "images"))
    result = run_train(images, cfg)
    assert [h["epoch"] for h in result.history] == [0]
    assert load_checkpoint(result.checkpoint_uri).model_config.backbone == cfg.model.backbone


def test_staging_leftovers_are_removed_under_the_lock(ray_session, tmp_path):
    out = tmp_path / "out"
    leftover = out / "_staging" / "crashed-run" / "embeddings-0123456789ab"
    leftover.mkdir(parents=True)
    (leftover / "part-0.parquet").write_bytes(b"half written")
    run_pipeline(_config(str(out), stages=["data"]))
    assert not (out / "_staging" / "crashed-run").exists()
    assert not [p for p in (out / "_staging").rglob("*") if p.is_file()]


def test_latest_moves_only_forward_and_not_when_nothing_ran(ray_session, tmp_path):
    from dml_ray.io.tables import advance_latest

    out = str(tmp_path / "out")
    assert run_pipeline(_config(out, run_id="night-1", stages=["data"])).latest
    assert run_pipeline(_config(out, run_id="night-2", stages=["data"])).latest
    pointer = Path(out, "latest")
    before = pointer.read_bytes()
    again = run_pipeline(_config(out, run_id="night-1", stages=["data"]))  # nothing to run
    assert again.ran == [] and not again.latest and latest_run(out) == "night-2" and pointer.read_bytes() == before
    # an older run that did run something (a stage added to it) does not pull latest back either
    write_table(pa.table({"a": [1]}), table_uri(out, "night-1", "extra"), staging_uri(out, "night-1", "extra"))
    assert not advance_latest(out, "night-1", ran=True) and latest_run(out) == "night-2"
    assert run_pipeline(_config(out, run_id="night-3", stages=["data"])).latest and latest_run(out) == "night-3"


def test_git_sha_is_the_packages_not_the_working_directorys(tmp_path, monkeypatch):
    from pipelines.run import _git_sha

    here = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(dml_ray.__file__))
    other = tmp_path / "elsewhere"
    other.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], ["git", "commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(cmd, cwd=other, check=True, env=env)
    theirs = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=other).stdout.strip()
    monkeypatch.chdir(other)
    sha = _git_sha()
    assert sha != theirs
    assert sha == (here.stdout.strip() if here.returncode == 0 else None)


def test_a_model_without_mpn_says_there_is_nothing_to_refine(ray_session, tmp_path, caplog):
    model = ModelConfig(backbone="tiny_cnn", embedding_dim=8)
    ckpt = str(tmp_path / "model.pt")
    torch.manual_seed(0)
    save_checkpoint(ckpt, checkpoint_bytes(build_model(model, 32).eval(), model, 32, []))
    cfg = _config(str(tmp_path / "out"), stages=["data", "mpn"],
                  **{"model.backbone": "tiny_cnn", "model.embedding_dim": 8, "model.weights": ckpt})
    caplog.set_level(logging.INFO, logger="pipelines.run")
    summary = run_pipeline(cfg)
    assert summary.skipped == ["mpn"]
    messages = [r.getMessage() for r in caplog.records if r.name == "pipelines.run"]
    assert "stage mpn: the model has no message passing network, nothing to refine" in messages
    assert not [m for m in messages if m.startswith("stage mpn: already committed")]


def test_an_unwritable_home_gets_a_process_token_for_the_private_ray_instance(tmp_path, monkeypatch):
    """Ray 2.60 writes ~/.ray/auth_token on ray.init(); an unwritable $HOME was a Ray traceback. (Checked by hand
    end to end: HOME=/etc/passwd/nohome python -m jobs.data ... runs.)"""
    from pipelines.ray_env import token_for_unwritable_home

    monkeypatch.setenv("HOME", "/etc/passwd/nohome")  # below a file: not creatable, even by root
    environ: dict = {}
    assert token_for_unwritable_home(environ) and len(environ["RAY_AUTH_TOKEN"]) == 32
    monkeypatch.setenv("HOME", str(tmp_path))
    environ = {}
    assert not token_for_unwritable_home(environ) and environ == {}
    assert not token_for_unwritable_home({"RAY_AUTH_TOKEN": "given"})


def test_the_empty_staging_folders_of_finished_runs_are_no_leftovers(tmp_path, caplog):
    from dml_ray.io.tables import clean_staging

    out = tmp_path / "out"
    (out / "_staging" / "finished-run").mkdir(parents=True)
    crashed = out / "_staging" / "crashed-run" / "embeddings-0123456789ab"
    crashed.mkdir(parents=True)
    (crashed / "part-0.parquet").write_bytes(b"half written")
    with caplog.at_level(logging.WARNING, logger="dml_ray.io.tables"):
        assert clean_staging(str(out)) == 1
    assert "removing 1 staging leftovers" in caplog.text
    assert not (out / "_staging").exists()
    caplog.clear()
    (out / "_staging" / "finished-run").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="dml_ray.io.tables"):
        assert clean_staging(str(out)) == 0
    assert "leftovers" not in caplog.text
