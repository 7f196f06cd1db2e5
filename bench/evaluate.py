"""Retrieval evaluation vs pytorch-metric-learning's AccuracyCalculator vs one bare faiss kNN call, side by side.

N L2-normalised d-dimensional embeddings in ``--classes`` Gaussian classes (default: classes of 100,
so MAP@R needs 99 neighbours), the test split searched against itself. Timed one after another in one
process (the bare search before and after the other two, its mean the baseline):

- the project: ``pipelines.evaluate.evaluate_split_timed`` as the evaluate stage runs it (rows put in
  image_id order, queries sharded over ``--shards`` Ray tasks of ``--threads-per-task`` faiss threads each,
  Recall@K, MAP@R and NMI), with Ray already started; the time of each part is printed;
- AccuracyCalculator (precision_at_1 = Recall@1, mean_average_precision_at_r, NMI; k = "max_bin_count"),
  with its default FaissKNN and FaissKMeans (20 iterations, the same as ours);
- one bare ``faiss.knn`` call of the width the metrics need (max(max K, max R) + 1: the query itself is
  in the database), with every thread of the process.

The command fails unless the numbers agree: the project's Recall@K and MAP@R equal those computed from the
bare search's neighbours (to 1e-5: faiss's blockings can order near-ties differently), Recall@1, MAP@R and NMI equal AccuracyCalculator's (to 1e-4; it searches
with squared L2, we with inner products, which can swap near-ties). With ``--memory`` the peak resident memory
of the driver and every process it started (Ray's workers and object store included, shared pages counted in
each process, so an upper bound) is sampled during the project's evaluation and printed every 30 s (a run
stopped early still says how high it went).

    python bench/evaluate.py --n 100000 --dim 128
"""
from __future__ import annotations

import argparse
import logging
import os
import threading
import time

import faiss
import numpy as np
import pyarrow as pa

from dml_ray.config import EvaluateConfig
from dml_ray.io.schemas import embedding_type
from dml_ray.metrics.retrieval import metrics_from_neighbors, relevant_counts, search_width
from pipelines.evaluate import evaluate_split_timed
from pipelines.ray_env import ensure_ray


def dataset(n: int, dim: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noisy Gaussian classes of equal size, L2-normalised; string ids in row order."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    centers = rng.normal(size=(n_classes, dim)).astype(np.float32)
    x = centers[labels] + 2.0 * rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels, np.array([f"img{i:08d}" for i in range(n)], dtype=object)


def embeddings_table(x: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> pa.Table:
    column = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), x.shape[1])
    return pa.table({"image_id": pa.array(ids.tolist(), pa.string()), "label": pa.array(labels, pa.int64()),
                     "split": pa.array(["test"] * len(x), pa.string()),
                     "embedding": column.cast(embedding_type(x.shape[1])),
                     "norm": pa.array(np.ones(len(x), np.float32))})


def _tree_rss_bytes(root: int) -> int:
    """Resident memory of ``root`` and all its descendants, from /proc."""
    parents, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/statm") as f:
                rss[int(entry)] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid and p not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(rss.get(p, 0) for p in tree)


class PeakMemory:
    """Samples ``_tree_rss_bytes`` of this process every ``interval`` seconds while in the ``with`` block."""

    def __init__(self, interval: float = 0.5, report_every: float | None = None) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self.report_every = report_every

    def _run(self) -> None:
        start = last = time.perf_counter()
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss_bytes(os.getpid()))
            if self.report_every and time.perf_counter() - last >= self.report_every:
                last = time.perf_counter()
                print(f"  {last - start:6.0f} s: peak memory so far {self.peak / 2**30:.2f} GiB", flush=True)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _tree_rss_bytes(os.getpid()))


def run_project(table: pa.Table, ks: list[int], shards: int, threads: int, memory: bool):
    cfg = EvaluateConfig(ks=ks, query_shards=shards, seed=1234)  # faiss.Kmeans' default seed, as PML uses
    monitor = PeakMemory(report_every=30) if memory else None
    start = time.perf_counter()
    if monitor:
        with monitor:
            rows, parts = evaluate_split_timed(table, table, ks, cfg, threads)
    else:
        rows, parts = evaluate_split_timed(table, table, ks, cfg, threads)
    seconds = time.perf_counter() - start
    return {(r["metric"], r["k"]): r["value"] for r in rows}, parts, seconds, monitor.peak if monitor else None


def run_pml(x: np.ndarray, labels: np.ndarray):
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r", "NMI"), k="max_bin_count",
                              device=torch.device("cpu"))
    start = time.perf_counter()
    result = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(labels))
    return result, time.perf_counter() - start


def run_faiss(x: np.ndarray, width: int):
    start = time.perf_counter()
    _, indices = faiss.knn(x, x, width + 1, metric=faiss.METRIC_INNER_PRODUCT)
    return indices, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=None, help="default: n / 100")
    parser.add_argument("--ks", default="1,2,4,8")
    parser.add_argument("--shards", type=int, default=4, help="evaluate.query_shards")
    parser.add_argument("--threads-per-task", type=int, default=1, help="num_threads of each shard task")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray instance")
    parser.add_argument("--memory", action="store_true", help="sample the project's peak memory")
    parser.add_argument("--skip", default="", help="comma-separated: pml, faiss (e.g. for a memory-only run)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pipelines.evaluate").setLevel(logging.INFO)
    skip = set(filter(None, args.skip.split(",")))
    ks = [int(k) for k in args.ks.split(",")]
    n_classes = args.classes or max(2, args.n // 100)

    import sklearn.metrics  # noqa: F401 - imported up front for both sides, as AccuracyCalculator's import does

    x, labels, ids = dataset(args.n, args.dim, n_classes, args.seed)
    table = embeddings_table(x, labels, ids)
    n_relevant = relevant_counts(labels, ids, labels, ids)
    width = search_width(ks, n_relevant)
    ensure_ray(num_cpus=args.cpus)
    print(f"N = {args.n:,}, d = {args.dim}, {n_classes:,} classes, needed width {width} (+1 for the query itself), "
          f"{args.cpus} CPUs, faiss threads {faiss.omp_get_max_threads()}, load average {os.getloadavg()[0]:.1f}",
          flush=True)

    t_faiss = None
    if "faiss" not in skip:
        indices, t_before = run_faiss(x, width)
        print(f"bare faiss knn:     {t_before:8.1f} s   (k = {width + 1}, one call; before the others)", flush=True)
    project, parts, t_project, peak = run_project(table, ks, args.shards, args.threads_per_task, args.memory)
    print(f"project:            {t_project:8.1f} s   ({', '.join(f'{p} {s:.1f} s' for p, s in parts.items())})"
          + (f", peak memory {peak / 2**30:.2f} GiB" if peak else ""), flush=True)
    t_pml = None
    if "pml" not in skip:
        pml, t_pml = run_pml(x, labels)
        print(f"AccuracyCalculator: {t_pml:8.1f} s", flush=True)
    if "faiss" not in skip:
        _, t_after = run_faiss(x, width)
        t_faiss = (t_before + t_after) / 2
        print(f"bare faiss knn:     {t_after:8.1f} s   (again, after the others; the mean of both, "
              f"{t_faiss:.1f} s, is the baseline: the machine's load drifts)", flush=True)

    print(f"{'metric':<12} {'project':>10} {'AccuracyCalculator':>19} {'from bare knn':>14}")
    ok = True
    from_knn = {}
    if t_faiss is not None:
        # the query is its own nearest neighbour here (no duplicates): drop it by id, as the project does
        neighbor_ids = ids[indices]
        keep = neighbor_ids != ids[:, None]
        neighbor_labels = labels[indices][keep].reshape(len(x), width) if (keep.sum(axis=1) == width).all() else None
        if neighbor_labels is None:
            neighbor_labels = np.stack([labels[i[k]][:width] for i, k in zip(indices, keep)])
        from_knn = {(r["metric"], r["k"]): r["value"] for r in metrics_from_neighbors(labels, neighbor_labels,
                                                                                      n_relevant, ks)}
    pml_values = {} if t_pml is None else {("recall", 1): pml["precision_at_1"],
                                           ("map_at_r", None): pml["mean_average_precision_at_r"],
                                           ("nmi", None): pml["NMI"]}
    for key in [("recall", k) for k in ks] + [("map_at_r", None), ("nmi", None)]:
        name = f"{key[0]}@{key[1]}" if key[1] else key[0]
        theirs, bare = pml_values.get(key), from_knn.get(key)
        agree = (theirs is None or abs(theirs - project[key]) <= 1e-4) and (bare is None or
                                                                           abs(bare - project[key]) <= 1e-5)
        ok &= agree
        print(f"{name:<12} {project[key]:>10.6f} {'' if theirs is None else f'{theirs:.6f}':>19} "
              f"{'' if bare is None else f'{bare:.6f}':>14}"
              f"{'' if agree else f'   <- differ by {abs((bare if theirs is None else theirs) - project[key]):.2e}'}")
    if not ok:
        raise SystemExit("evaluate: the numbers disagree (see the table above)")
    print(f"evaluate: project {t_project:.1f} s, AccuracyCalculator "
          f"{'-' if t_pml is None else f'{t_pml:.1f}'} s, faiss knn {'-' if t_faiss is None else f'{t_faiss:.1f}'} s")
    if t_pml is not None and t_faiss is not None:
        print(f"ratios: project / AccuracyCalculator {t_project / t_pml:.2f}, project / faiss knn "
              f"{t_project / t_faiss:.2f} (targets <= 1 and <= 1.5)")


if __name__ == "__main__":
    main()
