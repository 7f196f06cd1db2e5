"""Activation-map overlays on images, and the paper's Fig. 4 style pair comparison."""
from __future__ import annotations

from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dml_ray.explain.decomposition import upsample_map  # noqa: E402
from dml_ray.report.plots import figure_png  # noqa: E402

METHOD_TITLES = {"decomposition": "Decomposition", "decomposition_bias": "Decomposition+Bias", "distcam": "Dist-CAM",
                 "gradcam": "Grad-CAM", "gradcam_nonorm": "Grad-CAM (no norm)", "rgradcam": "RGrad-CAM",
                 "oam": "OAM"}


def to_pixels(activation: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The one display rule of every painted map: ReLU, divide by the maximum, bilinear upsampling to ``size``.

    What activation-decomposition-tip2021's figures and the authors' code show (``max(map, 0) / max``):
    positive evidence in [0, 1] with the peak at 1; negative evidence and zero are both 0, so a signed
    map's negative regions are never painted as weak positive (min-max stretching did). The sign is
    decided on the feature grid, before upsampling, so interpolation ripples of a zero or negative map
    never become a full-scale stretch. A map without positive values shows nothing (all 0).
    """
    grid = np.maximum(np.asarray(activation, dtype=np.float32), 0.0)
    peak = float(grid.max()) if grid.size else 0.0
    if not np.isfinite(peak) or peak <= 0.0:
        return np.zeros(size, dtype=np.float32)
    up = np.clip(upsample_map(torch.from_numpy(grid / peak), size).numpy(), 0.0, None)
    return up / up.max()


def overlay(ax, image: np.ndarray, activation: Optional[np.ndarray], title: str = "") -> None:
    """Draw ``image`` with ``activation`` (feature-grid resolution) as a translucent heat map (``to_pixels``)."""
    ax.imshow(image)
    if activation is not None:
        ax.imshow(to_pixels(activation, image.shape[:2]), cmap="jet", alpha=0.45, vmin=0, vmax=1)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def pair_figure(query: np.ndarray, reference: np.ndarray, arrays: dict[str, np.ndarray],
                methods: Sequence[str]) -> bytes:
    """PNG: every method on the query (top row) and the reference (bottom row), plus the point-specific map
    of the query's most activated point on the reference (activation-decomposition-tip2021 Fig. 4)."""
    cols = len(methods) + 2
    fig, axes = plt.subplots(2, cols, figsize=(2.1 * cols, 4.6))
    overlay(axes[0, 0], query, None, "query")
    overlay(axes[1, 0], reference, None, f"reference (cos {float(arrays['cosine']):.3f})")
    for i, method in enumerate(methods, start=1):
        overlay(axes[0, i], query, arrays[f"{method}_query"], METHOD_TITLES.get(method, method))
        overlay(axes[1, i], reference, arrays[f"{method}_reference"], METHOD_TITLES.get(method, method))
    grid = arrays["equivalent_features_query"].shape[:2]
    row, col = arrays["query_point"]
    overlay(axes[0, -1], query, None, "query point")
    axes[0, -1].plot([(col + 0.5) * query.shape[1] / grid[1]], [(row + 0.5) * query.shape[0] / grid[0]],
                     marker="x", color="white", markersize=12, mew=3)
    overlay(axes[1, -1], reference, arrays["point_specific_reference"], "point-specific")
    return figure_png(fig)


def deml_pair_figure(query: np.ndarray, reference: np.ndarray, arrays: dict[str, np.ndarray], branches: int) -> bytes:
    """PNG for a DeML pair (``explain_deml_pair``): the object-attention map and each channel-attention
    branch's proposal on the query (top row) and the reference (bottom row), titled with each learner's cosine
    (deml-zero-shot-retrieval Fig. 4a)."""
    cols = branches + 2
    fig, axes = plt.subplots(2, cols, figsize=(2.1 * cols, 4.6), squeeze=False)
    overlay(axes[0, 0], query, None, "query")
    overlay(axes[1, 0], reference, None, f"reference (cos {float(arrays['cosine']):.3f})")
    cos = arrays["learner_cosine"]
    for r, side in enumerate(("query", "reference")):
        overlay(axes[r, 1], query if r == 0 else reference, arrays[f"oam_{side}"], "OAM" if r == 0 else "")
        for j in range(branches):
            title = f"CAM {j + 1} (cos {float(cos[j]):.2f})" if r == 0 else ""
            overlay(axes[r, j + 2], query if r == 0 else reference, arrays[f"cam{j + 1}_{side}"], title)
    return figure_png(fig)


def gallery_figure(images: Sequence[np.ndarray], maps: Sequence[dict[str, np.ndarray]], methods: Sequence[str],
                   titles: Sequence[str]) -> bytes:
    """PNG: one row per image, its overlays for each method."""
    fig, axes = plt.subplots(len(images), len(methods) + 1, figsize=(1.9 * (len(methods) + 1), 1.9 * len(images)),
                             squeeze=False)
    for r, (image, image_maps, title) in enumerate(zip(images, maps, titles)):
        overlay(axes[r, 0], image, None, title)
        for c, method in enumerate(methods, start=1):
            overlay(axes[r, c], image, image_maps.get(method), METHOD_TITLES.get(method, method) if r == 0 else "")
    return figure_png(fig)


def boxes_gallery(images: Sequence[np.ndarray], maps: Sequence[np.ndarray], predicted: Sequence[Sequence[float]],
                  truth: Sequence[Sequence[float]], titles: Sequence[str], columns: int = 6) -> bytes:
    """PNG: overlays with the predicted box (white) and the ground-truth box (green), both (x0, y0, x1, y1)."""
    from matplotlib.patches import Rectangle

    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, activation, pred, gt, title in zip(axes.flat, images, maps, predicted, truth, titles):
        overlay(ax, image, activation, title)
        for box, colour in ((gt, "lime"), (pred, "white")):
            ax.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False,
                                   edgecolor=colour, linewidth=1.8))
    return figure_png(fig)
