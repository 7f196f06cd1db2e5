"""Reciprocal kNN batches (intra-batch-mpn-reproduction Sec. 3.4): vectorised vs research-style loop, at scale.

Cases, each run in its own subprocess so that its wall time and peak resident memory
(``ru_maxrss``, which sees faiss's allocations too) are its own:

  a  N = 10,000, d = 512: ``knn_graph`` (exact) + ``reciprocal_batches`` vs a dense
     implementation written like research code (N x N distance matrix, argsort, a Python loop
     per query, as the authors' ``KReciprocalSampler``); the batches must be identical.
     Integer-valued embeddings with squared L2 make every distance exact in float32, so both
     sides see the same distances (and real ties, broken by the smaller index on both sides).
  b  N = 200,000, d = 128: the pipeline with exact search (cosine).
  c  N = 1,000,000, d = 128: the pipeline with an approximate index (IVF by default, cosine);
     the graph's recall against exact search on 1,000 sampled queries (the query itself left out).

Embeddings: Gaussian blobs (``--cluster-size`` items per blob), L2-normalised for b and c.

    python bench/reciprocal_knn.py --cases a,b,c
    python bench/reciprocal_knn.py --cases a --n 3000      # quick
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from dml_ray.retrieval.knn_graph import build_ann_index, knn_graph_rows, knn_recall
from dml_ray.retrieval.reciprocal import half_k, reciprocal_batches

DEFAULTS = {"a": (10_000, 512), "b": (200_000, 128), "c": (1_000_000, 128)}
RECALL_QUERIES = 1_000


def blobs(n: int, d: int, cluster_size: int, seed: int, integer: bool) -> np.ndarray:
    """Gaussian blobs: integer-valued (case a) or L2-normalised float32."""
    rng = np.random.default_rng(seed)
    n_blobs = max(1, n // cluster_size)
    centres = rng.normal(scale=1.5 if integer else 1.0, size=(n_blobs, d)).astype(np.float32)
    x = centres[rng.integers(n_blobs, size=n)]
    x += rng.normal(scale=2.0 if integer else 0.7, size=(n, d)).astype(np.float32)
    if integer:
        return np.round(x)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def dense_research_style(
    x: np.ndarray, k: int, batch_size: int, alpha: float = 2 / 3
) -> tuple[list, np.ndarray, dict[str, float]]:
    """The loop of the authors' KReciprocalSampler over a dense N x N squared L2 matrix.

    Deterministic under ties like the library (stable sorts: smaller index first; the query
    first in its own row), otherwise as written there. Returns the expanded sets sorted by
    distance, the batches, and the time of each step.
    """
    start = time.perf_counter()
    sq = (x * x).sum(axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)
    np.fill_diagonal(dist, -1.0)
    timings = {"matrix_s": time.perf_counter() - start}
    sorted_dist = np.argsort(dist, axis=1, kind="stable")
    timings["argsort_s"] = time.perf_counter() - start - timings["matrix_s"]
    half = half_k(k)
    expanded_sets, batches = [], []
    for i in range(len(x)):
        forward = sorted_dist[i, : k + 1]
        backward = sorted_dist[forward, : k + 1]
        reciprocal = forward[np.where(backward == i)[0]]
        expansion = reciprocal
        for cand in reciprocal:
            cand_forward = sorted_dist[cand, : half + 1]
            cand_backward = sorted_dist[cand_forward, : half + 1]
            cand_reciprocal = cand_forward[np.where(cand_backward == cand)[0]]
            if len(np.intersect1d(cand_reciprocal, reciprocal)) > alpha * len(cand_reciprocal):
                expansion = np.append(expansion, cand_reciprocal)
        expansion = np.unique(expansion)
        ordered = expansion[np.argsort(dist[i, expansion], kind="stable")]
        batch = ordered[:batch_size].tolist()
        j = 0
        while len(batch) < batch_size:
            if sorted_dist[i, j] not in batch:
                batch.append(sorted_dist[i, j])
            j += 1
        expanded_sets.append(ordered)
        batches.append(batch)
    timings["loop_s"] = time.perf_counter() - start - timings["matrix_s"] - timings["argsort_s"]
    return expanded_sets, np.array(batches, dtype=np.int64), timings


def run_case(case: str, args: argparse.Namespace, out_dir: str) -> dict:
    """One case in this process; returns its timings (and saves case a's batches)."""
    n, d = args.n or DEFAULTS[case[0]][0], args.d or DEFAULTS[case[0]][1]
    x = blobs(n, d, args.cluster_size, args.seed, integer=case.startswith("a"))
    result: dict = {"case": case, "n": n, "d": d}
    start = time.perf_counter()
    if case == "a_dense":
        expanded_sets, batches, timings = dense_research_style(x, args.k1, args.batch_size)
        result["total_s"] = time.perf_counter() - start
        result.update(timings)
        np.save(f"{out_dir}/a_dense_batches.npy", batches)
        np.save(f"{out_dir}/a_dense_sizes.npy", np.array([len(s) for s in expanded_sets]))
        np.save(f"{out_dir}/a_dense_sets.npy", np.concatenate(expanded_sets))
    else:
        metric = "euclidean" if case == "a_vectorised" else "cosine"
        index = "exact" if case != "c" else args.index
        ann = None
        if index != "exact":
            params = {"nprobe": args.nprobe} if index == "ivf" else {"efSearch": args.ef_search}
            ann = build_ann_index(x, metric, index, params)
        result["index_build_s"] = time.perf_counter() - start
        neighbor_idx, distances = knn_graph_rows(x, np.arange(n), x, args.k1, metric, ann)
        result["search_s"] = time.perf_counter() - start - result["index_build_s"]
        t_recip = time.perf_counter()
        recip_ids, batches = reciprocal_batches(neighbor_idx, distances, x, args.k1, args.batch_size, metric)
        result["reciprocal_s"] = time.perf_counter() - t_recip
        result["total_s"] = time.perf_counter() - start
        sizes = (recip_ids >= 0).sum(axis=1)
        result["mean_expanded_size"] = float(sizes.mean())
        if case == "a_vectorised":
            np.save(f"{out_dir}/a_vectorised_batches.npy", batches)
            np.save(f"{out_dir}/a_vectorised_sizes.npy", sizes)
            np.save(f"{out_dir}/a_vectorised_sets.npy", recip_ids[recip_ids >= 0])
        if case == "c":
            sample = np.sort(np.random.default_rng(1).choice(n, size=RECALL_QUERIES, replace=False))
            t_exact = time.perf_counter()
            exact_idx, _ = knn_graph_rows(x[sample], sample, x, args.k1, metric)
            result["recall_exact_sample_s"] = time.perf_counter() - t_exact
            result["recall"] = knn_recall(neighbor_idx[sample, 1:], exact_idx[:, 1:])
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def report_case_a(vec: dict, dense: dict, out_dir: str) -> None:
    """Check that both sides of case a agree, and print their times side by side."""
    for name in ("batches", "sizes", "sets"):
        vec_values, dense_values = (np.load(f"{out_dir}/a_{side}_{name}.npy") for side in ("vectorised", "dense"))
        if not np.array_equal(vec_values, dense_values):
            raise SystemExit(f"case a: the {name} differ between the vectorised and the dense implementation")
    print(f"case a (N={vec['n']}, d={vec['d']}): identical batches and expanded sets")
    print(f"  vectorised: {vec['total_s']:.2f} s (search {vec['search_s']:.2f} s, reciprocal "
          f"{vec['reciprocal_s']:.2f} s), peak {vec['peak_rss_gib']:.2f} GiB")
    print(f"  dense loop: {dense['total_s']:.2f} s (matrix {dense['matrix_s']:.2f} s, argsort "
          f"{dense['argsort_s']:.2f} s, loop {dense['loop_s']:.2f} s), peak {dense['peak_rss_gib']:.2f} GiB")
    end_to_end, lists_to_batches = dense["total_s"] / vec["total_s"], dense["loop_s"] / vec["reciprocal_s"]
    print(f"  speed-up: {end_to_end:.1f}x end to end, {lists_to_batches:.1f}x from neighbour lists to batches "
          "(loop vs reciprocal_batches)", flush=True)


def report_scale_case(r: dict) -> None:
    """Print one of cases b and c."""
    line = (f"case {r['case']} (N={r['n']}, d={r['d']}): total {r['total_s']:.1f} s (index "
            f"{r['index_build_s']:.1f} s, search {r['search_s']:.1f} s, reciprocal {r['reciprocal_s']:.1f} s), "
            f"peak {r['peak_rss_gib']:.2f} GiB")
    if "recall" in r:
        line += f", recall {r['recall']:.4f} on {RECALL_QUERIES} queries"
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="a,b,c", help="comma-separated subset of a,b,c")
    parser.add_argument("--n", type=int, default=None, help="N for every chosen case (default: per case)")
    parser.add_argument("--d", type=int, default=None, help="d for every chosen case (default: per case)")
    parser.add_argument("--k1", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=7)
    parser.add_argument("--cluster-size", type=int, default=50)
    parser.add_argument("--index", choices=["ivf", "hnsw"], default="ivf", help="approximate index of case c")
    parser.add_argument("--nprobe", type=int, default=96)
    parser.add_argument("--ef-search", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(run_case(args.worker, args, args.out_dir)))
        return

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(DEFAULTS))
    if unknown:
        parser.error(f"--cases: unknown case(s) {unknown}; expected a subset of a,b,c")
    out_dir = tempfile.mkdtemp(prefix="bench-reciprocal-")
    forwarded = [
        f"--{name.replace('_', '-')}={value}"
        for name, value in vars(args).items()
        if value is not None and name not in ("cases", "worker", "out_dir")
    ]
    print(f"faiss threads: {os.environ.get('OMP_NUM_THREADS', 'all cores')}, k1 = k = {args.k1}, "
          f"batch size {args.batch_size}, cluster size {args.cluster_size}", flush=True)
    for case in cases:
        workers = ["a_vectorised", "a_dense"] if case == "a" else [case]
        results = {}
        for worker in workers:
            proc = subprocess.run(
                [sys.executable, __file__, *forwarded, "--worker", worker, "--out-dir", out_dir],
                check=True, capture_output=True, text=True,
            )
            results[worker] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(results[worker]), flush=True)
        if case == "a":
            report_case_a(results["a_vectorised"], results["a_dense"], out_dir)
        else:
            report_scale_case(results[case])

if __name__ == "__main__":
    main()
