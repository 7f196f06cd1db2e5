"""Figures of a run: training curves and retrieval scores from its metrics table, per-class Recall@1 and the
embedding projection."""
from __future__ import annotations

import io
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402


def figure_png(fig) -> bytes:
    """A finished matplotlib figure as PNG bytes (the figure is closed)."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def run_summary_png(metrics: pa.Table, title: str) -> bytes:
    """PNG bytes: loss and images/s per epoch (stage train) beside Recall@K per split (stage evaluate), and, when
    the run validated, the validation curves (stage train, split val) with the kept epoch."""
    rows = metrics.to_pylist()
    train_rows = [r for r in rows if r["stage"] == "train"]
    val = sorted((r for r in train_rows if r["split"] == "val" and r["k"] is not None), key=lambda r: r["k"])
    fig, axes = plt.subplots(1, 3 if val else 2, figsize=(15 if val else 10, 3.8))
    train = sorted((r for r in train_rows if r["split"] == "train"), key=lambda r: r["k"])
    loss = [(r["k"], r["value"]) for r in train if r["metric"] == "loss"]
    speed = [(r["k"], r["value"]) for r in train if r["metric"] == "images_per_s"]
    ax = axes[0]
    if loss:
        ax.plot(*zip(*loss), marker="o", color="tab:blue")
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss", color="tab:blue")
        if speed:
            twin = ax.twinx()
            twin.plot(*zip(*speed), marker=".", linestyle="--", color="tab:gray")
            twin.set_ylabel("images / s", color="tab:gray")
    ax.set_title("training")
    if val:
        _validation_axes(axes[2], val, [r for r in train_rows if r["metric"] == "selected_epoch"])
    ax = axes[1]
    recall = [r for r in rows if r["stage"] == "evaluate" and r["metric"] == "recall"]
    splits = sorted({r["split"] for r in recall})
    width = 0.8 / max(len(splits), 1)
    for i, split in enumerate(splits):
        points = sorted((r["k"], r["value"]) for r in recall if r["split"] == split)
        xs = [j + i * width for j in range(len(points))]
        bars = ax.bar(xs, [v for _, v in points], width=width, label=split)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_xticks([j + width * (len(splits) - 1) / 2 for j in range(len(points))],
                      [f"R@{k}" for k, _ in points])
    ax.set_ylim(0, 1.05)
    ax.set_title("retrieval (unseen classes)")
    if splits:
        ax.legend(loc="lower right")
    fig.suptitle(title)
    return figure_png(fig)


def _validation_axes(ax, val: list[dict], selected: list[dict]) -> None:
    """Validation Recall@1 and MAP@R per epoch on the held-out training classes; the kept epoch marked."""
    for name, label in (("recall_at_1", "Recall@1"), ("map_at_r", "MAP@R")):
        points = [(r["k"], r["value"]) for r in val if r["metric"] == name]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    if selected:
        ax.axvline(selected[0]["value"], color="tab:green", linestyle=":", label="kept model")
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("validation (held-out training classes)")


def localization_curves_png(metrics: pa.Table, title: str) -> bytes:
    """PNG: localization accuracy (IoU criterion 0.5) against the map threshold, one line per method and reference
    (activation-decomposition-tip2021 Table I as a plot)."""
    rows = [r for r in metrics.to_pylist() if r["stage"] == "localize" and r["metric"].startswith("loc_acc/")]
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        threshold = r["threshold"] if r.get("threshold") is not None else r["k"] / 100  # runs before the column
        curves.setdefault(r["metric"].split("/", 1)[1], []).append((threshold, r["value"]))
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for name, points in sorted(curves.items()):
        points.sort()
        style = ":" if name.startswith("none/") else "-"
        ax.plot(*zip(*points), style, label=name.replace("none/", ""), linewidth=1.6)
    ax.set_xlabel("map threshold (normalised map)")
    ax.set_ylabel("localization accuracy (IoU criterion 0.5)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title)
    return figure_png(fig)


def attention_png(metrics: pa.Table, title: str) -> bytes:
    """PNG: per MPN layer and head, the attention mass on same-class nodes and the KL divergence of the
    attention from uniform, per training epoch (intra-batch-mpn-reproduction Sec. 4.2.2, Figures 1-2)."""
    rows = [r for r in metrics.to_pylist() if r["stage"] == "train" and r["metric"].startswith("mpn_")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, prefix, label in ((axes[0], "mpn_same_class_mass_l", "attention on same-class nodes"),
                              (axes[1], "mpn_attention_kl_l", "KL(attention || uniform)")):
        for name in sorted({r["metric"] for r in rows if r["metric"].startswith(prefix)}):
            points = sorted((r["k"], r["value"]) for r in rows if r["metric"] == name)
            layer, head = name[len(prefix):].split("_h")
            ax.plot(*zip(*points), marker="o", label=f"layer {layer}, head {head}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    uniform = sorted((r["k"], r["value"]) for r in rows if r["metric"] == "mpn_same_class_mass_uniform")
    if uniform:
        axes[0].plot(*zip(*uniform), ":", color="gray", label="uniform attention")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    return figure_png(fig)


def per_class_recall_png(names: Sequence[str], recall: Sequence[float], overall: float, title: str) -> bytes:
    """PNG: one bar per class with its Recall@1, in the order given (worst first), and the overall Recall@1."""
    n = len(names)
    fig, ax = plt.subplots(figsize=(min(max(6.0, 0.28 * n + 2), 30), 4.2))
    colours = plt.get_cmap("RdYlGn")([max(0.0, min(1.0, v)) for v in recall])
    ax.bar(range(n), recall, color=colours, edgecolor="#555", linewidth=0.4)
    ax.axhline(overall, color="tab:blue", linestyle="--", linewidth=1, label=f"overall Recall@1 {overall:.3f}")
    ax.set_xticks(range(n), [str(s)[:24] for s in names], rotation=90, fontsize=6 if n > 40 else 8)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("Recall@1")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title)
    return figure_png(fig)


def projection_png(xy: np.ndarray, labels: np.ndarray, method: str, title: str) -> bytes:
    """PNG: a 2-D projection of embeddings (``explore.projection.project_2d``), one colour per class (20 colours
    cycled; a legend up to 20 classes)."""
    fig, ax = plt.subplots(figsize=(7, 6))
    classes = np.unique(labels)
    cmap = plt.get_cmap("tab20")
    for i, label in enumerate(classes):
        rows = labels == label
        ax.scatter(xy[rows, 0], xy[rows, 1], s=9, color=cmap(i % 20), alpha=0.8, linewidths=0, label=str(label))
    if 1 < len(classes) <= 20:
        ax.legend(title="label", fontsize=7, markerscale=1.5, loc="best", ncol=2)
    ax.set_xlabel(f"{method} 1")
    ax.set_ylabel(f"{method} 2")
    ax.set_title(title)
    return figure_png(fig)
