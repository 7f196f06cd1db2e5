"""Explorer latency on synthetic runs: top-10 + 3 pair maps at 10k rows, region re-ranking at 100k rows.

A synthetic run is written (random L2-normalised 512-d embeddings, fp16 7 x 7 feature maps with the channels of
a tiny_cnn head mapping them to 512-d) and opened with ``dml_ray.serve.Explorer``, the object every endpoint
calls. Reported separately: the first request (Explorer construction: index build and save, model load, plus
the first query), then p50 / p95 over ``--requests`` random queries. Baseline side by side: the exact search of
the same queries with ``retrieval.search.knn_search`` over the in-memory matrix.

    python bench/serve_latency.py --rows 10000 --region-rows 100000 --requests 50
"""
from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time

import faiss
import numpy as np
import pyarrow as pa
import torch

import dml_ray
from dml_ray.config import ModelConfig
from dml_ray.io.schemas import embedding_type
from dml_ray.models.checkpoint import checkpoint_bytes
from dml_ray.models.embedding import build_model
from dml_ray.retrieval.search import knn_search
from dml_ray.serve.explorer import Explorer

DIM, GRID = 512, 7


def synthetic_run(root: str, rows: int, maps_rows: int, seed: int = 0) -> dml_ray.Run:
    """A run with ``rows`` embeddings and feature maps for the first ``maps_rows`` of them."""
    rng = np.random.default_rng(seed)
    run = dml_ray.open_run(root, "bench", create=True)
    cfg = ModelConfig(backbone="tiny_cnn", embedding_dim=DIM)
    torch.manual_seed(seed)
    model = build_model(cfg, 224).eval()
    run.write_bytes(run.path("model", "model.pt"), checkpoint_bytes(model, cfg, 224, [], extra={"resize": 224}))
    channels = model.backbone.out_channels
    emb = rng.normal(size=(rows, DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = pa.array([f"img{i:07d}" for i in range(rows)])
    labels = pa.array(rng.integers(0, 100, rows), pa.int64())
    common = {"run_id": pa.array(["bench"] * rows), "image_id": ids, "label": labels,
              "split": pa.array(["test"] * rows), "model_id": pa.array(["tiny_cnn-bench"] * rows)}
    m = maps_rows
    a = rng.random((m, channels * GRID * GRID), dtype=np.float32).astype(np.float16)
    offsets = pa.array(np.arange(m + 1, dtype=np.int32) * channels * GRID * GRID)
    with torch.no_grad():
        _, bias = model.equivalent_features(torch.from_numpy(a[:1].astype(np.float32).reshape(1, channels, GRID, GRID)))
    run.commit("feature_maps", pa.table({
        **{k: v.slice(0, m) for k, v in common.items()},
        "channels": pa.array(np.full(m, channels, np.int32)), "map_h": pa.array(np.full(m, GRID, np.int32)),
        "map_w": pa.array(np.full(m, GRID, np.int32)),
        "feature_map": pa.ListArray.from_arrays(offsets, pa.array(a.reshape(-1), pa.float16())),
        "gap_feature": pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(m, channels, -1).mean(-1).reshape(-1)
                                                                  .astype(np.float32)), channels),
        "bias": pa.FixedSizeListArray.from_arrays(pa.array(np.tile(bias.numpy(), (m, 1)).reshape(-1)), DIM)}))
    run.commit("embeddings", pa.table({
        **common, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), DIM).cast(
            embedding_type(DIM)), "norm": pa.array(np.ones(rows, np.float32))}))
    return run


def percentiles(seconds: list[float]) -> str:
    ms = np.array(seconds) * 1000
    return f"p50 {np.percentile(ms, 50):7.1f} ms  p95 {np.percentile(ms, 95):7.1f} ms"


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--region-rows", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="the explorer's torch / faiss threads (num_threads)")
    parser.add_argument("--compare-threads", type=int, default=2,
                        help="side by side: the same requests, interleaved, with this many threads (0: off)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rng = np.random.default_rng(1)
    arms = [args.threads] + ([args.compare_threads] if args.compare_threads else [])
    tmp = tempfile.mkdtemp(prefix="serve-bench-")
    try:
        run = synthetic_run(f"{tmp}/a", args.rows, args.rows)
        start = time.perf_counter()
        ex = Explorer(run, methods=["decomposition", "decomposition_bias", "distcam"], num_threads=args.threads)
        first_query = ex.ids[0]
        for hit in ex.topk(first_query, 10)[:3]:
            ex.pair_maps(first_query, hit["image_id"])
        first = time.perf_counter() - start
        times: dict[int, list[float]] = {n: [] for n in arms}
        base = []
        for i in range(args.requests):
            for n in arms[i % 2:] + arms[:i % 2]:  # alternate which arm goes first
                set_threads(n)
                query = ex.ids[int(rng.integers(1, args.rows))]  # a fresh query per arm: no shared cache hits
                t0 = time.perf_counter()
                hits = ex.topk(query, 10)
                for hit in hits[:3]:
                    ex.pair_maps(query, hit["image_id"])
                times[n].append(time.perf_counter() - t0)
            set_threads(args.threads)
            r = ex.row_of[query]
            t0 = time.perf_counter()
            knn_search(ex.embeddings[r:r + 1].numpy(), ex.embeddings.numpy(), 11)
            base.append(time.perf_counter() - t0)
        print(f"top-10 + 3 maps, {args.rows} rows, d={DIM}, {GRID}x{GRID} maps, "
              f"first request (explorer construction: index build, model load; the request) {first * 1000:.0f} ms")
        for n in arms:
            print(f"  explorer top-10 + 3 maps, {n} thread(s): {percentiles(times[n])}")
        print(f"  baseline exact knn_search top-11 only, {args.threads} thread(s): {percentiles(base)}")

        run = synthetic_run(f"{tmp}/b", args.region_rows, 64, seed=2)
        start = time.perf_counter()
        ex = Explorer(run, methods=["decomposition"], num_threads=args.threads)
        ex.region_rerank(ex.ids[0], (0, 0, 112, 112), 10)
        first = time.perf_counter() - start
        times = {n: [] for n in arms}
        for i in range(args.requests):
            for n in arms[i % 2:] + arms[:i % 2]:
                set_threads(n)
                x, y = rng.integers(0, 150, 2)
                query = ex.ids[int(rng.integers(1, 64))]
                t0 = time.perf_counter()
                ex.region_rerank(query, (float(x), float(y), 64.0, 64.0), 10)
                times[n].append(time.perf_counter() - t0)
        start = time.perf_counter()  # a later open of the same run loads the saved index
        again = Explorer(run, methods=["decomposition"], num_threads=args.threads)
        again.region_rerank(again.ids[1], (0, 0, 112, 112), 10)
        reopen = time.perf_counter() - start
        del again
        print(f"region re-ranking, {args.region_rows} rows: first request {first * 1000:.0f} ms "
              f"(index built and saved); on a later open {reopen * 1000:.0f} ms (index loaded)")
        for n in arms:
            print(f"  explorer region re-rank top-10, {n} thread(s): {percentiles(times[n])}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
