"""A small run (data -> train -> embed -> evaluate) vs the same recipe as a plain single-process PML loop.

The bench writes a folder dataset (``root/<class>/<image>.jpg``, the synthetic generator's images, ``--classes``
x ``--per-class`` at ``--size`` px) and runs, one after the other:

- the project: ``run_pipeline`` on the demo config (jobs/configs/demo.yaml: tiny CNN, Multi-Similarity loss,
  P x K batches) with ``data.kind: folder``, stages data, train, embed, evaluate, Ray *not* started beforehand
  (its start is part of a run's wall time), ``train.num_workers`` from ``--workers``;
- the plain loop: the same model, transforms, loss, optimiser, epochs and batches, with PIL, a torch
  DataLoader, PML's MPerClassSampler and MultiSimilarityLoss, then every image embedded in batches and the
  test split scored with PML's AccuracyCalculator (Recall@1, MAP@R, NMI), torch on every core.

Both report Recall@1 on the test split; the command prints the wall-time ratio (target <= 1.5).

    python bench/small_run.py --classes 64 --per-class 32
"""
from __future__ import annotations

import argparse
import logging
import os
import resource
import tempfile
import time

import torch
from PIL import Image

from dml_ray.config import RunConfig
from dml_ray.data.synthetic import generate_synthetic
from dml_ray.data.transforms import eval_transform, train_transform
from dml_ray.models.embedding import build_model
from tests.conftest import demo_like_config


def folder_dataset(work: str, classes: int, per_class: int, size: int) -> str:
    """The synthetic CUB-format dataset; its ``images/`` folder is a ``root/<class>/<image>`` folder dataset."""
    generate_synthetic(f"{work}/cub", classes, per_class, size, seed=0)
    return f"{work}/cub/images"


def project_run(root: str, out: str, workers: int, epochs: int, threads: int) -> tuple[float, dict, float]:
    from pipelines.run import run_pipeline

    cfg: RunConfig = demo_like_config(out, **{
        "data.kind": "folder", "data.root": root, "stages": ["data", "train", "embed", "evaluate"],
        "evaluate.splits": ["test"], "train.num_workers": workers, "train.epochs": epochs, "num_threads": threads})
    start = time.perf_counter()
    summary = run_pipeline(cfg)
    seconds = time.perf_counter() - start
    metrics = summary.metrics.to_pylist()
    recall = next(m["value"] for m in metrics if m["metric"] == "recall" and m["k"] == 1 and m["split"] == "test")
    return seconds, {name: info["seconds"] for name, info in summary.stages.items()}, recall


class _Images(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], labels: list[int], transform) -> None:
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB")), self.labels[i]


def plain_loop(root: str, cfg: RunConfig) -> tuple[float, float]:
    """The recipe as a research script writes it; returns (seconds, Recall@1 of the test split)."""
    from pytorch_metric_learning.losses import MultiSimilarityLoss
    from pytorch_metric_learning.samplers import MPerClassSampler
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    start = time.perf_counter()
    classes = sorted(os.listdir(root))
    train_classes = set(classes[: len(classes) // 2])  # the zero-shot split of the folder reader
    paths, labels, is_train = [], [], []
    for label, name in enumerate(classes):
        for file in sorted(os.listdir(f"{root}/{name}")):
            paths.append(f"{root}/{name}/{file}")
            labels.append(label)
            is_train.append(name in train_classes)
    train = [i for i, t in enumerate(is_train) if t]
    p, k = cfg.train.classes_per_batch, cfg.train.samples_per_class
    train_labels = [labels[i] for i in train]
    steps = len(train) // (p * k)
    dataset = _Images([paths[i] for i in train], train_labels, train_transform(cfg.data.image_size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=p * k, sampler=MPerClassSampler(
        train_labels, m=k, batch_size=p * k, length_before_new_iter=steps * p * k))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.image_size)
    loss_fn = MultiSimilarityLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.optimizer.lr)
    for _ in range(cfg.train.epochs):
        model.train()
        for x, y in loader:
            loss = loss_fn(model(x).embedding, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    everything = torch.utils.data.DataLoader(_Images(paths, labels, eval_transform(cfg.data.resize,
                                                                                   cfg.data.image_size)),
                                             batch_size=cfg.embed.batch_size)
    with torch.inference_mode():
        embeddings = torch.cat([model(x).embedding for x, _ in everything])
    test = torch.tensor([not t for t in is_train])
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r", "NMI"), k="max_bin_count",
                              device=torch.device("cpu"))
    result = calc.get_accuracy(embeddings[test], torch.tensor(labels)[test])
    return time.perf_counter() - start, result["precision_at_1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=32)
    parser.add_argument("--size", type=int, default=80, help="image side in px (the demo's)")
    parser.add_argument("--workers", type=int, default=0,
                        help="train.num_workers of the project run (0: the loop in the driver, the small-run choice)")
    parser.add_argument("--epochs", type=int, default=8, help="train.epochs (the demo's 8)")
    parser.add_argument("--threads", type=int, default=None,
                        help="num_threads of the project run (default: the cores divided among the train workers)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = tempfile.mkdtemp(prefix="bench-small-run-")
    root = folder_dataset(work, args.classes, args.per_class, args.size)
    n = args.classes * args.per_class
    print(f"{n} images ({args.classes} classes x {args.per_class}, {args.size} px), load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)

    t_plain, r_plain = plain_loop(root, demo_like_config(f"{work}/unused", **{"train.epochs": args.epochs}))
    print(f"plain PML loop:   {t_plain:7.1f} s   Recall@1 {r_plain:.3f}", flush=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.workers))
    t_project, stages, r_project = project_run(root, f"{work}/out", args.workers, args.epochs, threads)
    print(f"project run:      {t_project:7.1f} s   Recall@1 {r_project:.3f}   ("
          + ", ".join(f"{s} {v:.1f} s" for s, v in stages.items()) + f"; train.num_workers {args.workers}, num_threads {threads})")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"small run: project {t_project:.1f} s, plain loop {t_plain:.1f} s, ratio {t_project / t_plain:.2f} "
          f"(target <= 1.5); driver peak RSS {peak:.2f} GiB; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
