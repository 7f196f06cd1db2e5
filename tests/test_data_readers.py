"""Dataset readers: tiny fixtures in each real format, on local disk and in ``memory://``."""
from __future__ import annotations

import io
import logging
import re
import uuid

import fsspec
import numpy as np
import pytest
import scipy.io
from PIL import Image

from dml_ray.data.cars196 import matlab_box, read_cars196
from dml_ray.data.cub import read_cub
from dml_ray.data.folder import read_folder
from dml_ray.data.inshop import read_inshop
from dml_ray.data.readers import default_ks, parse_rows, read_images
from dml_ray.data.sop import read_sop
from dml_ray.io.schemas import IMAGES_SCHEMA


@pytest.fixture(params=["local", "memory"])
def root(request: pytest.FixtureRequest, tmp_path) -> str:
    """An empty dataset root: a local absolute path or a fresh ``memory://`` folder."""
    if request.param == "local":
        yield str(tmp_path / "dataset")
        return
    uri = f"memory://dataset-{uuid.uuid4().hex}"
    yield uri
    fs, path = fsspec.core.url_to_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _put(root: str, rel: str, data: bytes | str) -> None:
    fs, base = fsspec.core.url_to_fs(root)
    path = f"{base}/{rel}"
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data.encode() if isinstance(data, str) else data)


def _image(width: int, height: int, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format=fmt)
    return buffer.getvalue()


def _read(uri: str) -> bytes:
    with fsspec.open(uri, "rb") as file:
        return file.read()


def _assert_uris(table, root: str) -> None:
    """Each uri has the root's protocol, ends with the image id and opens the same bytes."""
    for row in table.select(["image_id", "uri"]).to_pylist():
        uri, image_id = row["uri"], row["image_id"]
        assert uri.endswith("/" + image_id)
        assert uri.startswith("memory://") if root.startswith("memory://") else uri.startswith("/")
        assert _read(uri) == _read(f"{root}/{image_id}")


def _column(table, name: str) -> list:
    return table.column(name).to_pylist()


# ---- CUB-200-2011 ----

CUB_CLASSES = ["001.Alpha_bird", "002.Beta_bird", "003.Gamma_bird", "004.Delta_bird"]


def _write_cub(root: str, bboxes: bool = True) -> None:
    images, labels, boxes = [], [], []
    for image_id in range(1, 9):
        class_id = (image_id + 1) // 2
        rel = f"{CUB_CLASSES[class_id - 1]}/img_{image_id}.jpg"
        _put(root, f"images/{rel}", _image(30 + image_id, 20 + class_id))
        images.append(f"{image_id} {rel}")
        labels.append(f"{image_id} {class_id}")
        boxes.append(f"{image_id} {image_id}.0 2.0 10.5 {image_id + 4}.0")
    _put(root, "images.txt", "\n".join(images) + "\n")
    _put(root, "image_class_labels.txt", "\n".join(labels) + "\n")
    _put(root, "classes.txt", "".join(f"{i} {name}\n" for i, name in enumerate(CUB_CLASSES, start=1)))
    _put(root, "train_test_split.txt", "".join(f"{i} {i % 2}\n" for i in range(1, 9)))
    if bboxes:
        _put(root, "bounding_boxes.txt", "\n".join(boxes) + "\n")


def test_cub_zero_shot_split_labels_boxes_sizes(root):
    _write_cub(root)
    table = read_cub(root)
    assert table.schema == IMAGES_SCHEMA
    assert _column(table, "label") == [0, 0, 1, 1, 2, 2, 3, 3]
    assert _column(table, "split") == ["train"] * 4 + ["test"] * 4
    assert _column(table, "class_name")[::2] == CUB_CLASSES
    assert _column(table, "image_id")[0] == "images/001.Alpha_bird/img_1.jpg"
    assert _column(table, "bbox")[2] == {"x": 3.0, "y": 2.0, "w": 10.5, "h": 7.0}
    assert _column(table, "width") == [31, 32, 33, 34, 35, 36, 37, 38]
    assert _column(table, "height") == [21, 21, 22, 22, 23, 23, 24, 24]
    _assert_uris(table, root)


def test_cub_without_bounding_boxes_has_null_boxes(root, caplog):
    _write_cub(root, bboxes=False)
    with caplog.at_level(logging.WARNING):
        table = read_cub(root)
    assert table.column("bbox").null_count == len(table) == 8
    assert "bounding_boxes.txt" in caplog.text


def test_cub_odd_class_count_trains_on_the_floor_half(tmp_path):
    root = str(tmp_path)
    _write_cub(root)
    _put(root, "classes.txt", "".join(f"{i} {name}\n" for i, name in enumerate(CUB_CLASSES + ["005.Eps"], 1)))
    table = read_cub(root)
    assert _column(table, "split") == ["train"] * 4 + ["test"] * 4


def test_cub_missing_index_file_is_named(root):
    _write_cub(root)
    fs, base = fsspec.core.url_to_fs(root)
    fs.rm(f"{base}/images.txt")
    with pytest.raises(FileNotFoundError, match=r"missing required file .*images\.txt$"):
        read_cub(root)


def test_cub_malformed_lines_name_file_and_line(tmp_path):
    root = str(tmp_path)
    _write_cub(root)
    _put(root, "image_class_labels.txt", "1 1\n2 1\n3 two\n")
    with pytest.raises(ValueError, match=r"image_class_labels\.txt line 3: invalid literal"):
        read_cub(root)
    _put(root, "image_class_labels.txt", "1 1\n2\n")
    with pytest.raises(ValueError, match=r"image_class_labels\.txt line 2: expected 2 fields"):
        read_cub(root)
    _write_cub(root)
    _put(root, "bounding_boxes.txt", "1 1.0 2.0 3.0\n")
    with pytest.raises(ValueError, match=r"bounding_boxes\.txt line 1: expected 5 fields"):
        read_cub(root)


def test_cub_inconsistent_ids_are_errors(tmp_path):
    root = str(tmp_path)
    _write_cub(root)
    _put(root, "image_class_labels.txt", "".join(f"{i} {(i + 1) // 2}\n" for i in range(1, 8)))
    with pytest.raises(ValueError, match=r"image_class_labels\.txt: no class for image id 8"):
        read_cub(root)
    _put(root, "image_class_labels.txt", "".join(f"{i} 9\n" for i in range(1, 9)))
    with pytest.raises(ValueError, match=r"classes\.txt: no class id 9"):
        read_cub(root)


def test_missing_or_unreadable_image_is_named_and_kept(root, caplog):
    """A bad image never stops a run: it is named in a warning, kept with no size, and fails in embed."""
    _write_cub(root)
    fs, base = fsspec.core.url_to_fs(root)
    fs.rm(f"{base}/images/002.Beta_bird/img_3.jpg")
    caplog.set_level(logging.WARNING)
    table = read_cub(root)
    assert re.search(r"missing image .*img_3\.jpg", caplog.text)
    row = next(r for r in table.to_pylist() if r["image_id"].endswith("img_3.jpg"))
    assert (row["width"], row["height"]) == (None, None)
    assert table.column("width").null_count == 1
    caplog.clear()
    _put(root, "images/002.Beta_bird/img_3.jpg", b"not an image")
    assert read_cub(root).column("height").null_count == 1
    assert re.search(r"img_3\.jpg: unreadable image header", caplog.text)


# ---- Cars196 ----

CAR_NAMES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012", "BMW M3 Coupe 2012"]


def _cars_mat(classes: list[int], names: list[str] = CAR_NAMES) -> bytes:
    """A cars_annos.mat laid out as the real one: 1 x N struct array and 1 x C cell of names."""
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    annotations = np.zeros((1, len(classes)), dtype=[(f, "O") for f in fields])
    for i, class_id in enumerate(classes):
        annotations[0, i] = (
            np.array([f"car_ims/{i + 1:06d}.jpg"]),
            np.array([[3 + i]], dtype=np.uint8),
            np.array([[4]], dtype=np.uint8),
            np.array([[300 + i]], dtype=np.uint16),
            np.array([[20]], dtype=np.uint8),
            np.array([[class_id]], dtype=np.uint8),
            np.array([[i % 2]], dtype=np.uint8),
        )
    class_names = np.empty((1, len(names)), dtype=object)
    class_names[0, :] = [np.array([n]) for n in names]
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"annotations": annotations, "class_names": class_names})
    return buffer.getvalue()


def _write_cars(root: str, classes: list[int]) -> None:
    for i in range(len(classes)):
        _put(root, f"car_ims/{i + 1:06d}.jpg", _image(40 + i, 30))
    _put(root, "cars_annos.mat", _cars_mat(classes))


def test_matlab_box_converts_inclusive_one_based_corners():
    assert matlab_box(1, 1, 10, 20) == (0.0, 0.0, 10.0, 20.0)
    assert matlab_box(5, 3, 5, 3) == (4.0, 2.0, 1.0, 1.0)


def test_cars196_zero_shot_split_labels_boxes_sizes(root):
    _write_cars(root, [1, 3, 2, 4, 4])
    table = read_cars196(root)
    assert _column(table, "label") == [0, 2, 1, 3, 3]
    assert _column(table, "split") == ["train", "test", "train", "test", "test"]
    assert _column(table, "class_name") == [CAR_NAMES[c - 1] for c in [1, 3, 2, 4, 4]]
    assert _column(table, "image_id") == [f"car_ims/{i:06d}.jpg" for i in range(1, 6)]
    # x1 = 3 + i, y1 = 4, x2 = 300 + i, y2 = 20 (uint8/uint16 in the file: no overflow)
    assert _column(table, "bbox")[1] == {"x": 3.0, "y": 3.0, "w": 298.0, "h": 17.0}
    assert _column(table, "width") == [40, 41, 42, 43, 44]
    assert _column(table, "height") == [30] * 5
    _assert_uris(table, root)


def test_cars196_bad_files_are_named(tmp_path):
    root = str(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"cars_annos\.mat"):
        read_cars196(root)
    _write_cars(root, [1, 5])
    with pytest.raises(ValueError, match=r"cars_annos\.mat: annotation 2 has class 5, outside 1\.\.4"):
        read_cars196(root)
    _put(root, "cars_annos.mat", b"garbage")
    with pytest.raises(ValueError, match=r"cars_annos\.mat: not a readable MATLAB file"):
        read_cars196(root)
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"annotations": np.zeros((1, 1), dtype=[("class", "O")]), "class_names": CAR_NAMES})
    _put(root, "cars_annos.mat", buffer.getvalue())
    with pytest.raises(ValueError, match=r"annotations lack fields \['relative_im_path'"):
        read_cars196(root)


# ---- Stanford Online Products ----

SOP_HEADER = "image_id class_id super_class_id path\n"


def _write_sop(root: str) -> None:
    train = [
        (1, 1, 1, "bicycle_final/111_0.JPG"),
        (2, 1, 1, "bicycle_final/111_1.JPG"),
        (3, 2, 1, "bicycle_final/222_0.JPG"),
    ]
    test = [(4, 11319, 2, "cabinet_final/333_0.JPG"), (5, 11320, 2, "cabinet_final/444_0.JPG")]
    for rows, name in ((train, "Ebay_train.txt"), (test, "Ebay_test.txt")):
        _put(root, name, SOP_HEADER + "".join(" ".join(map(str, row)) + "\n" for row in rows))
        for image_id, _, _, path in rows:
            _put(root, path, _image(50, 40 + image_id))


def test_sop_split_by_file_labels_names(root):
    _write_sop(root)
    table = read_sop(root)
    assert _column(table, "split") == ["train", "train", "train", "test", "test"]
    assert _column(table, "label") == [0, 0, 1, 2, 3]
    assert _column(table, "class_name") == [
        "bicycle_final/1", "bicycle_final/1", "bicycle_final/2", "cabinet_final/11319", "cabinet_final/11320"
    ]
    assert _column(table, "image_id")[0] == "bicycle_final/111_0.JPG"
    assert table.column("bbox").null_count == 5
    assert _column(table, "height") == [41, 42, 43, 44, 45]
    _assert_uris(table, root)


def test_sop_header_and_files_are_checked(tmp_path):
    root = str(tmp_path)
    _write_sop(root)
    _put(root, "Ebay_test.txt", "4 11319 2 cabinet_final/333_0.JPG\n")
    with pytest.raises(ValueError, match=r"Ebay_test\.txt line 1: expected header 'image_id class_id super_cl"):
        read_sop(root)
    (tmp_path / "Ebay_test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"Ebay_test\.txt"):
        read_sop(root)


# ---- In-Shop ----

INSHOP_ROWS = [
    ("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
    ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
    ("img/MEN/Denim/id_00000001/01_1_front.jpg", "id_00000001", "train"),
    ("img/MEN/Denim/id_00000007/01_1_front.jpg", "id_00000007", "query"),
    ("img/MEN/Denim/id_00000007/01_2_side.jpg", "id_00000007", "gallery"),
    ("img/MEN/Denim/id_00000005/01_1_front.jpg", "id_00000005", "gallery"),
]


def _write_inshop(root: str, layout: str = "flat", bboxes: bool = True) -> None:
    partition_dir, bbox_dir, image_dir = ("", "", "") if layout == "flat" else ("Eval/", "Anno/", "Img/")
    lines = [f"{len(INSHOP_ROWS)}", "image_name item_id evaluation_status"]
    lines += [f"{name}{' ' * 20}{item} {status}" for name, item, status in INSHOP_ROWS]
    _put(root, f"{partition_dir}list_eval_partition.txt", "\n".join(lines) + "\n")
    boxes = [f"{len(INSHOP_ROWS)}", "image_name  clothes_type  pose_type  x_1  y_1  x_2  y_2"]
    boxes += [f"{name}  1  1  0{10 + i}  020  {100 + i}  235" for i, (name, _, _) in enumerate(INSHOP_ROWS)]
    if bboxes:
        _put(root, f"{bbox_dir}list_bbox_inshop.txt", "\n".join(boxes) + "\n")
    for i, (name, _, _) in enumerate(INSHOP_ROWS):
        _put(root, image_dir + name, _image(256, 250 + i))


def test_inshop_query_gallery_share_labels(root):
    _write_inshop(root)
    table = read_inshop(root)
    assert _column(table, "split") == ["train", "train", "train", "query", "gallery", "gallery"]
    assert _column(table, "label") == [1, 1, 0, 3, 3, 2]
    assert _column(table, "class_name")[3] == "id_00000007"
    assert _column(table, "image_id")[0] == INSHOP_ROWS[0][0]
    assert _column(table, "bbox")[1] == {"x": 11.0, "y": 20.0, "w": 90.0, "h": 215.0}
    assert _column(table, "height") == [250, 251, 252, 253, 254, 255]
    _assert_uris(table, root)


def test_inshop_distributed_layout_without_boxes(tmp_path):
    root = str(tmp_path)
    _write_inshop(root, layout="distributed", bboxes=False)
    table = read_inshop(root)
    assert _column(table, "image_id")[0] == "Img/" + INSHOP_ROWS[0][0]
    assert table.column("bbox").null_count == len(INSHOP_ROWS)
    assert _column(table, "width") == [256] * len(INSHOP_ROWS)


def test_inshop_bad_status_and_count_are_errors(tmp_path):
    root = str(tmp_path)
    _write_inshop(root)
    _put(root, "list_eval_partition.txt", "1\nimage_name item_id evaluation_status\nimg/a.jpg id_1 val\n")
    with pytest.raises(ValueError, match=r"list_eval_partition\.txt line 3: evaluation_status 'val' not one of"):
        read_inshop(root)
    _put(root, "list_eval_partition.txt", "2\nimage_name item_id evaluation_status\nimg/a.jpg id_1 train\n")
    with pytest.raises(ValueError, match=r"list_eval_partition\.txt line 1: count '2' does not match the 1 rows"):
        read_inshop(root)


# ---- image folder ----


def test_folder_classes_sorted_first_half_train(root):
    for rel in ["dog/x.jpg", "cat/b.png", "cat/a.jpg", "eel/sub/y.jpg", "fox/z.JPG", ".hidden/h.jpg", "cat/.h.jpg"]:
        _put(root, rel, _image(20, 10, "PNG" if rel.endswith("png") else "JPEG"))
    _put(root, "notes.jpg", _image(20, 10))
    _put(root, "cat/readme.txt", "not an image")
    table = read_folder(root)
    assert _column(table, "image_id") == ["cat/a.jpg", "cat/b.png", "dog/x.jpg", "eel/sub/y.jpg", "fox/z.JPG"]
    assert _column(table, "label") == [0, 0, 1, 2, 3]
    assert _column(table, "class_name") == ["cat", "cat", "dog", "eel", "fox"]
    assert _column(table, "split") == ["train", "train", "train", "test", "test"]
    assert _column(table, "width") == [20] * 5
    _assert_uris(table, root)


def test_folder_missing_or_empty_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_folder(str(tmp_path / "nowhere"))
    _put(str(tmp_path), "cat/readme.txt", "no images")
    with pytest.raises(ValueError, match=r"no images under .*<root>/<class_name>/<image>"):
        read_folder(str(tmp_path))


# ---- dispatch and shared parsing ----


def test_read_images_dispatches_by_kind(tmp_path):
    root = str(tmp_path)
    _write_cub(root)
    assert read_images("synthetic", root).equals(read_cub(root))
    assert read_images("cub", root).equals(read_cub(root))
    with pytest.raises(ValueError, match="unknown dataset kind 'coco'; expected one of: synthetic, cub, cars196"):
        read_images("coco", root)
    with pytest.raises(ValueError, match="dataset root is empty"):
        read_images("cub", "")


def test_default_ks_follow_the_paper_protocols():
    for kind in ("cub", "cars196", "synthetic", "folder"):
        assert default_ks(kind) == [1, 2, 4, 8]
    assert default_ks("sop") == [1, 10, 100, 1000]
    assert default_ks("inshop") == [1, 10, 20, 30, 40]
    with pytest.raises(ValueError, match="unknown dataset kind"):
        default_ks("imagenet")


def test_parse_rows_last_field_keeps_spaces_and_blank_lines_skip():
    text = "2\nid name\n1 a b c\n\n2 d\n"
    assert parse_rows(text, "f.txt", (int, str), header=("id", "name"), skip=1) == [(1, "a b c"), (2, "d")]
