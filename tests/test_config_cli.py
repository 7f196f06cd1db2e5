"""Configuration errors and the CLI's front door."""
from __future__ import annotations

import pytest

from dml_ray.cli import _demo_config_path, main
from dml_ray.config import ConfigError, RunConfig, load_config, parse_config


def test_demo_config_is_valid():
    cfg = load_config(_demo_config_path())
    assert isinstance(cfg, RunConfig) and cfg.data.kind == "synthetic"


@pytest.mark.parametrize("data,message", [
    ({"train": {"epochz": 3}}, "config.train.epochz: unknown key"),
    ({"train": {"loss": {"name": "multisimilarity"}}}, "config.train.loss.name: Input should be 'multi_similarity'"),
    ({"data": {"image_size": 300, "resize": 256}}, "config.data: Value error, image_size 300 is larger than resize 256"),
    ({"embed": {"batch_size": 0}}, "config.embed.batch_size: Input should be greater than or equal to 1"),
    ({"model": {"embedding_dim": None, "bn": True}}, "config.model: Value error, hidden_dims and bn need an embedding_dim"),
])
def test_bad_config_gives_one_line_naming_the_field(data, message):
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    text = str(err.value)
    assert text.startswith(message) and "\n" not in text


def test_yaml_errors_and_overrides(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("train: {epochs: 2}\n")
    assert load_config(good, {"train.epochs": 7, "model.backbone": "resnet18"}).train.epochs == 7


def test_cli_reports_bad_config_in_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {pooling: avg}\n")
    assert main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dml-ray: error: config.model.pooling: Input should be 'gap', 'gmp' or 'flatten'")
    assert len(err.splitlines()) == 1


def test_cli_query_without_runs_is_a_clear_error(tmp_path, capsys):
    assert main(["query", "--root", str(tmp_path), "SELECT 1"]) == 2
    assert "no runs yet" in capsys.readouterr().err


def test_cli_synth_writes_cub_layout(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "d"), "--classes", "3", "--per-class", "2", "--size", "48"]) == 0
    assert (tmp_path / "d" / "images.txt").read_text().count("\n") == 6

