"""Retrieval evaluation: queries sharded over Ray tasks against a database in the object store.

Rows are put in image_id order first, so every metric is a function of the rows and not of the order
Ray Data wrote them in. Each shard reduces its neighbours to per-query statistics as it searches
(``query_statistics``), so the driver receives two numbers per query, never the neighbour lists.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from dml_ray import console
from dml_ray.config import DeMLConfig, EvaluateConfig
from dml_ray.io.schemas import METRICS_SCHEMA, embedding_type
from dml_ray.metrics.learners import learner_blocks, learner_similarity, scale_embeddings
from dml_ray.metrics.retrieval import metrics_from_statistics, nmi, relevant_counts, search_width
from dml_ray.retrieval.search import self_rows
from pipelines.search_tasks import statistics_shard

log = logging.getLogger(__name__)


def _arrays(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    emb = table.column("embedding").combine_chunks()
    dim = emb.type.list_size
    x = emb.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
    return x, table.column("label").to_numpy(), np.asarray(table.column("image_id").to_pylist(), dtype=object)


def by_image_id(table: pa.Table) -> pa.Table:
    """``table`` in image_id order: the canonical row order every metric is computed in."""
    return table.take(pc.sort_indices(table, [("image_id", "ascending")]))


def evaluation_pairs(splits: list[str]) -> list[tuple[str, str, str]]:
    """(name, query split, database split) pairs: each split against itself; In-Shop's query vs gallery."""
    if "query" in splits and "gallery" in splits:
        return [("query_gallery", "query", "gallery")] + [(s, s, s) for s in splits if s not in ("query", "gallery")]
    return [(s, s, s) for s in splits]


def evaluated_splits(embeddings: pa.Table, cfg: EvaluateConfig) -> list[str]:
    """The configured splits, else the protocol's: query and gallery when present (In-Shop), else test."""
    if cfg.splits:
        return list(cfg.splits)
    present = set(embeddings.column("split").unique().to_pylist())
    return ["query", "gallery"] if {"query", "gallery"} <= present else ["test"]


def evaluate_split(query: pa.Table, db: pa.Table, ks: list[int], cfg: EvaluateConfig,
                   num_threads: int = 1) -> list[dict]:
    """Recall@K, MAP@R and NMI of ``query`` against ``db``, queries sharded over Ray tasks."""
    return evaluate_split_timed(query, db, ks, cfg, num_threads)[0]


def evaluate_split_timed(query: pa.Table, db: pa.Table, ks: list[int], cfg: EvaluateConfig,
                         num_threads: int = 1) -> tuple[list[dict], dict[str, float]]:
    """``evaluate_split`` and the seconds of each part: ``prepare`` (id order, arrays, R per query, self rows),
    ``search`` (the sharded exact search and its per-query statistics), ``reduce`` (metric rows), ``nmi``.

    Each shard task reserves ``num_threads`` CPUs and runs faiss with that many threads.
    """
    times = {}
    start = time.perf_counter()
    same = query is db
    query = by_image_id(query)
    db = query if same else by_image_id(db)
    q_emb, q_labels, q_ids = _arrays(query)
    d_emb, d_labels, d_ids = (q_emb, q_labels, q_ids) if same else _arrays(db)
    n_relevant = relevant_counts(q_labels, q_ids, d_labels, d_ids) if cfg.map_at_r else None
    width = search_width(ks, n_relevant)
    q_rows = self_rows(q_ids, d_ids)
    times["prepare"] = time.perf_counter() - start

    start = time.perf_counter()
    refs = [ray.put(x) for x in (d_emb, d_labels)]
    q_ref = refs[0] if same else ray.put(q_emb)
    r = n_relevant
    bounds = np.linspace(0, len(q_emb), min(cfg.query_shards, len(q_emb)) + 1).astype(int)
    shard = statistics_shard.options(num_cpus=num_threads)
    console.expect("evaluate", len(q_emb))
    futures = [shard.remote(q_ref, a, b, q_rows[a:b], q_labels[a:b], None if r is None else r[a:b], *refs, width,
                            max(ks), cfg.metric, cfg.block_size, num_threads)
               for a, b in zip(bounds, bounds[1:]) if b > a]
    parts = ray.get(futures)
    times["search"] = time.perf_counter() - start

    start = time.perf_counter()
    first_rank = np.concatenate([p[0] for p in parts])
    average_precision = None if r is None else np.concatenate([p[1] for p in parts])
    rows = metrics_from_statistics(first_rank, average_precision, ks)
    times["reduce"] = time.perf_counter() - start
    if cfg.nmi:
        start = time.perf_counter()
        same_rows = same or set(q_ids.tolist()) == set(d_ids.tolist())
        x = q_emb if same_rows else np.concatenate([q_emb, d_emb])
        y = q_labels if same_rows else np.concatenate([q_labels, d_labels])
        ids = q_ids if same_rows else np.concatenate([q_ids, d_ids])
        rows.append({"metric": "nmi", "k": None, "value": nmi(x, y, seed=cfg.seed, ids=ids)})
        times["nmi"] = time.perf_counter() - start
    log.info("evaluate: %d queries x %d database items, %d neighbours each: %s", len(q_ids), len(d_ids), width,
             ", ".join(f"{part} {seconds:.2f} s" for part, seconds in times.items()))
    return rows, times


def run_evaluate(embeddings: pa.Table, ks: list[int], cfg: EvaluateConfig, run_id: str,
                 splits: Optional[list[str]] = None, num_threads: int = 1, stage: str = "evaluate") -> pa.Table:
    """Evaluate every configured split of an embeddings table; returns ``metrics`` rows tagged ``stage``."""
    start = time.perf_counter()
    rows = []
    for name, q_split, d_split in evaluation_pairs(splits or evaluated_splits(embeddings, cfg)):
        query = embeddings.filter(pc.equal(embeddings.column("split"), q_split))
        db = query if d_split == q_split else embeddings.filter(pc.equal(embeddings.column("split"), d_split))
        if query.num_rows == 0 or db.num_rows < 2:
            raise ValueError(f"evaluate: split {q_split!r} / {d_split!r} has too few embeddings")
        usable = [k for k in ks if k < db.num_rows]
        if len(usable) < len(ks):
            log.warning("evaluate: dropping K > database size for %s: %s", name, sorted(set(ks) - set(usable)))
        for row in evaluate_split(query, db, usable, cfg, num_threads):
            rows.append({"run_id": run_id, "stage": stage, "split": name, **row})
    log.info("evaluate: %d metric rows in %.1f s", len(rows), time.perf_counter() - start)
    return pa.Table.from_pylist(rows, schema=METRICS_SCHEMA)


def evaluate_learners(embeddings: pa.Table, deml: DeMLConfig, ks: list[int], cfg: EvaluateConfig, run_id: str,
                      num_threads: int = 1) -> pa.Table:
    """DeML ``metrics`` rows (stage evaluate) from the stored embeddings of each evaluated query split:
    ``learner_similarity`` and ``learner_similarity_std`` over images ("sim" of Table 4) when J >= 2, and
    ``recall_scale<i>`` for each OA root learner i (column "O" of Table 2) when I >= 2."""
    rows = []
    embeddings = by_image_id(embeddings)
    for name, q_split, d_split in evaluation_pairs(evaluated_splits(embeddings, cfg)):
        query = embeddings.filter(pc.equal(embeddings.column("split"), q_split))
        q_emb, _, _ = _arrays(query)
        if deml.branches > 1:
            sim = learner_similarity(torch.tensor(learner_blocks(q_emb, deml.scales, deml.branches))).numpy()
            rows += [{"metric": "learner_similarity", "k": None, "value": float(sim.mean()), "split": name},
                     {"metric": "learner_similarity_std", "k": None, "value": float(sim.std()), "split": name}]
        if deml.scales > 1:
            db = embeddings.filter(pc.equal(embeddings.column("split"), d_split))
            usable = [k for k in ks if k < db.num_rows]
            plain = cfg.model_copy(update={"nmi": False, "map_at_r": False})
            for i, (q_scale, d_scale) in enumerate(zip(scale_embeddings(q_emb, deml.scales, deml.branches),
                                                       scale_embeddings(_arrays(db)[0], deml.scales, deml.branches))):
                for row in evaluate_split(_with_embedding(query, q_scale), _with_embedding(db, d_scale), usable, plain,
                                          num_threads):
                    rows.append({**row, "metric": f"{row['metric']}_scale{i + 1}", "split": name})
    return pa.Table.from_pylist([{"run_id": run_id, "stage": "evaluate", **r} for r in rows], schema=METRICS_SCHEMA)


def _with_embedding(table: pa.Table, embedding: np.ndarray) -> pa.Table:
    """``table`` with its embedding column replaced by the N x k array ``embedding``."""
    column = pa.FixedSizeListArray.from_arrays(pa.array(embedding.reshape(-1), pa.float32()), embedding.shape[1])
    return table.set_column(table.column_names.index("embedding"), "embedding",
                            column.cast(embedding_type(embedding.shape[1])))
