"""GPU readiness: every GPU path of a run beside its CPU counterpart, in one table.

    python bench/gpu_check.py            # about 2 minutes on CPU only, well under 8 with a GPU

Rows (CPU first; a GPU row compares with the CPU row above it):

- train: Ray Train DDP, 2 gloo workers fp32 on CPU; on GPU one NCCL worker per GPU in fp32 (IEEE, no TF32), with
  bf16 autocast and with fp16 autocast + GradScaler. Agreement: the test Recall@1 of the trained model against the
  CPU run's (training numerics differ, and one GPU worker sees half the CPU run's global batch per step, so this
  is a sanity check, not an identity; the GPU fp32 row separates precision from world size).
- embed: the Ray Data embedding actor with the CPU run's checkpoint, on CPU (fp32), on GPU (fp32, bf16).
  Agreement: the smallest cosine between an image's GPU and CPU embeddings.
- knn graph / evaluate: faiss exact search of the CPU embeddings, faiss-cpu vs faiss-gpu. Agreement: fraction
  of identical neighbour rows; largest |difference| of Recall@K and MAP@R.
- explain: DeML's object-attention maps (the explain stage's GPU path), a random-init GoogLeNet, CPU vs GPU
  (fp32, bf16). Agreement: largest |difference| of the min-max normalised maps.

On a machine without a GPU (or without faiss-gpu) the GPU rows read "not run". The table goes to stdout;
logs (warnings and up) to stderr.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from typing import Callable, Optional

import numpy as np
import pyarrow.compute as pc
import torch
from PIL import Image

from dml_ray.config import DataConfig, EmbedConfig, ModelConfig, parse_config
from dml_ray.data.transforms import eval_transform
from dml_ray.io.run import open_run
from dml_ray.metrics.retrieval import evaluate_retrieval
from dml_ray.models.checkpoint import checkpoint_bytes, save_checkpoint
from dml_ray.models.embedding import build_model
from dml_ray.retrieval.knn_graph import knn_graph
from pipelines.embed import run_embed
from pipelines.ray_env import ensure_ray
from pipelines.run import run_pipeline

HEADER = ("check", "device", "ran", "images/s", "agreement with CPU")


def _gpus() -> int:
    return torch.cuda.device_count()


def _faiss_gpu() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _config(root: str, run_id: str, gpu: bool = False, precision: str = "fp32") -> object:
    return parse_config({
        "output_root": root, "run_id": run_id, "stages": ["data", "train", "embed", "evaluate"],
        "data": {"kind": "synthetic", "synthetic": {"n_classes": 24, "images_per_class": 16, "image_size": 80},
                 "resize": 64, "image_size": 64},
        "model": {"backbone": "tiny_cnn", "embedding_dim": 64},
        "train": {"epochs": 8, "classes_per_batch": 6, "samples_per_class": 4, "optimizer": {"lr": 0.003},
                  "num_workers": max(1, _gpus()) if gpu else 2, "use_gpu": gpu, "precision": precision},
        "embed": {"batch_size": 64, "use_gpu": gpu, "precision": precision},
        "evaluate": {"query_shards": 2, "nmi": False},
        "tracking": {"tensorboard": False},
    })


def _recall1(run) -> float:
    m = run.read("metrics", "evaluate").to_pylist()
    return next(r["value"] for r in m if r["split"] == "test" and r["metric"] == "recall" and r["k"] == 1)


def _embeddings(run) -> dict[str, np.ndarray]:
    t = run.read("embeddings", columns=["image_id", "embedding"])
    return dict(zip(t.column("image_id").to_pylist(), np.stack(t.column("embedding").to_numpy(zero_copy_only=False))))


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def check_train(root: str, rows: list, gpu: bool) -> object:
    """CPU training run (its checkpoint and embeddings are the references of the later rows); GPU runs."""
    summary = run_pipeline(_config(root, "cpu"))
    cpu = open_run(root, "cpu")
    speed = summary.stages["train"]["history"][-1]["images_per_s"]
    rows.append(("train DDP fp32", "cpu (gloo, 2 workers)", "yes", speed, f"test R@1 {_recall1(cpu):.3f}"))
    for precision in ("fp32", "bf16", "fp16"):
        name = f"train DDP {precision}" + (" + GradScaler" if precision == "fp16" else "")
        if not gpu:
            rows.append((name, "gpu (nccl)", "not run", None, "no GPU"))
            continue
        run_id = f"gpu-{precision}"
        summary = run_pipeline(_config(root, run_id, gpu=True, precision=precision))
        other = open_run(root, run_id)
        speed = summary.stages["train"]["history"][-1]["images_per_s"]
        rows.append((name, f"gpu (nccl, {max(1, _gpus())} workers)", "yes", speed,
                     f"test R@1 {_recall1(other):.3f} vs {_recall1(cpu):.3f}"))
    return cpu


def check_embed(root: str, cpu, rows: list, gpu: bool) -> None:
    images = cpu.read("images")
    checkpoint = cpu.path("model", "model.pt")
    data = DataConfig(kind="synthetic", resize=64, image_size=64)
    reference = _embeddings(cpu)
    for run_id, use_gpu, precision in (("embed-cpu", False, "fp32"), ("embed-gpu-fp32", True, "fp32"),
                                       ("embed-gpu-bf16", True, "bf16")):
        name, device = f"embed actor {precision}", "gpu" if use_gpu else "cpu"
        if use_gpu and not gpu:
            rows.append((name, device, "not run", None, "no GPU"))
            continue
        cfg = EmbedConfig(batch_size=64, use_gpu=use_gpu, precision=precision, incremental=False)
        result = run_embed(images, checkpoint, open_run(root, run_id, create=True), data, cfg)
        got = _embeddings(open_run(root, run_id))
        cosine = min(float(np.dot(got[i], reference[i])) for i in reference)
        rows.append((name, device, "yes", result.rows / result.seconds, f"min cosine {cosine:.5f}"))


def check_faiss(cpu, rows: list, gpu: bool) -> None:
    emb = cpu.read("embeddings")
    test = emb.filter(pc.equal(emb.column("split"), "test"))
    x = np.stack(test.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    labels = test.column("label").to_numpy()
    ids = np.asarray(test.column("image_id").to_pylist(), dtype=object)
    faiss_gpu = gpu and _faiss_gpu()
    results = {}
    for use_gpu in (False, True):
        device = "gpu (faiss-gpu)" if use_gpu else "cpu (faiss-cpu)"
        if use_gpu and not faiss_gpu:
            reason = "no GPU" if not gpu else "faiss has no GPU support (pip install -e '.[gpu]')"
            rows.append(("knn graph (k1=30)", device, "not run", None, reason))
            rows.append(("evaluate (R@K, MAP@R)", device, "not run", None, reason))
            continue
        (graph, t_graph) = _timed(lambda: knn_graph(x, 30, use_gpu=use_gpu))
        (metrics, t_eval) = _timed(lambda: evaluate_retrieval(x, labels, ids, x, labels, ids, [1, 2, 4, 8],
                                                              with_nmi=False, use_gpu=use_gpu))
        results[use_gpu] = (graph[0], {(m["metric"], m["k"]): m["value"] for m in metrics})
        if use_gpu:
            same = float((results[True][0] == results[False][0]).all(axis=1).mean())
            diff = max(abs(results[True][1][k] - results[False][1][k]) for k in results[False][1])
            graph_note, eval_note = f"identical rows {same:.3f}", f"max |diff| {diff:.2e}"
        else:
            graph_note = eval_note = "reference"
        rows.append(("knn graph (k1=30)", device, "yes", len(x) / t_graph, graph_note))
        rows.append(("evaluate (R@K, MAP@R)", device, "yes", len(x) / t_eval, eval_note))


def check_explain(root: str, cpu, rows: list, gpu: bool, n_images: int = 32) -> None:
    from dml_ray.explain.oam import ObjectAttentionMapper

    mcfg = ModelConfig(kind="deml", backbone="googlenet", pooling="gap", embedding_dim=64)
    torch.manual_seed(0)
    model = build_model(mcfg, 96)
    uri = f"{root}/deml.pt"
    save_checkpoint(uri, checkpoint_bytes(model, mcfg, 96, [], extra={"resize": 96}))
    images = cpu.read("images").slice(0, n_images)
    transform = eval_transform(96, 96)
    batch = {"image_id": np.asarray(images.column("image_id").to_pylist(), dtype=object),
             "error": np.asarray([None] * n_images, dtype=object),
             "image": np.stack([transform(Image.open(u).convert("RGB")).numpy()
                                for u in images.column("uri").to_pylist()])}

    def maps(use_gpu: bool, precision: str) -> tuple[np.ndarray, float]:
        mapper = ObjectAttentionMapper(uri, "x", use_gpu=use_gpu, precision=precision)
        mapper(batch)  # warm-up (cuDNN autotuning, lazy init)
        table, seconds = _timed(lambda: mapper(batch))
        m = np.stack(table.column("map").to_numpy(zero_copy_only=False)).astype(np.float64)
        lo, hi = m.min(axis=1, keepdims=True), m.max(axis=1, keepdims=True)
        return (m - lo) / np.maximum(hi - lo, 1e-12), n_images / seconds

    reference, speed = maps(False, "fp32")
    rows.append(("explain oam (DeML) fp32", "cpu", "yes", speed, "reference"))
    for precision in ("fp32", "bf16"):
        name = f"explain oam (DeML) {precision}"
        if not gpu:
            rows.append((name, "gpu", "not run", None, "no GPU"))
            continue
        got, speed = maps(True, precision)
        rows.append((name, "gpu", "yes", speed, f"max |diff| {np.abs(got - reference).max():.2e}"))


def format_table(rows: list) -> str:
    cells = [HEADER] + [(c, d, r, "-" if s is None else f"{s:,.0f}", a) for c, d, r, s, a in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADER))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="working output root (default: a temporary folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    root = args.out or tempfile.mkdtemp(prefix="gpu-check-")
    gpu = torch.cuda.is_available()
    ensure_ray()
    start = time.perf_counter()
    rows: list = []
    cpu = check_train(root, rows, gpu)
    check_embed(root, cpu, rows, gpu)
    check_faiss(cpu, rows, gpu)
    check_explain(root, cpu, rows, gpu)
    device = torch.cuda.get_device_name(0) if gpu else "none"
    print(f"gpu_check: GPU {device}, {_gpus()} visible; torch {torch.__version__}; "
          f"{time.perf_counter() - start:.0f} s")
    print(format_table(rows))


if __name__ == "__main__":
    main()
