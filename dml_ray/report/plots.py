"""Figures of a run's metrics table: training curves and retrieval scores."""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow as pa  # noqa: E402


def run_summary_png(metrics: pa.Table, title: str) -> bytes:
    """PNG bytes: loss and images/s per epoch (stage train) beside Recall@K per split (stage evaluate)."""
    rows = metrics.to_pylist()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    train = sorted((r for r in rows if r["stage"] == "train"), key=lambda r: r["k"])
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
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
