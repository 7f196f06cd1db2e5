"""The explorer's API (dml_ray/serve/app.py) on a small hand-built run with feature maps: each endpoint equals the
library function it serialises, and refusals (unknown ids, traversal, oversize, non-images, token)."""
from __future__ import annotations

import io
import os
from json import loads as json_loads

import numpy as np
import pyarrow as pa
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import dml_ray
from dml_ray.config import ModelConfig
from dml_ray.data.batches import decode_batch, fetch_bytes
from dml_ray.explain.decomposition import point_specific_map
from dml_ray.explain.interactive import box_coverage_mask, partial_query, rank_gallery
from dml_ray.models.checkpoint import checkpoint_bytes
from dml_ray.models.embedding import build_model
from dml_ray.models.inference import EMBEDDING_COLUMNS, FEATURE_MAP_COLUMNS, Embedder
from dml_ray.serve import explorer as explorer_mod
from dml_ray.serve.app import create_app
from dml_ray.serve.explorer import Explorer

SIZE, DIM = 32, 8


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("serve"))
    rng = np.random.default_rng(1)
    rows = []
    for label in range(3):
        for j in range(4):
            path = os.path.join(root, f"c{label}_{j}.png")
            Image.fromarray(rng.integers(0, 255, size=(36, 40, 3), dtype=np.uint8)).save(path)
            bbox = {"x": 4.0 + 3 * j, "y": 2.0 + 2 * label, "w": 20.0, "h": 16.0} if (label, j) != (0, 3) else None
            rows.append({"image_id": f"c{label}_{j}", "uri": path, "label": label, "class_name": f"class{label}",
                         "split": "test", "bbox": bbox, "width": 40, "height": 36})
    images = pa.Table.from_pylist(rows)
    run = dml_ray.open_run(os.path.join(root, "out"), "s1", create=True)
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="tiny_cnn", embedding_dim=DIM)
    checkpoint = run.write_bytes(run.path("model", "model.pt"),
                                 checkpoint_bytes(build_model(cfg, SIZE).eval(), cfg, SIZE, [], extra={"resize": SIZE}))
    out = Embedder(checkpoint, "s1", feature_maps=True)(decode_batch(fetch_bytes(images.select(
        ["image_id", "uri", "label", "split"])), SIZE, SIZE))
    from dml_ray.io.schemas import validate_images

    run.commit("images", validate_images(images))
    run.commit("feature_maps", out.select(FEATURE_MAP_COLUMNS))
    run.commit("embeddings", out.select(EMBEDDING_COLUMNS))
    _localize(run, images, rng)
    explorer = Explorer(run)
    return {"run": run, "explorer": explorer, "client": TestClient(create_app(explorer)), "root": root}


def _localize(run, images: pa.Table, rng: np.random.Generator) -> None:
    """The localize stage's own code (pipelines.localize) on random 4 x 4 maps of two methods: the run's
    ``localization`` table and its localize ``metrics``, in the input frame of the run's data config."""
    from dml_ray.config import DataConfig, LocalizeConfig
    from pipelines.localize import ground_truth, localize_groups, metrics_rows

    data = DataConfig(image_size=SIZE, resize=SIZE, frame="resize_crop")
    run.update_manifest(config={"data": data.model_dump(mode="json")})
    ids = [i for i in images.column("image_id").to_pylist()]
    methods = ["decomposition", "distcam"]
    maps = pa.table({
        "image_id": pa.array([i for _ in methods for i in ids]),
        "reference_id": pa.array([i for _ in methods for i in ids]),
        "reference_kind": pa.array(["neighbor"] * (len(methods) * len(ids))),
        "method": pa.array([m for m in methods for _ in ids]),
        "map_h": pa.array([4] * (len(methods) * len(ids)), pa.int32()),
        "map_w": pa.array([4] * (len(methods) * len(ids)), pa.int32()),
        "map": pa.array(list(rng.random((len(methods) * len(ids), 16), dtype=np.float32)), pa.list_(pa.float32())),
    })
    labels = dict(zip(ids, images.column("label").to_pylist()))
    splits = dict(zip(ids, images.column("split").to_pylist()))
    rows, counters = localize_groups(maps, ground_truth(images, data), labels, splits,
                                     LocalizeConfig(threshold_interval=0.25), SIZE, run.run_id)
    run.commit("localization", rows)
    run.commit("metrics", metrics_rows(counters, run.run_id), part="localize")


def test_feature_maps_are_read_a_row_group_at_a_time(tmp_path) -> None:
    """A committed feature_maps table has ~4 MiB row groups with plain (not dictionary) float16 pages, and the
    explorer's reader returns each image's row while holding no more decoded groups than its byte budget."""
    import pyarrow.parquet as pq

    from dml_ray.serve.feature_store import FeatureMapReader

    run = dml_ray.open_run(str(tmp_path), "fm", create=True)
    n, channels = 48, 2048  # 2048 x 7 x 7 float16: ~200 KB a row, so ~20 rows a group
    maps = np.random.default_rng(0).standard_normal((n, channels * 49)).astype(np.float16)
    ids = [f"i{r:02d}" for r in range(n)]
    run.commit("feature_maps", pa.table({
        "run_id": ["fm"] * n, "image_id": ids, "label": pa.array(np.arange(n) % 3, pa.int64()), "split": ["test"] * n,
        "model_id": ["m"] * n, "channels": pa.array([channels] * n, pa.int32()),
        "map_h": pa.array([7] * n, pa.int32()), "map_w": pa.array([7] * n, pa.int32()),
        "feature_map": pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * channels * 49),
                                                pa.array(maps.reshape(-1), pa.float16()))}))
    meta = pq.ParquetFile(run.files("feature_maps")[0]).metadata
    assert meta.num_row_groups >= 2
    column = meta.schema.names.index("element")  # feature_map's leaf
    assert "RLE_DICTIONARY" not in meta.row_group(0).column(column).encodings
    group_bytes = meta.row_group(0).num_rows * channels * 49 * 2
    reader = FeatureMapReader(run, cache_bytes=group_bytes)
    assert len(reader) == n and reader.shape == (channels, 7, 7)
    for r in (0, n - 1, 1, n // 2):
        np.testing.assert_array_equal(reader.get(ids[r]).reshape(-1), maps[r])
        assert reader._cached <= group_bytes and len(reader._groups) == 1
    with pytest.raises(KeyError):
        reader.get("nope")
    reader.close()


def test_page_and_static_files_are_served(served) -> None:
    client = served["client"]
    assert "dml_ray explorer" in client.get("/").text
    assert "drawMap" in client.get("/static/app.js").text
    css = client.get("/static/shared.css")  # the stylesheet the page links (shared with report.html)
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css") and ".match" in css.text
    assert client.get("/static/..%2Fexplorer.py").status_code == 404
    assert client.get("/docs").status_code == 404


def test_info_gallery_and_filters(served) -> None:
    client = served["client"]
    info = client.get("/api/info").json()
    assert info["rows"] == 12 and info["labels"] == [0, 1, 2] and info["image_size"] == [SIZE, SIZE]
    rows = client.get("/api/gallery", params={"label": 1}).json()
    assert [r["image_id"] for r in rows] == [f"c1_{j}" for j in range(4)]
    assert rows[0]["class_name"] == "class1"
    assert client.get("/api/gallery", params={"split": "train"}).json() == []


def test_image_bytes_only_through_the_tables(served) -> None:
    client = served["client"]
    r = client.get("/api/image/c0_1")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == open(os.path.join(served["root"], "c0_1.png"), "rb").read()
    for bad in ("../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", os.path.join(served["root"], "c0_1.png"), "nope"):
        assert client.get(f"/api/image/{bad}").status_code == 404


def test_topk_equals_run_search(served) -> None:
    hits = served["client"].get("/api/topk", params={"id": "c2_0", "k": 5}).json()
    expected = served["run"].search(served["explorer"].embeddings[[8]].numpy(), k=6).to_pylist()
    expected = [r for r in expected if r["image_id"] != "c2_0"][:5]
    assert [h["image_id"] for h in hits] == [r["image_id"] for r in expected]
    assert [h["match"] for h in hits] == [r["label"] == 2 for r in expected]
    assert served["client"].get("/api/topk", params={"id": "../x"}).status_code == 404


def test_pair_maps_equal_reference_maps_and_are_cached(served, monkeypatch) -> None:
    ex = served["explorer"]
    body = served["client"].get("/api/maps", params={"query": "c0_0", "ref": "c1_1"}).json()
    assert sorted(body["maps"]) == sorted(ex.methods)
    # Decomposition+Bias sums, with the query bias's share, to the pair's cosine (activation-decomposition Eq. 5)
    cos = float(np.dot(ex.embeddings[0], ex.embeddings[5]))
    assert body["cosine"] == pytest.approx(cos, abs=1e-4)
    _, _, raw_q, bias_q = ex._features("c0_0")
    raw_r = ex._features("c1_1")[2]
    bias_share = float(bias_q @ raw_r / (raw_q.norm() * raw_r.norm()))
    assert np.sum(body["maps"]["decomposition_bias"]) + bias_share == pytest.approx(cos, abs=1e-4)
    monkeypatch.setattr(explorer_mod, "reference_maps", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    assert served["client"].get("/api/maps", params={"query": "c0_0", "ref": "c1_1"}).json() == body


def test_point_map_equals_the_library(served) -> None:
    ex = served["explorer"]
    got = np.array(served["client"].get("/api/point", params={"query": "c0_0", "ref": "c1_1", "row": 10,
                                                             "col": 20}).json()["map"])
    _, e_q, raw_q, _ = ex._features("c0_0")
    _, e_r, raw_r, _ = ex._features("c1_1")
    grid = (torch.tensor([[10.0, 20.0]]) + 0.5) * torch.tensor([e_q.shape[0] / SIZE, e_q.shape[1] / SIZE]) - 0.5
    want = point_specific_map(e_q[None], e_r[None], raw_q[None], raw_r[None], grid)[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_region_rerank_equals_the_library(served) -> None:
    ex = served["explorer"]
    hits = served["client"].get("/api/region", params={"query": "c1_0", "x": 0, "y": 0, "w": 16, "h": 16,
                                                       "k": 5}).json()
    _, e_q, raw_q, _ = ex._features("c1_0")
    mask = box_coverage_mask(torch.tensor([[0.0, 0, 16, 16]]), (SIZE, SIZE), tuple(e_q.shape[:2]))
    _, idx = rank_gallery(partial_query(e_q[None], raw_q[None], mask), ex.embeddings, 6)
    want = [ex.ids[i] for i in idx[0].tolist() if ex.ids[i] != "c1_0"][:5]
    assert [h["image_id"] for h in hits] == want
    assert served["client"].get("/api/region", params={"query": "c1_0", "x": 100, "y": 100, "w": 5,
                                                       "h": 5}).status_code == 400


def _png(size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_upload_searches_and_refuses_bad_input(served, monkeypatch) -> None:
    client, ex = served["client"], served["explorer"]
    data = open(os.path.join(served["root"], "c2_3.png"), "rb").read()
    body = client.post("/api/upload", params={"k": 3}, content=data).json()
    hits = body["topk"]
    # the upload is a stored image: its maps against a hit equal the stored pair's maps
    first = hits[0]["image_id"]
    assert sorted(body["maps"]) == sorted(h["image_id"] for h in hits)
    for method in ex.methods:
        np.testing.assert_allclose(body["maps"][first][method], ex.pair_maps("c2_3", first)[method], atol=2e-3)
    want = served["run"].search([os.path.join(served["root"], "c2_3.png")], k=3)
    assert [h["image_id"] for h in hits] == want.column("image_id").to_pylist()
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert client.post("/api/upload", content=b"not an image at all").status_code == 400
    monkeypatch.setattr(explorer_mod, "MAX_UPLOAD_BYTES", 40)
    assert client.post("/api/upload", content=_png()).status_code == 413
    monkeypatch.setattr(explorer_mod, "MAX_UPLOAD_BYTES", 10 ** 7)
    monkeypatch.setattr(explorer_mod, "MAX_UPLOAD_PIXELS", 1000)  # 40 x 30 = 1200 pixels: refused from the header
    r = client.post("/api/upload", content=_png())
    assert r.status_code == 413 and "pixels" in r.json()["detail"]
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="TIFF")
    monkeypatch.setattr(explorer_mod, "MAX_UPLOAD_PIXELS", 10 ** 6)
    assert client.post("/api/upload", content=buf.getvalue()).status_code == 400


def test_projection_is_pca_of_the_embeddings(served) -> None:
    from sklearn.decomposition import PCA

    client = served["client"]
    body = client.get("/api/projection").json()
    pts = body["points"]
    want = PCA(n_components=2, random_state=0).fit_transform(served["explorer"].embeddings.numpy())
    np.testing.assert_allclose([[p["x"], p["y"]] for p in pts], want, atol=1e-4)
    assert pts[4]["image_id"] == "c1_0" and body["method"] == "pca"
    assert client.get("/api/projection", params={"method": "tsne"}).status_code == 400


def test_projection_by_umap_when_installed(served) -> None:
    """The page offers UMAP exactly when umap-learn is importable (the test extra installs it), and the endpoint
    returns ``project_2d``'s coordinates for it."""
    from dml_ray.explore.projection import project_2d, umap_available

    client = served["client"]
    assert client.get("/api/info").json()["projections"] == (["pca", "umap"] if umap_available() else ["pca"])
    got = client.get("/api/projection", params={"method": "umap"})
    if not umap_available():
        assert got.status_code == 400 and "umap-learn" in got.json()["detail"]
        return
    want = project_2d(served["explorer"].embeddings.numpy(), "umap")
    assert got.json()["method"] == "umap"
    np.testing.assert_allclose([[p["x"], p["y"]] for p in got.json()["points"]], want, atol=1e-4)


def test_no_endpoint_writes_and_token_is_enforced(served) -> None:
    client = served["client"]
    for method in ("put", "delete", "patch"):
        assert getattr(client, method)("/api/gallery").status_code == 405
    guarded = TestClient(create_app(served["explorer"], token="s3cret"))
    assert guarded.get("/api/info").status_code == 401
    assert guarded.get("/api/info", params={"token": "wrong"}).status_code == 401
    assert guarded.get("/api/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_serve_refuses_a_public_host_without_token(served, capsys) -> None:
    from dml_ray.cli import main

    assert main(["serve", "--root", os.path.join(served["root"], "out"), "--host", "0.0.0.0"]) == 2
    assert "--token" in capsys.readouterr().err
    # replicas and GPUs are Ray Serve's: refused, before anything starts, without --ray-serve
    assert main(["serve", "--root", os.path.join(served["root"], "out"), "--replicas", "2"]) == 2
    assert "--ray-serve" in capsys.readouterr().err


def test_localization_view_equals_the_tables(served) -> None:
    """The localization endpoints serve the run's localization rows unchanged (predicted box, IoU, correct), the
    ground truth carried into the input frame as the localize stage carries it, best or worst IoU first, at the
    metrics table's best threshold by default; the input-frame view of an image is the model's crop."""
    import pyarrow.compute as pc

    from dml_ray.config import DataConfig
    from dml_ray.data.transforms import decode_image, display_view
    from pipelines.localize import ground_truth

    client, run = served["client"], served["run"]
    options = client.get("/api/localization/options").json()
    assert options["available"]
    assert [(o["method"], o["reference_kind"]) for o in options["options"]] == [("decomposition", "neighbor"),
                                                                                ("distcam", "neighbor")]
    metrics = run.read("metrics", "localize").to_pylist()
    best = next(m["value"] for m in metrics if m["metric"] == "loc_best_threshold/neighbor/distcam" and
                m["split"] == "test")
    assert options["options"][1]["best_threshold"] == pytest.approx(best)
    table = run.read("localization")
    gt = ground_truth(run.read("images"), DataConfig(image_size=SIZE, resize=SIZE, frame="resize_crop"))
    for order in ("best", "worst"):
        body = client.get("/api/localization", params={"method": "distcam", "reference_kind": "neighbor",
                                                       "order": order, "limit": 100}).json()
        assert body["threshold"] == pytest.approx(best) and body["frame"] == [SIZE, SIZE]
        mine = table.filter(pc.and_(pc.equal(table.column("method"), "distcam"),
                                    pc.equal(table.column("threshold"), pa.scalar(body["threshold"], pa.float32()))))
        want = sorted(mine.to_pylist(), key=lambda r: ((-1 if order == "best" else 1) * r["iou"], r["image_id"]))
        assert body["total"] == len(want) == 11  # c0_3 has no box: the stage skipped it
        assert [r["image_id"] for r in body["rows"]] == [r["image_id"] for r in want]
        for got, row in zip(body["rows"], want):
            assert got["box"] == row["box"] and got["iou"] == row["iou"] and got["correct"] == row["correct"]
            np.testing.assert_allclose(got["gt"], gt[row["image_id"]])
    thresholds = body["thresholds"]
    page = client.get("/api/localization", params={"method": "decomposition", "reference_kind": "neighbor",
                                                   "threshold": thresholds[1], "offset": 2, "limit": 3}).json()
    assert page["threshold"] == thresholds[1] and len(page["rows"]) == 3 and page["offset"] == 2
    assert client.get("/api/localization", params={"method": "decomposition", "reference_kind": "neighbor",
                                                   "threshold": 0.123}).status_code == 400
    assert client.get("/api/localization", params={"method": "nope", "reference_kind": "neighbor"}).status_code == 404
    assert client.get("/api/localization", params={"method": "distcam", "reference_kind": "neighbor",
                                                   "order": "random"}).status_code == 422
    view = client.get("/api/view/c1_2")
    assert view.status_code == 200 and view.headers["content-type"] == "image/png"
    want = display_view(decode_image(open(os.path.join(served["root"], "c1_2.png"), "rb").read()), SIZE, SIZE)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(view.content))), want.numpy())
    assert client.get("/api/view/..%2F..%2Fetc%2Fpasswd").status_code == 404


def test_browser_drives_the_explorer(served, tmp_path) -> None:
    """Headless Chromium on the live app: click a gallery image, a point, drag a box, upload; what the page
    shows equals the library (top-k ids and borders, point-map values, re-ranked order, upload top-k)."""
    import shutil
    import socket
    import threading
    import time

    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chrome, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    assert chrome and driver_bin, "Chromium and chromium-driver are needed (.ci/run installs them)"
    ex = served["explorer"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(ex), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1400"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver_bin), options=options)
    state = lambda expr: browser.execute_script(f"return window.explorerState.{expr};")  # noqa: E731
    wait = WebDriverWait(browser, 20)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        wait.until(lambda b: b.execute_script("return document.body.dataset.ready === '1';"))
        browser.find_element(By.CSS_SELECTOR, "#gallery img[data-id='c1_0']").click()
        wait.until(lambda b: state("mapsShown") and state("query") == "c1_0")
        hits = browser.find_elements(By.CSS_SELECTOR, "#topk .hit")
        expected = ex.topk("c1_0", 10)
        assert [h.get_attribute("data-id") for h in hits] == [e["image_id"] for e in expected]
        borders = [h.find_element(By.TAG_NAME, "img").get_attribute("class") for h in hits]
        assert borders == ["match" if e["match"] else "miss" for e in expected]
        assert len(hits[0].find_elements(By.CSS_SELECTOR, "canvas.map")) == len(ex.methods)

        query = browser.find_element(By.ID, "query")
        ActionChains(browser).move_to_element_with_offset(query, -40, 30).click().perform()
        wait.until(lambda b: state("pointsShown") == 1)
        row, col = state("point")
        shown = np.array(json_loads(hits[0].find_element(By.CSS_SELECTOR, "canvas.point").get_attribute(
            "data-values")))
        want = ex.point_map("c1_0", expected[0]["image_id"], row, col)
        for i, j in ((0, 0), (1, 2), (want.shape[0] - 1, want.shape[1] - 1)):
            assert shown[i, j] == pytest.approx(float(want[i, j]), rel=1e-5, abs=1e-7)

        (ActionChains(browser).move_to_element_with_offset(query, -100, -100).click_and_hold()
         .move_by_offset(80, 90).release().perform())
        wait.until(lambda b: state("hits") and b.find_element(By.ID, "mode").text == "region re-ranked")
        box = state("box")
        reranked = [h.get_attribute("data-id") for h in browser.find_elements(By.CSS_SELECTOR, "#topk .hit")]
        assert reranked == [h["image_id"] for h in ex.region_rerank("c1_0", tuple(box), 10)]

        path = os.path.join(served["root"], "c0_2.png")
        browser.find_element(By.ID, "upload").send_keys(path)
        wait.until(lambda b: b.find_element(By.ID, "mode").text == "upload")
        uploaded = [h.get_attribute("data-id") for h in browser.find_elements(By.CSS_SELECTOR, "#topk .hit")]
        assert uploaded == [h["image_id"] for h in ex.upload_topk(open(path, "rb").read(), 10)[0]]
        assert len(browser.find_elements(By.CSS_SELECTOR, "#topk .hit")[0].find_elements(By.CSS_SELECTOR,
                                                                                          "canvas.map")) == len(ex.methods)
        # localization view: choose a method and best-first; the boxes drawn are the table's for that image
        import pyarrow.compute as pc
        from selenium.webdriver.support.ui import Select

        wait.until(lambda b: state("locShown"))
        Select(browser.find_element(By.ID, "locmethod")).select_by_value("distcam|neighbor")
        wait.until(lambda b: state("locShown") and state("loc.method") == "distcam")
        Select(browser.find_element(By.ID, "locorder")).select_by_value("best")
        wait.until(lambda b: state("locShown") and state("loc.order") == "best")
        threshold = state("loc.threshold")
        table = served["run"].read("localization")
        rows = table.filter(pc.and_(pc.equal(table.column("method"), "distcam"), pc.equal(
            table.column("threshold"), pa.scalar(threshold, pa.float32())))).to_pylist()
        rows.sort(key=lambda r: (-r["iou"], r["image_id"]))
        shown = browser.find_elements(By.CSS_SELECTOR, "#localization .loc")
        assert [d.get_attribute("data-id") for d in shown] == [r["image_id"] for r in rows]
        first, row = shown[0], rows[0]
        assert json_loads(first.get_attribute("data-box")) == row["box"]
        assert float(first.get_attribute("data-iou")) == row["iou"]
        np.testing.assert_allclose(json_loads(first.get_attribute("data-gt")),
                                   served["explorer"].localization.ground_truth(row["image_id"]))
        wait.until(lambda b: first.find_element(By.TAG_NAME, "canvas").get_attribute("data-drawn") == "1")
        x0, y0, x1, y1 = row["box"]  # the predicted box's left edge is painted red where the table puts it
        pixel = browser.execute_script(
            "const c = arguments[0]; return Array.from(c.getContext('2d').getImageData(arguments[1], arguments[2], "
            "1, 1).data);", first.find_element(By.TAG_NAME, "canvas"), min(round(4 * x0), 4 * SIZE - 1),
            round(2 * (y0 + y1)))
        assert pixel[0] > 150 and pixel[1] < 100 and pixel[2] < 100, pixel

        browser.find_element(By.CSS_SELECTOR, "#gallery img[data-id='c1_0']").click()
        wait.until(lambda b: state("mapsShown") and state("query") == "c1_0")
        browser.execute_script("window.scrollTo(0, 0);")  # the localization view scrolled the page
        shot = os.environ.get("DML_RAY_EXPLORER_SCREENSHOT") or str(tmp_path / "explorer.png")
        assert browser.save_screenshot(shot)
    finally:
        browser.quit()
        server.should_exit = True
        thread.join(timeout=10)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_serve_deployment_answers_like_the_app(served, ray_session) -> None:
    """``dml-ray serve --ray-serve``'s deployment (one replica, loopback) answers real HTTP requests exactly as the
    single-process app does, and the token rule holds there too."""
    import requests

    from dml_ray.config import ServeConfig
    from pipelines.explorer_serve import deploy_explorer, undeploy_explorer

    gpus = 1 if ray_session.cluster_resources().get("GPU", 0) >= 1 else 0  # the replica's GPU path where one exists
    cfg = ServeConfig(ray_serve=True, port=_free_port(), replicas=1, gpus_per_replica=gpus)
    url = deploy_explorer(os.path.join(served["root"], "out"), "s1", None, cfg, token="s3cret")
    try:
        assert url == f"http://127.0.0.1:{cfg.port}/"
        auth = {"Authorization": "Bearer s3cret"}
        assert requests.get(url + "api/info", timeout=30).status_code == 401
        got = requests.get(url + "api/info", headers=auth, timeout=30)
        assert got.status_code == 200
        info, plain = got.json(), served["client"].get("/api/info").json()
        assert info.pop("upload_device") == ("cuda" if gpus else "cpu") and plain.pop("upload_device") == "cpu"
        assert info == plain
        for query in ("c0_1", "c2_3"):
            got = requests.get(url + "api/topk", params={"id": query, "k": 5}, headers=auth, timeout=30).json()
            assert got == served["client"].get("/api/topk", params={"id": query, "k": 5}).json()
        assert requests.get(url + "api/topk", params={"id": "../x"}, headers=auth, timeout=30).status_code == 404
        data = open(os.path.join(served["root"], "c2_3.png"), "rb").read()  # one forward in the replica
        got = requests.post(url + "api/upload", params={"k": 3}, data=data, headers=auth, timeout=60).json()
        want = served["client"].post("/api/upload", params={"k": 3}, content=data).json()
        assert [h["image_id"] for h in got["topk"]] == [h["image_id"] for h in want["topk"]]
        np.testing.assert_allclose([h["score"] for h in got["topk"]], [h["score"] for h in want["topk"]], atol=1e-4)
        first = want["topk"][0]["image_id"]
        for method, values in want["maps"][first].items():
            np.testing.assert_allclose(got["maps"][first][method], values, atol=2e-3)
    finally:
        undeploy_explorer()
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "api/info", timeout=5)
