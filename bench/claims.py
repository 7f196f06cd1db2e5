"""The papers' qualitative claims, measured with the project's own configs on the synthetic data.

Each sub-command runs small (demo-sized) models one after the other and prints a markdown table;
BENCHMARKS.md "Claims worth a number" records the figures and the commands.

    python bench/claims.py diagnosis --out /tmp/claims   # TIP Table II's direction; Tables III / IV (MS vs triplet)
    python bench/claims.py mpn --out /tmp/claims         # intra-batch-mpn Table 3's direction, both MPN variants
    python bench/claims.py deml --steps 320              # DeML Table 4: with vs without the adversary

``diagnosis`` trains ``jobs/configs/demo.yaml`` once with Multi-Similarity and once with triplet loss
(explain + localize on the train and test splits) and reports the best-threshold localization accuracy
of every map (paper protocol, neighbour and prototype references) and ``dml-ray compare``'s rows.
``mpn`` trains ``jobs/configs/demo_mpn.yaml`` with ``model.mpn.variant`` paper and authors and reports
backbone vs refined Recall@K. ``deml`` trains DeML(I=1, J=4) from one random init with and without the
adversary, in process, and evaluates Recall@1 and the learners' similarity every ``--every`` steps.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DIAGNOSIS_STAGES = ["data", "train", "embed", "evaluate", "explain", "localize"]
METHODS = ["decomposition", "decomposition_bias", "gradcam", "gradcam_nonorm", "rgradcam", "distcam"]


def _run(config: str, out: str, run_id: str, overrides: dict[str, Any]) -> list[dict]:
    from dml_ray.config import load_config
    from dml_ray.io.tables import read_table, table_uri
    from pipelines.run import run_pipeline

    cfg = load_config(REPO / "jobs" / "configs" / config, {"output_root": out, "run_id": run_id, **overrides})
    run_pipeline(cfg)
    return read_table(table_uri(out, run_id, "metrics")).to_pylist()


def _value(rows: list[dict], split: str, metric: str, k: Optional[int] = None) -> Optional[float]:
    return next((r["value"] for r in rows if r["split"] == split and r["metric"] == metric and r["k"] == k), None)


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def diagnosis(out: str, seed: int, epochs: Optional[int]) -> None:
    from pipelines.compare import HEADER, compare_runs

    runs = {}
    for loss in ("multi_similarity", "triplet"):
        run_id = f"claims-{loss}-s{seed}"
        overrides = {"stages": DIAGNOSIS_STAGES, "train.loss.name": loss, "train.seed": seed}
        if epochs:
            overrides["train.epochs"] = epochs
        runs[run_id] = _run("demo.yaml", out, run_id, overrides)
    print("\nLocalization accuracy at the best threshold (IoU >= 0.5, paper mode), test split:\n")
    print("| run | reference | " + " | ".join(METHODS) + " | random | centre |")
    print("|---|---|" + "---|" * (len(METHODS) + 2))
    for run_id, rows in runs.items():
        for kind in ("neighbor", "prototype"):
            cells = [_fmt(_value(rows, "test", f"loc_best_acc/{kind}/{m}")) for m in METHODS]
            base = [_fmt(_value(rows, "test", f"loc_best_acc/none/baseline_{b}")) for b in ("random", "center")]
            print(f"| {run_id} | {kind} | " + " | ".join(cells + base) + " |")
    print("\n`dml-ray compare` rows (Tables III, IV):\n")
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for row in compare_runs(out, list(runs)):
        print("| " + " | ".join(v if isinstance(v, str) else _fmt(v) for v in row) + " |")


def mpn(out: str, seed: int) -> None:
    print_rows = []
    for variant in ("paper", "authors"):
        run_id = f"claims-mpn-{variant}-s{seed}"
        rows = _run("demo_mpn.yaml", out, run_id, {"stages": ["data", "train", "embed", "evaluate", "knn", "mpn"],
                                                   "model.mpn.variant": variant, "train.seed": seed})
        for stage in ("evaluate", "mpn"):
            r = [r for r in rows if r["stage"] == stage and r["split"] == "test"]
            recall = [_value(r, "test", "recall", k) for k in (1, 2, 4, 8)]
            print_rows.append([run_id, "backbone" if stage == "evaluate" else "MPN refined",
                               *recall, _value(r, "test", "map_at_r"), _value(r, "test", "nmi")])
    print("\n| run | embedding | R@1 | R@2 | R@4 | R@8 | MAP@R | NMI |\n|---|---|---|---|---|---|---|---|")
    for row in print_rows:
        print("| " + " | ".join([row[0], row[1], *[_fmt(v) for v in row[2:]]]) + " |")


def deml(steps: int, every: int, seed: int, threads: int) -> None:
    import pyarrow.compute as pc
    import torch

    from dml_ray.config import LossConfig, ModelConfig, OptimizerConfig, TrainConfig
    from dml_ray.data.batches import decode_batch, fetch_bytes
    from dml_ray.data.readers import read_images
    from dml_ray.data.samplers import RankAwarePKBatchSampler
    from dml_ray.data.synthetic import generate_synthetic
    from dml_ray.metrics.learners import learner_similarity
    from dml_ray.metrics.retrieval import evaluate_retrieval
    from dml_ray.models.embedding import build_model
    from dml_ray.objectives import build_objective
    from dml_ray.training import build_optimizer, train_epoch

    torch.set_num_threads(threads)
    root = generate_synthetic(os.path.join("/tmp", f"claims-deml-data-{seed}"), 16, 12, 72, seed)
    images = read_images("cub", root)

    def load(split):
        table = images.filter(pc.equal(images.column("split"), split))
        batch = decode_batch(fetch_bytes(table), 64, 64)
        return torch.from_numpy(batch["image"].copy()), torch.from_numpy(batch["label"].copy()), batch["image_id"]

    (x, y, _), (xt, yt, ids) = load("train"), load("test")

    def evaluate(model) -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            out = model(xt)
        emb = out.embedding.numpy()
        rows = evaluate_retrieval(emb, yt.numpy(), ids, emb, yt.numpy(), ids, [1], with_map_at_r=False,
                                  with_nmi=False)
        sim = learner_similarity(out.learners.view(len(xt), model.scales, model.branches, -1)).mean().item()
        return rows[0]["value"], sim

    curves: dict[bool, list[tuple[int, float, float]]] = {}
    for adversary in (True, False):
        torch.manual_seed(seed)
        cfg = ModelConfig(kind="deml", backbone="googlenet", embedding_dim=64,
                          deml={"scales": 1, "branches": 4, "adversary": adversary})
        model = build_model(cfg, 64)
        train_cfg = TrainConfig(loss=LossConfig(name="binomial_deviance"),
                                optimizer=OptimizerConfig(lr=1e-3, head_lr_multiplier=10))
        objective = build_objective(cfg, train_cfg, int(y.max()) + 1, model.embedding_dim)
        optimizer = build_optimizer(train_cfg.optimizer, model, objective)
        sampler = RankAwarePKBatchSampler(y.tolist(), 6, 4, seed=seed, steps_per_epoch=every)
        curve = [(0, *evaluate(model))]
        for chunk in range(steps // every):
            sampler.set_epoch(chunk)
            train_epoch(model, objective, optimizer, ((x[b], y[b]) for b in sampler), torch.device("cpu"))
            curve.append(((chunk + 1) * every, *evaluate(model)))
            logging.info("adversary=%s step %d: R@1 %.3f, sim %.3f", adversary, *curve[-1])
        curves[adversary] = curve
    print("\n| step | R@1 with L_adv | R@1 without | learner sim. with L_adv | learner sim. without |")
    print("|---|---|---|---|---|")
    for (step, r_adv, s_adv), (_, r_no, s_no) in zip(curves[True], curves[False]):
        print(f"| {step} | {r_adv:.3f} | {r_no:.3f} | {s_adv:.3f} | {s_no:.3f} |")
    last = [np.mean([c[1] for c in curves[a][-3:]]) for a in (True, False)]
    print(f"\nmean R@1 over the last three evaluations: with L_adv {last[0]:.3f}, without {last[1]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="claim", required=True)
    for name in ("diagnosis", "mpn"):
        p = sub.add_parser(name)
        p.add_argument("--out", default="/tmp/claims", help="output root of the runs")
        p.add_argument("--seed", type=int, default=0, help="train.seed")
        if name == "diagnosis":
            p.add_argument("--epochs", type=int, default=None, help="train.epochs (default: the demo's)")
    p = sub.add_parser("deml")
    p.add_argument("--steps", type=int, default=320)
    p.add_argument("--every", type=int, default=40, help="evaluate every this many steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.claim != "deml" else logging.INFO,
                        format="%(asctime)s %(message)s")
    if args.claim == "diagnosis":
        diagnosis(os.path.abspath(args.out), args.seed, args.epochs)
    elif args.claim == "mpn":
        mpn(os.path.abspath(args.out), args.seed)
    else:
        deml(args.steps, args.every, args.seed, args.threads)


if __name__ == "__main__":
    main()
