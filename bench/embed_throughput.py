"""Ray Data embedding pipeline vs a bare single-process torch loop, side by side in one run.

The bare loop gets the same images already decoded and transformed in memory, the same model
(random-init resnet50 by default, 224 x 224), the same batch size and the same torch thread count.
The pipeline is timed end to end (read bytes via fsspec, decode, transform, model actor, Parquet
commit), with Ray already started, as a user's job would see it.

    python bench/embed_throughput.py --images 384 --threads 2
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time

import torch

from dml_ray.io.run import open_run
from dml_ray.config import DataConfig, EmbedConfig, ModelConfig
from dml_ray.data.batches import decode_batch, fetch_bytes
from dml_ray.data.readers import read_images
from dml_ray.data.synthetic import generate_synthetic
from dml_ray.models.checkpoint import checkpoint_bytes, save_checkpoint
from dml_ray.models.embedding import build_model
from pipelines.embed import run_embed
from pipelines.ray_env import ensure_ray


def bare_loop(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> float:
    """Seconds for a plain inference loop over pre-decoded images."""
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            model(images[i:i + batch_size])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    work = tempfile.mkdtemp(prefix="bench-embed-")
    per_class = 16
    generate_synthetic(f"{work}/data", n_classes=-(-args.images // per_class), images_per_class=per_class,
                       image_size=args.size + 32, seed=0)
    images = read_images("cub", f"{work}/data").slice(0, args.images)
    images = images.set_column(images.schema.get_field_index("split"), "split",
                               [["train"] * images.num_rows])
    data = DataConfig(kind="cub", resize=args.size + 32, image_size=args.size)
    mcfg = ModelConfig(backbone=args.backbone, pooling="gap", embedding_dim=512)
    model = build_model(mcfg, args.size).eval()
    ckpt = f"{work}/model.pt"
    save_checkpoint(ckpt, checkpoint_bytes(model, mcfg, args.size, []))

    decoded = torch.from_numpy(decode_batch(fetch_bytes(images), data.resize, data.image_size)["image"])
    bare_loop(model, decoded[: 4 * args.batch_size], args.batch_size)  # warm-up: oneDNN primitives, allocator
    bare_s = bare_loop(model, decoded, args.batch_size)

    ensure_ray(num_cpus=2)
    cfg = EmbedConfig(batch_size=args.batch_size, concurrency=1, cpus_per_actor=1)
    result = run_embed(images, ckpt, open_run(work, "bench", create=True), data, cfg, num_threads=args.threads)
    pipe_s = result.seconds

    n = images.num_rows
    print(f"{args.backbone} {args.size}x{args.size}, {n} images, batch {args.batch_size}, {args.threads} threads")
    print(f"bare torch loop (pre-decoded in memory): {n / bare_s:8.2f} images/s ({bare_s:.1f} s)")
    print(f"Ray Data pipeline (end to end)         : {n / pipe_s:8.2f} images/s ({pipe_s:.1f} s, {result.rows} rows)")
    print(f"ratio pipeline / bare                  : {bare_s / pipe_s:8.3f}")


if __name__ == "__main__":
    main()
