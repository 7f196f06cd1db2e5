"""Activation maps: vectorised vs naive definitions, and the maps stage's cost relative to embedding.

Two measurements, side by side in one run:
1. Decomposition overall maps + point-to-point maps for a batch of pairs: the vectorised einsums of
   ``dml_ray.explain`` vs the four-loop definition (activation-decomposition-tip2021 Eq. 5).
2. The dataset-scale maps stage against the embedding pass over the same images (Ray Data, resnet50
   at 224 x 224 by default): extra cost of storing feature maps in the embedding pass plus the maps stage
   (Decomposition, Decomposition+Bias, Dist-CAM; neighbour and prototype references), as a fraction
   of a plain embedding pass; the Grad-CAM family (one head backward) is reported alongside.

    python bench/explain.py --images 256
"""
from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time

import numpy as np
import torch

from dml_ray.io.run import open_run
from dml_ray.config import DataConfig, EmbedConfig, ExplainConfig, ModelConfig
from dml_ray.data.readers import read_images
from dml_ray.data.synthetic import generate_synthetic
from dml_ray.explain.decomposition import decomposition_bias_map, decomposition_map, point_to_point_map
from dml_ray.models.checkpoint import checkpoint_bytes, save_checkpoint
from dml_ray.models.embedding import build_model
from dml_ray.models.heads import EmbeddingHead
from pipelines.embed import run_embed
from pipelines.explain import run_explain
from pipelines.ray_env import ensure_ray


def naive_maps(e_q, e_r, raw_q, raw_r, bias_r, lib):
    """The definitions as four loops: P[i,j,x,y] = e^q_ij . e^r_xy / Z, then the overall maps.

    ``lib`` is numpy or torch: the same loops over numpy arrays or torch tensors (as research code has them).
    """
    b, h, w, _ = e_q.shape
    p = lib.zeros((b, h, w, h, w), dtype=lib.float64)
    dec, dec_bias = lib.zeros((b, h, w), dtype=lib.float64), lib.zeros((b, h, w), dtype=lib.float64)
    for n in range(b):
        z = lib.linalg.norm(raw_q[n]) * lib.linalg.norm(raw_r[n])
        for i in range(h):
            for j in range(w):
                for x in range(h):
                    for y in range(w):
                        p[n, i, j, x, y] = e_q[n, i, j] @ e_r[n, x, y] / z
                dec[n, i, j] = p[n, i, j].sum()
                dec_bias[n, i, j] = dec[n, i, j] + e_q[n, i, j] @ bias_r[n] / z
    return p, dec, dec_bias


def bench_vectorised(pairs: int, channels: int, dim: int, side: int) -> None:
    torch.manual_seed(0)
    head = EmbeddingHead(channels, "gap", dim, bn=True).eval()
    a = torch.relu(torch.randn(2 * pairs, channels, side, side))
    with torch.no_grad():
        e, bias = head.equivalent_features(a)
        raw = e.sum(dim=(1, 2)) + bias
    e_q, e_r, raw_q, raw_r, bias_r = e[:pairs], e[pairs:], raw[:pairs], raw[pairs:], bias[pairs:]
    inputs = (e_q, e_r, raw_q, raw_r, bias_r)
    start = time.perf_counter()
    p_ref, dec_ref, decb_ref = naive_maps(*(t.double().numpy() for t in inputs), lib=np)
    naive_np_s = time.perf_counter() - start
    start = time.perf_counter()
    naive_torch = naive_maps(*(t.double() for t in inputs), lib=torch)
    naive_s = time.perf_counter() - start
    assert all(np.allclose(a.numpy(), b) for a, b in zip(naive_torch, (p_ref, dec_ref, decb_ref)))
    reps = 20
    start = time.perf_counter()
    for _ in range(reps):
        p = point_to_point_map(e_q, e_r, raw_q, raw_r)
        dec = decomposition_map(e_q, raw_q, raw_r, bias_r)
        decb = decomposition_bias_map(e_q, raw_q, raw_r)
    fast_s = (time.perf_counter() - start) / reps
    err = max(float(np.abs(p.numpy() - p_ref).max()), float(np.abs(dec.numpy() - dec_ref).max()),
              float(np.abs(decb.numpy() - decb_ref).max()))
    print(f"[1] {pairs} pairs, {side}x{side} grid, d={dim}: decomposition overall + point-to-point maps")
    print(f"    naive four loops, torch tensors: {naive_s * 1e3:10.1f} ms")
    print(f"    naive four loops, numpy arrays : {naive_np_s * 1e3:10.1f} ms")
    print(f"    vectorised (einsum)            : {fast_s * 1e3:10.3f} ms   (max abs difference {err:.1e})")
    print(f"    speed-up vs torch loops        : {naive_s / fast_s:10.0f}x   (target >= 200x)")
    print(f"    speed-up vs numpy loops        : {naive_np_s / fast_s:10.0f}x")


def bench_stage(n_images: int, backbone: str, size: int, threads: int) -> None:
    work = tempfile.mkdtemp(prefix="bench-explain-")
    per_class = 16
    generate_synthetic(f"{work}/data", n_classes=-(-n_images // per_class), images_per_class=per_class,
                       image_size=size + 32, seed=0)
    images = read_images("cub", f"{work}/data").slice(0, n_images)
    data = DataConfig(kind="cub", resize=size + 32, image_size=size)
    mcfg = ModelConfig(backbone=backbone, pooling="gap", embedding_dim=512)
    ckpt = f"{work}/model.pt"
    save_checkpoint(ckpt, checkpoint_bytes(build_model(mcfg, size).eval(), mcfg, size, []))
    ensure_ray(num_cpus=2)
    plain = EmbedConfig(batch_size=32, cpus_per_actor=1, incremental=False)  # every run embeds every image
    with_maps = EmbedConfig(batch_size=32, cpus_per_actor=1, feature_maps=True, incremental=False)
    run_embed(images.slice(0, 32), ckpt, open_run(work, "warmup", create=True), data, plain, threads)
    t_plain = run_embed(images, ckpt, open_run(work, "plain", create=True), data, plain, threads).seconds
    t_fm = run_embed(images, ckpt, open_run(work, "maps", create=True), data, with_maps, threads).seconds
    shutil.copytree(f"{work}/runs/maps", f"{work}/runs/grad")
    fast = ExplainConfig(methods=["decomposition", "decomposition_bias", "distcam"], batch_size=32)
    grad = ExplainConfig(methods=["gradcam", "gradcam_nonorm", "rgradcam"], batch_size=32)
    maps = run_explain(ckpt, open_run(work, "maps"), fast, ["test"], threads)
    grads = run_explain(ckpt, open_run(work, "grad"), grad, ["test"], threads)
    extra = (t_fm - t_plain) + maps.seconds
    print(f"[2] {n_images} images, {backbone} {size}x{size}, {threads} threads, explained split: test")
    print(f"    embedding pass (plain)                 : {t_plain:7.1f} s")
    print(f"    embedding pass storing feature maps    : {t_fm:7.1f} s")
    print(f"    maps stage, decomposition x2 + Dist-CAM: {maps.seconds:7.1f} s ({maps.rows} rows)")
    print(f"    maps stage, Grad-CAM family            : {grads.seconds:7.1f} s ({grads.rows} rows)")
    print(f"    decomposition + Dist-CAM added cost    : {100 * extra / t_plain:7.1f} % of embedding (target <= 25%)")
    print(f"    Grad-CAM family added cost             : {100 * ((t_fm - t_plain) + grads.seconds) / t_plain:7.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--skip-stage", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    bench_vectorised(args.pairs, channels=2048, dim=512, side=7)
    if not args.skip_stage:
        bench_stage(args.images, args.backbone, args.size, args.threads)


if __name__ == "__main__":
    main()
