"""End to end on a local Ray instance: the demo's data, training, embedding and evaluation."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from dml_ray.io.run import open_run
from dml_ray.cli import main
from dml_ray.data.batches import decode_batch, fetch_bytes
from dml_ray.io.schemas import embeddings_schema, feature_maps_schema
from dml_ray.io.tables import committed_files, read_table, table_uri
from dml_ray.metrics.localization import mode_threshold_grid
from dml_ray.metrics.retrieval import evaluate_retrieval
from dml_ray.models.embedding import build_model
from pipelines.run import run_pipeline
from tests.conftest import demo_like_config


@pytest.fixture(scope="module")
def demo_run(ray_session, tmp_path_factory):
    cfg = demo_like_config(str(tmp_path_factory.mktemp("demo")))
    summary = run_pipeline(cfg)
    return cfg, summary


def _recall_at_1(embeddings: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> float:
    rows = evaluate_retrieval(embeddings, labels, ids, embeddings, labels, ids, [1], with_map_at_r=False,
                              with_nmi=False)
    return next(r["value"] for r in rows if r["metric"] == "recall")


def test_every_stage_ran_and_committed(demo_run):
    cfg, summary = demo_run
    assert summary.ran == ["data", "train", "embed", "evaluate", "knn", "explain", "localize", "report"]
    images = read_table(table_uri(cfg.output_root, "t", "images"))
    emb = read_table(table_uri(cfg.output_root, "t", "embeddings"))
    errors = read_table(table_uri(cfg.output_root, "t", "errors"))
    assert emb.num_rows == images.num_rows - errors.num_rows
    ids = emb.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) <= set(images.column("image_id").to_pylist())
    assert emb.schema.remove_metadata().equals(embeddings_schema(cfg.model.embedding_dim))
    norms = np.linalg.norm(np.stack(emb.column("embedding").to_numpy(zero_copy_only=False)), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    metrics = {(r["metric"], r["k"]): r["value"] for r in summary.metrics.to_pylist()}
    assert {("recall", 1), ("recall", 8), ("map_at_r", None), ("nmi", None)} <= set(metrics)
    with open(summary.figure, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    train = read_table(table_uri(cfg.output_root, "t", "metrics", "train")).to_pylist()
    assert sorted(r["k"] for r in train if r["metric"] == "loss") == list(range(cfg.train.epochs))


def test_training_beats_random_initialisation(demo_run):
    cfg, summary = demo_run
    trained = next(r["value"] for r in summary.metrics.to_pylist() if r["metric"] == "recall" and r["k"] == 1)
    images = read_table(table_uri(cfg.output_root, "t", "images"))
    test = images.filter(pc.equal(images.column("split"), "test"))
    batch = decode_batch(fetch_bytes(test), cfg.data.resize, cfg.data.image_size)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.data.image_size).eval()
    with torch.no_grad():
        random_emb = model(torch.from_numpy(batch["image"])).embedding.numpy()
    random_r1 = _recall_at_1(random_emb, batch["label"], batch["image_id"])
    assert trained > random_r1 + 0.15, (trained, random_r1)


def test_rerun_skips_committed_stages_and_changes_nothing(demo_run):
    cfg, _ = demo_run
    tables = ("images", "embeddings", "metrics", "feature_maps", "prototypes", "activation_maps", "localization",
              "neighbors")
    before = {t: committed_files(table_uri(cfg.output_root, "t", t)) for t in tables}
    again = run_pipeline(cfg)
    assert again.ran == [] and again.skipped == list(cfg.stages)
    after = {t: committed_files(table_uri(cfg.output_root, "t", t)) for t in before}
    assert before == after


def test_query_cli_reads_committed_tables(demo_run, capsys):
    cfg, _ = demo_run
    sql = ("SELECT count(*) AS n, count(DISTINCT image_id) AS ids, "
           "max(array_cosine_similarity(embedding::FLOAT[64], embedding::FLOAT[64])) AS self_sim FROM embeddings")
    assert main(["query", "--root", cfg.output_root, "--format", "csv", sql]) == 0
    n, ids, self_sim = capsys.readouterr().out.strip().splitlines()[-1].split(",")
    assert int(n) == int(ids) > 0 and abs(float(self_sim) - 1.0) < 1e-5


def test_activation_maps_one_row_per_image_reference_and_method(demo_run):
    cfg, _ = demo_run
    images = read_table(table_uri(cfg.output_root, "t", "images"))
    n_explained = pc.sum(pc.is_in(images.column("split"), pa.array(cfg.explain.splits))).as_py()
    maps = read_table(table_uri(cfg.output_root, "t", "activation_maps"))
    keys = list(zip(*(maps.column(c).to_pylist() for c in ("image_id", "reference_kind", "method"))))
    assert len(keys) == len(set(keys)) == n_explained * len(cfg.explain.references) * len(cfg.explain.methods)
    h, w = maps.column("map_h")[0].as_py(), maps.column("map_w")[0].as_py()
    assert pc.all(pc.equal(pc.list_value_length(maps.column("map")), h * w)).as_py()
    neighbors = maps.filter(pc.equal(maps.column("reference_kind"), "neighbor"))
    assert not set(zip(neighbors.column("image_id").to_pylist(), neighbors.column("reference_id").to_pylist())) & {
        (i, i) for i in neighbors.column("image_id").to_pylist()}
    features = read_table(table_uri(cfg.output_root, "t", "feature_maps"))
    assert features.schema.remove_metadata().equals(feature_maps_schema(64, cfg.model.embedding_dim))
    assert pc.all(pc.equal(pc.list_value_length(features.column("feature_map")), 64 * h * w)).as_py()
    protos = read_table(table_uri(cfg.output_root, "t", "prototypes"))
    assert set(protos.column("split").to_pylist()) == {"train", "test"}


def test_point_to_point_pairs_sum_to_the_stored_decomposition(demo_run):
    from pipelines.explain import pair_rows
    from pipelines.train import model_uri

    cfg, _ = demo_run
    maps = read_table(table_uri(cfg.output_root, "t", "activation_maps"))
    decomposition = maps.filter(pc.and_(pc.equal(maps.column("method"), "decomposition"),
                                        pc.equal(maps.column("reference_kind"), "neighbor"))).slice(0, 3).to_pylist()
    pairs = [(r["image_id"], r["reference_id"]) for r in decomposition]
    features = read_table(table_uri(cfg.output_root, "t", "feature_maps"))
    p2p = pair_rows(model_uri(cfg.output_root, "t"), features, pairs, "t").to_pylist()
    for row, ref in zip(p2p, decomposition):
        h, w = row["map_h"], row["map_w"]
        p = np.asarray(row["map"]).reshape(h, w, h, w)
        np.testing.assert_allclose(p.sum(axis=(2, 3)).reshape(-1), ref["map"], rtol=1e-4, atol=1e-6)
        assert abs(row["score"] - ref["score"]) < 1e-5


def test_explain_cli_draws_the_pair_figure_and_saves_arrays(demo_run, tmp_path, capsys):
    from pipelines.train import model_uri

    cfg, _ = demo_run
    images = read_table(table_uri(cfg.output_root, "t", "images")).to_pylist()
    query, reference = images[0]["uri"], images[1]["uri"]
    fig, arrays = tmp_path / "fig.png", tmp_path / "arrays.npz"
    assert main(["explain", "--checkpoint", model_uri(cfg.output_root, "t"), "--query", query,
                 "--reference", reference, "--out", str(fig), "--save-arrays", str(arrays)]) == 0
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = np.load(arrays)
    # the saved decomposition satisfies the invariant: maps + bias terms give the printed cosine
    e_q, e_r = saved["equivalent_features_query"], saved["equivalent_features_reference"]
    b_q, b_r = saved["bias_query"], saved["bias_reference"]
    raw_q, raw_r = e_q.sum((0, 1)) + b_q, e_r.sum((0, 1)) + b_r
    z = np.linalg.norm(raw_q) * np.linalg.norm(raw_r)
    total = saved["point_to_point"].sum() + (e_q.sum((0, 1)) @ b_r + b_q @ e_r.sum((0, 1)) + b_q @ b_r) / z
    assert abs(total - float(saved["cosine"])) < 1e-4
    np.testing.assert_allclose(saved["point_to_point"].sum((2, 3)), saved["decomposition_query"], rtol=1e-4,
                               atol=1e-6)
    assert f"{float(saved['cosine']):.4f}" in capsys.readouterr().out
    gallery = cfg.output_root + "/runs/t/explain_gallery.png"
    assert open(gallery, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def _localize_metrics(cfg, split: str) -> dict[str, float]:
    metrics = read_table(table_uri(cfg.output_root, "t", "metrics", "localize")).to_pylist()
    return {r["metric"]: r["value"] for r in metrics if r["threshold"] is None and r["split"] == split}


def test_localization_rows_and_decomposition_beats_baselines(demo_run):
    cfg, _ = demo_run
    loc = read_table(table_uri(cfg.output_root, "t", "localization"))
    maps = read_table(table_uri(cfg.output_root, "t", "activation_maps"), columns=["image_id"])
    n_images = len(set(maps.column("image_id").to_pylist()))
    n_thresholds = len(mode_threshold_grid(cfg.localize.mode, cfg.localize.threshold_interval))
    n_series = len(cfg.explain.references) * len(cfg.explain.methods) + 2  # + random and centred baselines
    keys = set(zip(*(loc.column(c).to_pylist() for c in ("image_id", "method", "reference_kind", "threshold"))))
    assert len(keys) == loc.num_rows == n_images * n_series * n_thresholds
    m = _localize_metrics(cfg, "test")
    decomposition = m["loc_best_acc/neighbor/decomposition"]
    assert decomposition > m["loc_best_acc/none/baseline_random"] + 0.2, m
    assert decomposition > m["loc_best_acc/none/baseline_center"] + 0.1, m
    # the threshold chosen on the held-out half transfers to the other half
    assert m["loc_holdout_acc/neighbor/decomposition"] > m["loc_best_acc/none/baseline_center"], m
    # activation-decomposition-tip2021 Sec. V: for a GAP head, Grad-CAM (no norm) ranks like Decomposition+Bias
    assert abs(m["loc_best_acc/neighbor/gradcam_nonorm"] - m["loc_best_acc/neighbor/decomposition_bias"]) < 1e-9
    assert 0 <= m["top1_loc_error/prototype/distcam"] <= 1


def test_report_renders_in_headless_chromium(demo_run, tmp_path):
    import subprocess

    cfg, _ = demo_run
    report = f"{cfg.output_root}/runs/t/report.html"
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", f"file://{report}"]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    for anchor in ("metrics", "per-class-recall", "retrieval-grid", "projection", "maps", "localization-curves",
                   "localization-table", "best-localized", "worst-localized"):
        assert f'id="{anchor}"' in dom, anchor
    assert dom.count("data:image/png;base64,") >= 7
    assert dom.count("data:image/jpeg;base64,") >= 10  # the retrieval grid's thumbnails
    assert "neighbor/decomposition" in dom


def test_report_per_class_recall_agrees_with_the_evaluate_stage(demo_run):
    from pipelines.report import build_sections

    cfg, _ = demo_run
    run = open_run(cfg.output_root, "t")
    metrics = {(r["metric"], r["k"]): r["value"] for r in run.read("metrics", "evaluate").to_pylist()
               if r["split"] == "test"}
    rows = {s.anchor: s for s in build_sections(run)}["per-class-recall"].tables[0][1]
    assert sum(r[2] for r in rows) == metrics[("n_queries", None)]
    assert sum(r[3] for r in rows) / sum(r[2] for r in rows) == pytest.approx(metrics[("recall", 1)], abs=1e-12)


def test_compare_puts_trained_and_random_models_side_by_side(demo_run, capsys):
    from dml_ray.models.checkpoint import checkpoint_bytes, save_checkpoint

    cfg, _ = demo_run
    torch.manual_seed(cfg.train.seed)
    ckpt = f"{cfg.output_root}/random-init.pt"
    save_checkpoint(ckpt, checkpoint_bytes(build_model(cfg.model, cfg.data.image_size).eval(), cfg.model,
                                           cfg.data.image_size, []))
    random_cfg = demo_like_config(cfg.output_root, run_id="random", stages=["data", "embed", "evaluate"],
                                  **{"model.weights": ckpt})
    run_pipeline(random_cfg)
    assert main(["compare", "--root", cfg.output_root, "t", "random"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    trained, random = (line.split() for line in lines[1:3])
    assert trained[0] == "t" and random[0] == "random"
    r1_train, r1_test, drop = (float(v) for v in trained[3:6])
    assert abs(drop - (r1_train - r1_test)) < 1e-3
    assert r1_test > float(random[4])
    assert trained[6] != "-" and random[6] == "-"  # the random run was not localized
    assert lines[-1].endswith("compare-t-vs-random.html")


def test_neighbors_table_matches_a_single_process_graph(demo_run):
    from dml_ray.retrieval.knn_graph import knn_graph
    from dml_ray.retrieval.prototypes import fixed_list_to_numpy

    cfg, _ = demo_run
    neighbors = read_table(table_uri(cfg.output_root, "t", "neighbors"))
    emb = read_table(table_uri(cfg.output_root, "t", "embeddings"))
    test_emb = emb.filter(pc.equal(emb.column("split"), "test"))
    ids = np.asarray(test_emb.column("image_id").to_pylist(), dtype=object)
    expected, _ = knn_graph(fixed_list_to_numpy(test_emb.column("embedding")), cfg.knn.k1)
    rows = {r["image_id"]: r for r in neighbors.filter(pc.equal(neighbors.column("split"), "test")).to_pylist()}
    assert set(rows) == set(ids)
    for i, image_id in enumerate(ids):
        row = rows[image_id]
        assert row["neighbor_ids"] == list(ids[expected[i]])
        assert row["batch_ids"][0] == row["reciprocal_ids"][0] == image_id
        assert len(row["batch_ids"]) == len(set(row["batch_ids"])) == cfg.knn.batch_size
        assert set(row["batch_ids"]) <= set(row["reciprocal_ids"]) | set(row["neighbor_ids"])


def test_explain_stage_stores_point_to_point_tensors_for_configured_pairs(demo_run):
    import shutil

    from pipelines.explain import run_explain
    from pipelines.train import model_uri

    cfg, _ = demo_run
    run = f"{cfg.output_root}/runs"
    shutil.copytree(f"{run}/t", f"{run}/pairs", ignore=shutil.ignore_patterns("activation_maps", "prototypes"))
    images = read_table(table_uri(cfg.output_root, "t", "images"))
    test_ids = images.filter(pc.equal(images.column("split"), "test")).column("image_id").to_pylist()
    pairs = [(test_ids[0], test_ids[1]), (test_ids[2], test_ids[0])]
    explain = cfg.explain.model_copy(update={"pairs": pairs, "methods": ["decomposition"],
                                             "references": ["neighbor"]})
    result = run_explain(model_uri(cfg.output_root, "t"), open_run(cfg.output_root, "pairs"), explain, ["test"])
    maps = read_table(result.activation_maps_uri)
    p2p = maps.filter(pc.equal(maps.column("method"), "point_to_point")).to_pylist()
    assert [(r["image_id"], r["reference_id"]) for r in p2p] == pairs
    assert all(len(r["map"]) == (r["map_h"] * r["map_w"]) ** 2 and r["reference_kind"] == "pair" for r in p2p)
    assert maps.num_rows == len(test_ids) + len(pairs)


def test_readme_python_example_runs_on_a_demo_run(demo_run, capsys):
    """The README's "Use a run from Python" block, run as written against a finished run."""
    import re
    from pathlib import Path

    cfg, summary = demo_run
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Use a run from Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    code = code.replace('open_run("demo_out")', f'open_run({cfg.output_root!r}, "t")')  # other tests add runs
    exec(code.replace('"demo_out"', repr(cfg.output_root)), scope)  # noqa: S102 - the README's own code
    assert len(scope["emb"]) == summary.stages["embed"]["rows"]
    assert set(scope["test"].column("split").to_pylist()) == {"test"}
    assert scope["ds"].count() == len(scope["emb"])
    assert "embeddings" in capsys.readouterr().out


def test_readme_explore_example_and_the_explorer_on_a_demo_run(demo_run, capsys):
    """The README's "Explore a run" block as written (its file names swapped for the run's), and the explorer's
    top-k on a trained run equal to the saved index's search."""
    import re
    from pathlib import Path

    from dml_ray.io.run import open_run
    from dml_ray.serve.explorer import Explorer

    cfg, _ = demo_run
    run = open_run(cfg.output_root, "t")  # not latest: other tests of this module add runs
    uris = run.read("images", columns=["uri"]).column("uri").to_pylist()[:2]
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme.split("## Explore a run", 1)[1], re.S).group(1)
    code = (code.replace('"demo_out/runs/demo/model/model.pt"', repr(run.path("model", "model.pt")))
            .replace('open_run("demo_out")', f'open_run({cfg.output_root!r}, "t")').replace('"a.jpg"', repr(uris[0]))
            .replace('"b.jpg"', repr(uris[1])))
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the README's own code
    assert scope["vectors"].shape == (2, cfg.model.embedding_dim)
    assert "score" in capsys.readouterr().out
    explorer = Explorer(run)
    first = explorer.ids[0]
    hits = explorer.topk(first, 5)
    ranked = run.search(explorer.embeddings[:1].numpy(), k=6).column("image_id").to_pylist()
    assert [h["image_id"] for h in hits] == [i for i in ranked if i != first][:5]
    maps = explorer.pair_maps(first, hits[0]["image_id"])  # the demo stores feature maps
    assert set(explorer.methods) == set(cfg.explain.methods) and set(explorer.methods) <= set(maps)
    assert float(maps["cosine"]) == pytest.approx(hits[0]["score"], abs=1e-4)
