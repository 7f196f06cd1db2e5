"""``dml-ray tune``: a two-trial sweep on Ray Tune, each trial a run of the same output root; ``compare`` reads them."""
from __future__ import annotations

import pytest
import yaml

from dml_ray.cli import main
from dml_ray.io.run import list_runs, open_run
from pipelines.tune import apply_overrides, parse_grid


def test_parse_grid():
    assert parse_grid(["train.optimizer.lr=1e-4,3e-4", "train.loss.name=triplet"]) == {
        "train.optimizer.lr": [1e-4, 3e-4], "train.loss.name": ["triplet"]}
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_grid(["train.optimizer.lr"])
    assert apply_overrides({"a": {"b": 1}}, {"a.b": 2, "c.d": 3}) == {"a": {"b": 2}, "c": {"d": 3}}


def test_two_trial_sweep_and_compare(ray_session, tmp_path, capsys):
    config = {
        "output_root": str(tmp_path / "out"), "run_id": "sweep",
        "data": {"kind": "synthetic", "synthetic": {"n_classes": 8, "images_per_class": 6, "image_size": 40},
                 "resize": 32, "image_size": 32},
        "model": {"backbone": "tiny_cnn", "embedding_dim": 16},
        "train": {"epochs": 1, "num_workers": 0, "classes_per_batch": 2, "samples_per_class": 2,
                  "steps_per_epoch": 2},
        "embed": {"batch_size": 32, "incremental": False},
        "evaluate": {"query_shards": 1, "nmi": False, "ks": [1, 2]},
        "tracking": {"tensorboard": False},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    rc = main(["tune", "--config", str(path), "--grid", "train.loss.name=multi_similarity,triplet",
               "--max-concurrent", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    root = str(tmp_path / "out")
    sweep = open_run(root, "sweep")
    trials = sweep.manifest["sweep"]["trials"]
    assert sorted(t["overrides"]["train.loss.name"] for t in trials) == ["multi_similarity", "triplet"]
    ids = sorted(t["run_id"] for t in trials)
    assert ids == ["sweep-t00", "sweep-t01"]
    assert set(ids) <= set(list_runs(root))
    for t in trials:  # each trial is a run with its own config and evaluation
        run = open_run(root, t["run_id"])
        assert run.manifest["config"]["train"]["loss"]["name"] == t["overrides"]["train.loss.name"]
        assert run.committed("embeddings") and run.committed("metrics", "evaluate")
    rows = sweep.read("metrics", "tune").to_pylist()
    assert {(r["split"], r["metric"]) for r in rows} == {(i, m) for i in ids for m in ("recall_at_1", "map_at_r")}
    assert all(0 <= r["value"] <= 1 for r in rows)
    assert "sweep-t00" in out and "sweep-t01" in out
    assert main(["compare", "--root", root, "sweep"]) == 0
    table = capsys.readouterr().out
    assert "sweep-t00" in table and "sweep-t01" in table
