"""The synthetic CUB-200-2011 generator: layout, determinism, exact boxes, learnable classes."""
from __future__ import annotations

import io
import re
import time
import uuid

import fsspec
import numpy as np
import pytest
from PIL import Image

from dml_ray.data.cub import read_cub
from dml_ray.data.synthetic import MAX_CLASSES, _class_spec, _render, generate_synthetic

INDEX_FILES = ("images.txt", "image_class_labels.txt", "classes.txt", "train_test_split.txt", "bounding_boxes.txt")


@pytest.fixture()
def memory_root() -> str:
    """A fresh ``memory://`` root, removed afterwards."""
    uri = f"memory://synthetic-{uuid.uuid4().hex}"
    yield uri
    fs, path = fsspec.core.url_to_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _files(root: str) -> dict[str, bytes]:
    """Every file under ``root`` by path relative to it."""
    fs, base = fsspec.core.url_to_fs(root)
    return {path[len(base) + 1 :]: fs.cat_file(path) for path in fs.find(base)}


def _pixels(uri: str, mode: str = "RGB") -> np.ndarray:
    with fsspec.open(uri, "rb") as file:
        return np.asarray(Image.open(io.BytesIO(file.read())).convert(mode), dtype=np.float64)


def _object_pixels(hsv: np.ndarray) -> np.ndarray:
    """Object-like pixels: saturated colour or dark; the background is low-saturation mid grey."""
    return (hsv[..., 1] > 0.4 * 255) | (hsv[..., 2] < 0.3 * 255)


def _edges(box: dict) -> np.ndarray:
    return np.array([box["x"], box["y"], box["x"] + box["w"], box["y"] + box["h"]])


def test_writes_the_cub_layout(memory_root):
    assert generate_synthetic(memory_root, n_classes=4, images_per_class=3, image_size=48) == memory_root
    files = _files(memory_root)
    assert set(INDEX_FILES) <= set(files)
    assert sum(name.startswith("images/") and name.endswith(".jpg") for name in files) == 12
    classes = files["classes.txt"].decode().splitlines()
    assert classes[0] == "1 001.Red_Solid_Ellipse" and len(classes) == 4
    images = files["images.txt"].decode().splitlines()
    assert images[0] == "1 001.Red_Solid_Ellipse/Red_Solid_Ellipse_0001.jpg"
    assert files["image_class_labels.txt"].decode().splitlines()[3:5] == ["4 2", "5 2"]
    assert re.fullmatch(r"12 [01]", files["train_test_split.txt"].decode().splitlines()[-1])
    for line in files["bounding_boxes.txt"].decode().splitlines():
        assert re.fullmatch(r"\d+( \d+\.\d){4}", line)


def test_read_back_by_the_cub_reader(memory_root):
    generate_synthetic(memory_root, n_classes=5, images_per_class=4, image_size=64)
    table = read_cub(memory_root)
    assert len(table) == 20
    assert table.column("label").to_pylist() == [c for c in range(5) for _ in range(4)]
    assert table.column("split").to_pylist() == ["train"] * 8 + ["test"] * 12
    assert set(table.column("width").to_pylist()) == set(table.column("height").to_pylist()) == {64}
    assert table.column("bbox").null_count == 0
    assert len(set(table.column("class_name").to_pylist())) == 5


def test_same_arguments_same_bytes_on_any_file_system(memory_root, tmp_path):
    generate_synthetic(memory_root, n_classes=3, images_per_class=3, image_size=40, seed=7)
    generate_synthetic(str(tmp_path), n_classes=3, images_per_class=3, image_size=40, seed=7)
    assert _files(memory_root) == _files(str(tmp_path))
    other = f"{memory_root}-seed8"
    generate_synthetic(other, n_classes=3, images_per_class=3, image_size=40, seed=8)
    first, second = _files(memory_root), _files(other)
    fsspec.filesystem("memory").rm(fsspec.core.url_to_fs(other)[1], recursive=True)
    assert first["classes.txt"] == second["classes.txt"]
    assert all(first[name] != second[name] for name in first if name.endswith(".jpg"))


def test_boxes_are_inside_and_mark_the_object(memory_root):
    size = 96
    generate_synthetic(memory_root, n_classes=20, images_per_class=3, image_size=size, seed=1)
    for row in read_cub(memory_root).to_pylist():
        x0, y0, x1, y1 = _edges(row["bbox"])
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        # the object spans roughly 25-60% of the side
        assert 0.2 * size <= max(x1 - x0, y1 - y0) <= 0.75 * size
        rgb = _pixels(row["uri"])
        inside = np.zeros((size, size), dtype=bool)
        inside[int(y0) : int(y1), int(x0) : int(x1)] = True
        assert np.abs(rgb[inside].mean(axis=0) - rgb[~inside].mean(axis=0)).max() > 15
        # after JPEG, object-like pixels fill the box to within a few pixels and never lie outside it
        ys, xs = np.nonzero(_object_pixels(_pixels(row["uri"], "HSV")))
        found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        assert np.all(np.abs(found - [x0, y0, x1, y1]) <= 4), (row["image_id"], found, row["bbox"])
        assert found[0] >= x0 - 2 and found[1] >= y0 - 2 and found[2] <= x1 + 2 and found[3] <= y1 + 2


def test_rendered_box_is_the_exact_tight_box_of_the_object():
    for class_index in range(60):
        image, (x, y, w, h) = _render(_class_spec(class_index), np.random.default_rng([2, class_index]), 64)
        ys, xs = np.nonzero(_object_pixels(np.asarray(image.convert("HSV"), dtype=np.float64)))
        assert (xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) == (x, y, w, h)


def test_all_classes_are_distinct():
    specs = [_class_spec(i) for i in range(MAX_CLASSES)]
    assert len({(s.shape, s.pattern, s.part, s.colour) for s in specs}) == MAX_CLASSES
    assert len({s.name for s in specs}) == MAX_CLASSES
    # consecutive classes differ in every attribute
    a, b = _class_spec(10), _class_spec(11)
    assert a.shape != b.shape and a.pattern != b.pattern and a.part != b.part and a.colour != b.colour


def test_classes_are_learnable_from_the_boxed_object(memory_root):
    """Leave-one-out 1-NN on 8 x 8 thumbnails of the box crops separates the 20 classes."""
    generate_synthetic(memory_root)
    rows = read_cub(memory_root).to_pylist()
    features, labels = [], np.array([row["label"] for row in rows])
    for row in rows:
        x0, y0, x1, y1 = _edges(row["bbox"])
        with fsspec.open(row["uri"], "rb") as file:
            crop = Image.open(io.BytesIO(file.read())).convert("RGB").crop((x0, y0, x1, y1)).resize((8, 8))
        features.append(np.asarray(crop, dtype=np.float64).ravel())
    features = np.stack(features)
    distances = ((features[:, None] - features[None]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    assert (labels[distances.argmin(axis=1)] == labels).mean() > 0.8


def test_default_size_is_fast(memory_root):
    """20 classes x 12 images at 96 px take well under 2 s of CPU (CPU time: immune to machine load)."""
    start = time.process_time()
    generate_synthetic(memory_root, n_classes=20, images_per_class=12, image_size=96)
    assert time.process_time() - start < 2.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_classes": 0}, "n_classes 0 outside 1..1260"),
        ({"n_classes": MAX_CLASSES + 1}, "n_classes 1261 outside"),
        ({"images_per_class": 0}, "images_per_class 0 must be at least 1"),
        ({"image_size": 8}, "image_size 8 must be at least 16"),
        ({"seed": -1}, "seed -1 must be non-negative"),
    ],
)
def test_bad_arguments_are_errors(memory_root, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        generate_synthetic(memory_root, **kwargs)
