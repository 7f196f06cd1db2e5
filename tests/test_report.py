"""The static report (pipelines/report.py, dml_ray/report/): templates that escape what a run holds, a single
self-contained file, and the retrieval views (grid, per-class Recall@1, confused pairs, projection) checked against
dml_ray's own search and a brute-force NumPy one, on a small hand-built run (no Ray, no model)."""
from __future__ import annotations

import io
import os
import re
import sys

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

import dml_ray
from dml_ray.config import ReportConfig
from dml_ray.explore.projection import project_2d, resolve_method
from dml_ray.io.schemas import METRICS_SCHEMA, embeddings_schema, validate_images
from dml_ray.metrics.names import display_value, is_count_metric
from dml_ray.metrics.retrieval import evaluate_retrieval
from dml_ray.report.html import Section, render_report
from dml_ray.report.retrieval_views import best_and_worst, confused_pairs, per_class_recall_at_1, query_quality

DIM, CLASSES, PER_CLASS = 6, 4, 5
HOSTILE = '<script>alert("x")</script>'


def _hostile_run(root: str):
    """A run with a test split of 4 classes x 5 images (class 3 named like a script, one image id too), noisy
    embeddings around one centre per class, and its evaluate metrics computed by ``evaluate_retrieval``."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(CLASSES, DIM))
    images, embeddings = [], []
    for label in range(CLASSES):
        for j in range(PER_CLASS):
            image_id = f"{HOSTILE}_{j}" if (label, j) == (3, 0) else f"c{label}_{j}"
            path = os.path.join(root, f"c{label}_{j}.png")
            Image.fromarray(rng.integers(0, 255, size=(30, 40, 3), dtype=np.uint8)).save(path)
            images.append({"image_id": image_id, "uri": path, "label": label, "split": "test", "bbox": None,
                           "width": 40, "height": 30, "class_name": HOSTILE if label == 3 else f"class{label}"})
            vector = centres[label] + rng.normal(scale=0.9, size=DIM)
            embeddings.append({"run_id": "h", "image_id": image_id, "label": label, "split": "test",
                               "model_id": "m", "embedding": (vector / np.linalg.norm(vector)).tolist(),
                               "norm": 1.0})
    run = dml_ray.open_run(os.path.join(root, "out"), "h", create=True)
    run.commit("images", validate_images(pa.Table.from_pylist(images)))
    run.commit("embeddings", pa.Table.from_pylist(embeddings, schema=embeddings_schema(DIM)))
    x = np.array([e["embedding"] for e in embeddings], np.float32)
    y = np.array([e["label"] for e in embeddings])
    ids = np.array([e["image_id"] for e in embeddings], dtype=object)
    rows = evaluate_retrieval(x, y, ids, x, y, ids, [1, 2, 4], with_nmi=False)
    run.commit("metrics", pa.Table.from_pylist([{"run_id": "h", "stage": "evaluate", "split": "test", **r}
                                                for r in rows], schema=METRICS_SCHEMA), part="evaluate")
    run.update_manifest(config={"evaluate": {"metric": "cosine", "splits": ["test"]}})
    return run, x, y, ids


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    from pipelines.report import build_sections, write_report

    root = str(tmp_path_factory.mktemp("report"))
    run, x, y, ids = _hostile_run(root)
    uri = write_report(run)
    with open(uri, encoding="utf-8") as f:
        html = f.read()
    return {"run": run, "x": x, "y": y, "ids": ids, "html": html,
            "sections": {s.anchor: s for s in build_sections(run)}}


def test_hostile_strings_are_escaped_and_the_page_is_self_contained(hostile) -> None:
    html = hostile["html"]
    assert "<script" not in html.lower()  # the templates have no script: any is an unescaped run string
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
    # one file: every figure and thumbnail inlined, nothing fetched from the network or next to the file
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html, re.I)
    assert not re.search(r"<link\b|url\(", html, re.I)
    assert all(src.startswith("data:image/") for src in re.findall(r"""src=['"]([^'"]*)['"]""", html))
    assert html.count("data:image/jpeg;base64,") >= 5 and "class='thumb match'" in html
    # the shared stylesheet (also the explorer's) is inlined
    css = (dml_ray.__path__[0] + "/serve/static/shared.css")
    with open(css) as f:
        assert ".miss" in f.read() and ".miss" in html


def test_render_escapes_every_field() -> None:
    section = Section(HOSTILE, f"a'{HOSTILE}", text=HOSTILE, tables=[([HOSTILE], [[HOSTILE], [1], [0.5]])])
    html = render_report(HOSTILE, [section], meta=HOSTILE)
    assert "<script" not in html.lower()
    assert "<td>1</td>" in html and "<td>0.5000</td>" in html  # an int stays an int, a float gets 4 decimals


def test_counts_print_as_integers(hostile) -> None:
    assert is_count_metric("n_queries") and is_count_metric("n_images/neighbor/decomposition")
    assert is_count_metric("n_queries_scale2") and is_count_metric("map_at_r_excluded_queries")
    assert not is_count_metric("recall") and not is_count_metric("nmi")
    assert display_value("n_queries", 192.0) == 192 and isinstance(display_value("n_queries", 192.0), int)
    assert display_value("recall", 1.0) == 1.0 and isinstance(display_value("recall", 1.0), float)
    rows = hostile["sections"]["metrics"].tables[0][1]
    assert ["evaluate", "test", "n_queries", None, 20] in [list(r) for r in rows]
    assert "<td>20</td>" in hostile["html"] and "20.0000" not in hostile["html"]


def _cosine_topk(x: np.ndarray, q: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force cosine top-k of row q among the other rows."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit @ unit[q]
    sims[q] = -np.inf
    order = np.argsort(-sims, kind="stable")[:k]
    return order, sims[order]


def test_retrieval_grid_equals_a_brute_force_search(hostile) -> None:
    x, y, ids = hostile["x"], hostile["y"], hostile["ids"]
    grid = {g.title: g for g in hostile["sections"]["retrieval-grid"].grids}
    worst, best = grid["Worst queries"].rows, grid["Best queries"].rows
    assert len(worst) == len(best) == 5 and not {r.query.image_id for r in worst} & {r.query.image_id for r in best}
    row_of = {image_id: i for i, image_id in enumerate(ids)}
    for row in worst + best:
        q = row_of[row.query.image_id]
        order, sims = _cosine_topk(x, q, 5)
        assert [h.image_id for h in row.hits] == [ids[i] for i in order]
        np.testing.assert_allclose([h.score for h in row.hits], sims, atol=1e-5)
        assert [h.match for h in row.hits] == [bool(y[i] == y[q]) for i in order]
    # the worst query is a query with the lowest precision@5 of all, the best one with the highest
    precision = {image_id: np.mean(y[_cosine_topk(x, row_of[image_id], 5)[0]] == y[row_of[image_id]])
                 for image_id in ids}
    assert precision[worst[0].query.image_id] == min(precision.values())
    assert precision[best[0].query.image_id] == max(precision.values())


def test_per_class_recall_weighted_by_class_size_is_the_evaluate_recall_at_1(hostile) -> None:
    run = hostile["run"]
    metrics = run.read("metrics", "evaluate").to_pylist()
    overall = next(r["value"] for r in metrics if r["metric"] == "recall" and r["k"] == 1)
    header, rows = hostile["sections"]["per-class-recall"].tables[0]
    assert header == ["class", "label", "queries", "correct at 1", "Recall@1"]
    assert sum(r[2] * r[4] for r in rows) / sum(r[2] for r in rows) == pytest.approx(overall, abs=1e-12)
    assert [r[4] for r in rows] == sorted(r[4] for r in rows)  # worst first
    assert 0 < overall < 1  # the example has both hits and misses
    from pipelines.report import build_sections

    capped = {s.anchor: s for s in build_sections(run, ReportConfig(per_class_rows=2, grid_queries=0))}
    assert capped["per-class-recall"].tables[0][1] == rows[:2] and "the worst 2 of 4 classes" in \
        capped["per-class-recall"].text
    assert "retrieval-grid" not in capped


def test_per_class_recall_and_confused_pairs_by_hand() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2])
    top1 = np.array([0, 1, 1, 2, 0, 1, 1, 1, 2])
    per_class = per_class_recall_at_1(labels, top1).to_pylist()
    # class 0: 1 of 4 right, class 2: 1 of 3, class 1: 1 of 2 (worst first)
    assert [(r["label"], r["n_queries"], r["n_correct"]) for r in per_class] == [(0, 4, 1), (2, 3, 1), (1, 2, 1)]
    assert [r["recall_at_1"] for r in per_class] == pytest.approx([0.25, 1 / 3, 0.5])
    pairs = confused_pairs(labels, top1, top=3).to_pylist()
    # (0 -> 1) and (2 -> 1) twice each; then (0 -> 2) and (1 -> 0) once, ordered by labels; cut to 3
    assert [(r["label"], r["retrieved_label"], r["count"]) for r in pairs] == [(0, 1, 2), (2, 1, 2), (0, 2, 1)]
    assert [r["share"] for r in pairs] == pytest.approx([0.5, 2 / 3, 0.25])
    assert confused_pairs(labels, labels).num_rows == 0


def test_best_and_worst_ranking_by_hand() -> None:
    labels = np.array([0, 0, 1, 1, 2])
    neighbours = np.array([[0, 0], [1, 1], [1, 0], [0, 1], [2, 2]])
    precision, first = query_quality(labels, neighbours)
    np.testing.assert_allclose(precision, [1, 0, 0.5, 0.5, 1])
    assert first.tolist() == [0, 2, 0, 1, 0]
    ids = np.array(["a", "b", "c", "d", "e"], dtype=object)
    best, worst = best_and_worst(ids, precision, first, np.array([0.9, 0.8, 0.7, 0.6, 0.95]), n=2)
    assert best.tolist() == [4, 0]  # both perfect: the closer top-1 first
    assert worst.tolist() == [1, 3]  # none correct; then the later first correct rank
    few_best, few_worst = best_and_worst(ids[:3], precision[:3], first[:3], np.zeros(3), n=5)
    assert few_best.tolist() == [0, 2] and few_worst.tolist() == [1]
    # one query per class first: rows 4 and 0 are the two best, but 0 shares no class with 4 and stays; with
    # labels making 0 and 4 one class, the second best is the next class's best (row 2)
    assert best_and_worst(ids, precision, first, np.array([0.9, 0.8, 0.7, 0.6, 0.95]), n=2,
                          query_labels=labels)[0].tolist() == [4, 0]
    same = np.array([2, 0, 1, 1, 2])
    best, worst = best_and_worst(ids, precision, first, np.array([0.9, 0.8, 0.7, 0.6, 0.95]), n=2,
                                 query_labels=same)
    assert best.tolist() == [4, 2] and worst.tolist() == [1, 3]
    one_class = best_and_worst(ids, precision, first, np.zeros(5), n=3, query_labels=np.zeros(5, int))
    plain = best_and_worst(ids, precision, first, np.zeros(5), n=3)
    assert [a.tolist() for a in one_class] == [a.tolist() for a in plain]  # a single class: the plain ranking


def test_projection_pca_and_the_auto_fallback(monkeypatch) -> None:
    from sklearn.decomposition import PCA

    x = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    xy = project_2d(x, "pca")
    assert xy.shape == (30, 2) and xy.dtype == np.float32
    np.testing.assert_allclose(xy, PCA(n_components=2, random_state=0).fit_transform(x), atol=1e-5)
    np.testing.assert_allclose(project_2d(x), xy)  # PCA is the default
    assert project_2d(x[:2]).tolist() == [[0, 0], [0, 0]]
    monkeypatch.setitem(sys.modules, "umap", None)  # umap-learn not importable
    assert resolve_method("auto") == "pca"
    np.testing.assert_allclose(project_2d(x, "auto"), xy)
    with pytest.raises(ValueError, match="umap-learn"):
        project_2d(x, "umap")
    with pytest.raises(ValueError, match="unknown method"):
        project_2d(x, "tsne")
    with pytest.raises(ValueError, match="umap-learn"):  # at config load, before a run's stages
        ReportConfig(projection="umap")


def test_projection_umap_when_installed() -> None:
    pytest.importorskip("umap")
    x = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    assert resolve_method("auto") == "umap"
    xy = project_2d(x, "umap")
    assert xy.shape == (40, 2) and np.isfinite(xy).all()


def test_projection_section(hostile) -> None:
    section = hostile["sections"]["projection"]
    assert "20 embeddings projected to 2-D by PCA" in section.text
    assert section.figures[0][:8] == b"\x89PNG\r\n\x1a\n"


def test_unreadable_images_leave_a_placeholder(hostile, tmp_path) -> None:
    from dml_ray.report.html import Grid, GridRow, Tile
    from pipelines.report import _thumbnail

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    assert _thumbnail(hostile["run"], str(tmp_path / "moved.jpg"), 96) is None
    assert _thumbnail(hostile["run"], str(broken), 96) is None
    good = _thumbnail(hostile["run"], hostile["run"].read("images").column("uri")[0].as_py(), 32)
    assert good[:2] == b"\xff\xd8" and max(Image.open(io.BytesIO(good)).size) == 32
    grid = Grid("g", [GridRow(Tile("q", "a", good), [Tile("r", "b", None, 0.5, False)])])
    html = render_report("t", [Section("s", "s", grids=[grid])])
    assert "class='thumb missing miss'" in html and "unreadable" in html and "cosine 0.500" in html
