"""A 2-D projection of embeddings for display: PCA, or UMAP when ``umap-learn`` is installed (an option, not a
dependency). The report's scatter and the explorer's projection both call ``project_2d``."""
from __future__ import annotations

import logging
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

ProjectionMethod = Literal["auto", "pca", "umap"]
METHODS = ("auto", "pca", "umap")


def umap_available() -> bool:
    """Whether ``umap-learn`` can be imported."""
    try:
        import umap  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_method(method: str) -> str:
    """The method ``project_2d`` uses for ``method``: ``auto`` is UMAP when importable, else PCA."""
    if method not in METHODS:
        raise ValueError(f"projection: unknown method {method!r}; expected one of: {', '.join(METHODS)}")
    if method == "auto":
        return "umap" if umap_available() else "pca"
    if method == "umap" and not umap_available():
        raise ValueError("projection: method 'umap' needs umap-learn (pip install umap-learn); or use 'pca'")
    return method


def project_2d(x: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(n, 2) float32 coordinates of the rows of ``x`` (n, d), in row order.

    ``pca``: the first two principal components (sklearn ``PCA``; Pearson 1901). ``umap``: UMAP with cosine
    distance, ``n_neighbors = min(15, n - 1)`` (McInnes, Healy, Melville 2018, arXiv:1802.03426). ``auto``: UMAP
    when ``umap-learn`` is importable, else PCA. Fewer than three rows have no spread to show: all zeros.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"projection: expected an (n, d) array, got shape {x.shape}")
    chosen = resolve_method(method)
    if len(x) <= 2:
        return np.zeros((len(x), 2), np.float32)
    if chosen == "umap":
        import umap

        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, len(x) - 1), metric="cosine", random_state=seed)
        out = reducer.fit_transform(x)
    else:
        from sklearn.decomposition import PCA

        out = PCA(n_components=2, random_state=seed).fit_transform(x)
    log.debug("projection: %d rows by %s", len(x), chosen)
    return np.asarray(out, np.float32)
