"""Training the way practitioners work (issue 15): zero-shot validation, best-checkpoint selection, early stopping,
mixed precision, TensorBoard / MLflow tracking, configured augmentations.

The training runs are in-process (``train.num_workers: 0``): no Ray cluster, a few seconds each.
"""
from __future__ import annotations

import io
import logging

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from PIL import Image

from dml_ray.config import ConfigError, parse_config
from dml_ray.data.readers import read_images
from dml_ray.data.synthetic import generate_synthetic
from dml_ray.data.transforms import eval_transform, train_transform, upsampling_factor, warn_if_upsampling
from dml_ray.io.run import open_run
from dml_ray.models.checkpoint import load_checkpoint
from dml_ray.models.embedding import build_model
from dml_ray.precision import autocast, ieee_fp32
from dml_ray.validation import ModelSelection, embed_batches, holdout_classes, validation_metrics

N_CLASSES = 12  # CUB layout: classes 1-6 train, 7-12 test


@pytest.fixture(scope="module")
def images_run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("practice"))
    generate_synthetic(f"{root}/synthetic", N_CLASSES, 8, 48, 0)
    run = open_run(root, "r", create=True)
    run.commit("images", read_images("cub", f"{root}/synthetic"))
    return run


def _config(run, **train):
    return parse_config({
        "output_root": run.output_root, "run_id": run.run_id, "data": {"resize": 32, "image_size": 32},
        "model": {"backbone": "tiny_cnn", "embedding_dim": 16},
        "train": {"epochs": 5, "num_workers": 0, "classes_per_batch": 3, "samples_per_class": 2,
                  "steps_per_epoch": 3, **train},
    })


def _labels(run, split):
    images = run.read("images")
    return set(images.filter(pc.equal(images.column("split"), split)).column("label").to_pylist())


# ---- validation split ----
def test_validation_holds_out_training_classes_only(images_run):
    from pipelines.train import _train_split

    train_labels, test_labels = _labels(images_run, "train"), _labels(images_run, "test")
    split = _train_split(images_run.table_uri("images"), None, fraction=0.34, seed=3)
    held = set(split.val_labels)
    assert len(held) == 3  # ceil(0.34 * 6)
    assert held <= train_labels and not held & test_labels
    assert held == holdout_classes(sorted(train_labels), 0.34, seed=3)
    train_uris = set(split.uris)
    assert not train_uris & set(split.val_uris)
    assert len(split.uris) + len(split.val_uris) == 8 * len(train_labels)
    assert len(split.class_names) == len(train_labels) - 3 and sorted(set(split.labels)) == [0, 1, 2]
    with pytest.raises(ValueError, match="fewer than 2"):
        holdout_classes(list(range(4)), 0.75)


def test_model_selection_keeps_best_and_counts_patience():
    sel = ModelSelection("map_at_r", patience=2, min_delta=0.01)
    assert sel.update(0, {"map_at_r": 0.3})
    assert not sel.update(1, {"map_at_r": 0.305})  # within min_delta: no gain
    assert sel.update(2, {"map_at_r": 0.5})
    assert not sel.update(3, {"map_at_r": 0.1}) and not sel.stop
    assert not sel.update(4, {"map_at_r": 0.2}) and sel.stop
    assert (sel.best_epoch, sel.best_value) == (2, 0.5)
    restored = ModelSelection("map_at_r", patience=2)
    restored.load_state_dict(sel.state_dict())
    assert restored.stop and restored.best_epoch == 2


# ---- the loop: best checkpoint, early stopping, trackers ----
SCRIPTED = [0.2, 0.6, 0.5, 0.4, 0.9]  # best at epoch 1; patience 2 stops after epoch 3, before the 0.9


@pytest.fixture(scope="module")
def scripted_run(images_run, tmp_path_factory):
    """An in-process bf16 run whose validation Recall@1 is scripted (the real metrics are kept beside it): the
    last epochs are worse than epoch 1, and patience 2 stops the run after epoch 3."""
    import pipelines.train as train_module

    mlruns = tmp_path_factory.mktemp("mlruns")
    cfg = _config(images_run, precision="bf16",
                  validation={"fraction": 0.34, "patience": 2, "metric": "recall_at_1", "seed": 3})
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"mlflow_uri": f"file:{mlruns}"})})
    seen, real = [], []

    def scripted(embeddings, labels):
        seen.append(set(np.asarray(labels).tolist()))
        real.append(validation_metrics(embeddings, labels))
        return {**real[-1], "recall_at_1": SCRIPTED[len(real) - 1]}

    mp = pytest.MonkeyPatch()
    mp.setattr(train_module, "validation_metrics", scripted)
    try:
        result = train_module.run_train(images_run.table_uri("images"), cfg)
    finally:
        mp.undo()
    return cfg, result, seen, real, str(mlruns)


def test_best_checkpoint_is_kept_and_early_stopping_stops(images_run, scripted_run):
    from pipelines.train import _train_split

    cfg, result, seen, real, _ = scripted_run
    assert result.selected_epoch == 1 and result.stopped_early
    assert [h["epoch"] for h in result.history] == [0, 1, 2, 3]
    assert [h["val_recall_at_1"] for h in result.history] == SCRIPTED[:4]
    assert all(np.isfinite(h["loss"]) for h in result.history)  # bf16 on CPU trains
    # validation saw only held-out training classes, never a test class
    split = _train_split(images_run.table_uri("images"), None, 0.34, 3)
    assert all(s == set(split.val_labels) for s in seen)
    assert not set().union(*seen) & _labels(images_run, "test")
    # the run's model is epoch 1's: re-evaluating it gives the metrics recorded at epoch 1
    loaded = load_checkpoint(result.checkpoint_uri)
    assert loaded.extra["epoch"] == 1
    transform = eval_transform(cfg.data.resize, cfg.data.image_size)
    batches = [(torch.stack([transform(Image.open(u).convert("RGB")) for u in split.val_uris]),
                torch.tensor(split.val_labels))]
    emb, labels = embed_batches(loaded.model, batches, torch.device("cpu"), "bf16")
    again = validation_metrics(emb, labels)
    assert again["map_at_r"] == pytest.approx(real[1]["map_at_r"], abs=1e-6)
    assert again["recall_at_1"] == pytest.approx(real[1]["recall_at_1"], abs=1e-6)


def test_validation_rows_in_metrics(scripted_run):
    from pipelines.train import training_metrics

    _, result, _, real, _ = scripted_run
    rows = training_metrics(result, "r").to_pylist()
    val = {(r["metric"], r["k"]): r["value"] for r in rows if r["split"] == "val"}
    assert [val[("recall_at_1", e)] for e in range(4)] == SCRIPTED[:4]
    assert [val[("map_at_r", e)] for e in range(4)] == pytest.approx([m["map_at_r"] for m in real])
    assert val[("selected_epoch", None)] == 1
    assert {r["metric"] for r in rows if r["split"] == "train"} >= {"loss", "lr", "images_per_s"}
    # the report's training figure gains a validation panel
    from dml_ray.report.plots import run_summary_png

    table = training_metrics(result, "r")
    with_val = Image.open(io.BytesIO(run_summary_png(table, "t")))
    without = Image.open(io.BytesIO(run_summary_png(table.filter(pc.equal(table.column("split"), "train")), "t")))
    assert with_val.width > 1.4 * without.width


def test_tensorboard_scalars_read_back(images_run, scripted_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, result, _, _, _ = scripted_run
    events = EventAccumulator(images_run.fs_path(images_run.path("logs", "tensorboard")))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/images_per_s", "val/recall_at_1", "val/map_at_r"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1, 2, 3]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([h["loss"] for h in result.history])
    assert [e.value for e in events.Scalars("val/recall_at_1")] == pytest.approx(SCRIPTED[:4])
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([1e-4] * 4)


def test_mlflow_scalars_read_back(scripted_run, monkeypatch):
    import mlflow
    cfg, result, _, _, mlruns = scripted_run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.tracking.MlflowClient(tracking_uri=f"file:{mlruns}")
    experiment = client.get_experiment_by_name("dml_ray")
    (mlrun,) = client.search_runs([experiment.experiment_id])
    assert mlrun.info.run_name == cfg.run_id
    assert mlrun.data.params["train.validation.patience"] == "2"
    history = client.get_metric_history(mlrun.info.run_id, "val/recall_at_1")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
        [(e, pytest.approx(v)) for e, v in enumerate(SCRIPTED[:4])]
    losses = client.get_metric_history(mlrun.info.run_id, "train/loss")
    assert sorted(m.value for m in losses) == pytest.approx(sorted(h["loss"] for h in result.history))


# ---- mixed precision ----


def test_fp32_on_cuda_turns_tf32_off_and_restores_the_flags():
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    with autocast("fp32", torch.device("cuda")):
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
    assert (conv.fp32_precision, matmul.fp32_precision) == before
    with pytest.raises(RuntimeError), ieee_fp32():
        raise RuntimeError("a failing step")
    assert (conv.fp32_precision, matmul.fp32_precision) == before
    with autocast("fp32", torch.device("cpu")):
        assert (conv.fp32_precision, matmul.fp32_precision) == before

def _fixed_batches(n_steps=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, 32, 32, generator=g)
    y = torch.arange(3).repeat_interleave(4)
    return [(x, y)] * n_steps


def test_bf16_on_cpu_trains():
    from dml_ray.objectives import build_objective
    from dml_ray.training import build_optimizer, train_epoch

    cfg = _config_models()
    torch.manual_seed(0)
    model = build_model(cfg.model, 32)
    objective = build_objective(cfg.model, cfg.train, 3, model.embedding_dim)
    optimizer = build_optimizer(cfg.train.optimizer.model_copy(update={"lr": 3e-3}), model, objective)
    first = train_epoch(model, objective, optimizer, _fixed_batches(), torch.device("cpu"), "bf16")
    for _ in range(3):
        last = train_epoch(model, objective, optimizer, _fixed_batches(), torch.device("cpu"), "bf16")
    assert np.isfinite(first["loss"]) and np.isfinite(last["loss"])
    assert last["loss"] < 0.8 * first["loss"]


def _config_models():
    return parse_config({"model": {"backbone": "tiny_cnn", "embedding_dim": 16}})


# Stated tolerance of bf16 against fp32 (bf16 keeps 8 significant bits, ~0.4 % relative error per operation):
# embeddings: cosine >= 0.995 per image; maps: Pearson correlation >= 0.99 and max |difference| <= 5 % of the
# fp32 map's range, per map.
EMBEDDING_COSINE = 0.995
MAP_CORRELATION = 0.99
MAP_RANGE_FRACTION = 0.05


def test_bf16_embeddings_and_maps_close_to_fp32(images_run, tmp_path):
    from dml_ray.explain.batch import reference_maps
    from dml_ray.models.checkpoint import checkpoint_bytes, save_checkpoint
    from dml_ray.models.inference import Embedder

    cfg = _config_models()
    torch.manual_seed(1)
    model = build_model(cfg.model, 32).eval()
    uri = str(tmp_path / "model.pt")
    save_checkpoint(uri, checkpoint_bytes(model, cfg.model, 32, [str(i) for i in range(6)], extra={"resize": 32}))
    images = images_run.read("images").slice(0, 16)
    transform = eval_transform(32, 32)
    batch = {"image_id": np.array(images.column("image_id").to_pylist(), dtype=object),
             "uri": np.array(images.column("uri").to_pylist(), dtype=object),
             "label": images.column("label").to_numpy(), "split": np.array(["train"] * 16, dtype=object),
             "error": np.array([None] * 16, dtype=object),
             "image": np.stack([transform(Image.open(u).convert("RGB")).numpy()
                                for u in images.column("uri").to_pylist()])}
    out = {p: Embedder(uri, "r", feature_maps=True, precision=p)(batch) for p in ("fp32", "bf16")}
    emb = {p: np.stack(t.column("embedding").to_numpy(zero_copy_only=False)) for p, t in out.items()}
    cosine = (emb["fp32"] * emb["bf16"]).sum(1)
    assert cosine.min() >= EMBEDDING_COSINE
    assert not np.array_equal(emb["fp32"], emb["bf16"])  # bf16 did run

    loaded = load_checkpoint(uri)
    with torch.no_grad():
        fm = loaded.model(torch.from_numpy(batch["image"])).feature_map
    e, bias = loaded.model.head.equivalent_features(fm)
    raw = (e.sum(dim=(1, 2)) + bias).detach()
    gap = fm.mean(dim=(2, 3)).detach()
    refs = (raw.roll(1, 0), bias.detach().roll(1, 0), gap.roll(1, 0))
    methods = ["decomposition", "decomposition_bias", "distcam", "gradcam", "gradcam_nonorm", "rgradcam"]
    maps32, _ = reference_maps(loaded.model.head, fm, *refs, methods)
    with autocast("bf16", torch.device("cpu")):
        maps16, _ = reference_maps(loaded.model.head, fm, *refs, methods)
    for method in methods:
        a, b = maps32[method].float().flatten(1), maps16[method].float().flatten(1)
        for x, z in zip(a, b):
            span = float(x.max() - x.min())
            if span == 0:
                continue
            assert float((x - z).abs().max()) <= MAP_RANGE_FRACTION * span, method
            assert np.corrcoef(x.numpy(), z.numpy())[0, 1] >= MAP_CORRELATION, method


def test_fp16_needs_a_gpu():
    with pytest.raises(ConfigError, match="fp16 needs use_gpu"):
        parse_config({"train": {"precision": "fp16"}})
    with pytest.raises(ConfigError, match="fp16 needs use_gpu"):
        parse_config({"embed": {"precision": "fp16"}})
    assert parse_config({"train": {"precision": "fp16", "use_gpu": True}}).train.precision == "fp16"


# ---- augmentations as configuration ----
def _image(w=60, h=40):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_default_augmentations_are_todays_transform():
    from torchvision.transforms import v2

    from dml_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    cfg = parse_config({})
    configured = train_transform(32, 0.0, [(a.name, a.params) for a in cfg.train.augmentations], cfg.data.resize)
    legacy = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(32, scale=(0.3, 1.0), antialias=True),
                         v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                         v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    for seed in range(5):
        torch.manual_seed(seed)
        a = configured(_image())
        torch.manual_seed(seed)
        b = legacy(_image())
        assert torch.equal(a, b)


def test_configured_augmentations():
    cfg = parse_config({"data": {"resize": 40, "image_size": 32},
                        "train": {"augmentations": [{"name": "RandomRotation", "params": {"degrees": 10}},
                                                    {"name": "ColorJitter", "params": {"brightness": 0.3}}]}})
    transform = train_transform(32, 0.0, [(a.name, a.params) for a in cfg.train.augmentations], cfg.data.resize)
    names = [type(t).__name__ for t in transform.transforms]
    assert "RandomHorizontalFlip" not in names and "RandomResizedCrop" not in names
    assert names[:4] == ["PILToTensor", "Resize", "RandomRotation", "ColorJitter"]
    assert transform(_image()).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="'Flip' is not a torchvision.transforms.v2 transform"):
        train_transform(32, 0.0, [("Flip", {})])
    with pytest.raises(ValueError, match="RandomRotation"):
        train_transform(32, 0.0, [("RandomRotation", {"angle": 3})])


def test_upsampling_warning(caplog):
    assert upsampling_factor([48, 64], [48, 40], resize=256, image_size=224) == pytest.approx(256 / 44)
    with caplog.at_level(logging.WARNING, logger="dml_ray.data.transforms"):
        warn_if_upsampling([48] * 4, [48] * 4, resize=256, image_size=224)
    assert "upsample the images 5.3-fold" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dml_ray.data.transforms"):
        warn_if_upsampling([48] * 4, [48] * 4, resize=64, image_size=56)
    assert caplog.text == ""


def test_tracker_names_cover_every_statistic():
    from pipelines.train import _scalars

    record = {"loss": 1.0, "lr": 0.1, "images_per_s": 5.0, "mpn_attention_kl_l0_h1": 0.3,
              "mpn_same_class_mass_l0_h1": 0.6, "val_map_at_r": 0.2, "epoch": 3, "attempt": 0, "steps": 4,
              "seconds": 1.0}
    assert _scalars(record) == {"train/loss": 1.0, "train/lr": 0.1, "train/images_per_s": 5.0,
                                "train/mpn_attention_kl_l0_h1": 0.3, "train/mpn_same_class_mass_l0_h1": 0.6,
                                "val/map_at_r": 0.2}
