"""A tiny nightly setup for the job tests: a CUB-format dataset with one corrupt image, a fixed checkpoint, a config."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import yaml

from dml_ray.config import ModelConfig
from dml_ray.data.readers import read_images
from dml_ray.data.synthetic import generate_synthetic
from dml_ray.io.fs import join, url_to_fs
from dml_ray.models.checkpoint import checkpoint_bytes, save_checkpoint
from dml_ray.models.embedding import build_model

SIZE = 48
N_CLASSES, PER_CLASS = 5, 10  # 50 images: one corrupt image is 2 %


def write_nightly_setup(config_path: Path, data_root: str, output_root: str,
                        storage_options: Optional[dict] = None) -> dict:
    """Write the dataset, the checkpoint and the config file; returns their locations and the corrupt image id."""
    generate_synthetic(data_root, N_CLASSES, PER_CLASS, SIZE, seed=3, storage_options=storage_options)
    images = read_images("cub", data_root, storage_options)
    corrupt = images.column("image_id")[7].as_py()
    fs, path = url_to_fs(images.column("uri")[7].as_py(), storage_options)
    fs.pipe_file(path, b"\xff\xd8 not a jpeg any more")
    model = ModelConfig(backbone="tiny_cnn", embedding_dim=16)
    torch.manual_seed(0)
    checkpoint = join(data_root, "model.pt")
    save_checkpoint(checkpoint, checkpoint_bytes(build_model(model, SIZE).eval(), model, SIZE, []), storage_options)
    config = {
        "output_root": output_root,
        "num_threads": 1,
        "stages": ["data", "embed", "evaluate", "knn"],
        "data": {"kind": "cub", "root": data_root, "resize": SIZE, "image_size": SIZE,
                 "storage_options": storage_options or {}},
        "model": {"backbone": "tiny_cnn", "embedding_dim": 16, "weights": checkpoint},
        "embed": {"batch_size": 16, "feature_maps": True, "max_error_fraction": 0.05},
        "evaluate": {"query_shards": 1, "ks": [1, 2], "splits": ["test"]},
        "knn": {"k1": 4, "batch_size": 4, "shards": 1},
    }
    config_path.write_text(yaml.safe_dump(config))
    return {"config": str(config_path), "data": data_root, "out": output_root, "corrupt": corrupt,
            "images": images.num_rows, "uris": images.column("uri").to_pylist()}
