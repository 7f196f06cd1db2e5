"""Figures of a run's metrics table: training curves and retrieval scores."""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
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
