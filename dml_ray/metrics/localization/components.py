"""Paper mode (DESIGN.md, activation-decomposition-tip2021 Sec. VI-A): the largest 8-connected component of
``map >= t`` and its tight box, for every threshold of a grid in one pass.

The masks of a grid are nested (``map >= t`` shrinks as t grows), so one sweep gives every threshold: each
pixel is bucketed by the highest grid threshold it passes (a short walk from its left neighbour's bucket or a
binary search, then a counting sort: no full sort of the pixels), pixels are added to a union-find forest
from the highest bucket down (union by size, path halving), and after
each bucket the forest's components *are* the 8-connected components of that threshold's mask (the
component tree, or max-tree, of the map restricted to the grid). Every component keeps its size, its
first pixel in raster order and its box, so the largest component (ties to the first in raster order,
``scipy.ndimage.label``'s numbering) is tracked as pixels arrive: a component's (size, -first pixel) key
never decreases, so the best key so far is the best of the forest.

The sweep is a Numba kernel (``numba`` ships manylinux / macOS / Windows wheels on PyPI): union-find is a
sequential pointer-chasing loop that NumPy cannot vectorise, and scikit-image's ``max_tree`` would still
leave the per-node areas, boxes and per-threshold maxima to a Python loop. Compiled, the whole grid costs
about one ``scipy.ndimage.label`` call (BENCHMARKS.md, ``bench/localization.py``). ``cache=True`` keeps the
compiled kernel beside this file (or in numba's per-user cache when that is read-only), so a new process
(a Ray task) loads it in well under a second instead of compiling again.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from dml_ray.metrics.localization.boxes import ComponentBoxes, ImageBoxes, _ragged
from dml_ray.metrics.localization.grid import _check_thresholds
from dml_ray.metrics.localization.maps import _as_maps
from dml_ray.metrics.localization.modes import ArrayLike, Thresholds


# The 8 neighbours, L = (-1, 0) and U = (0, -1) first.
_DX = np.array([-1, 0, -1, 1, 1, -1, 0, 1])
_DY = np.array([0, -1, -1, -1, 0, 1, 1, 1])


@njit(cache=True)
def _find(parent: np.ndarray, p: int) -> int:
    while parent[p] != p:  # path halving
        parent[p] = parent[parent[p]]
        p = parent[p]
    return p


@njit(cache=True)
def _sweep(values: np.ndarray, ascending: np.ndarray, height: int, width: int, want_all: bool):
    """Union-find sweep of a flat map ``values`` [H * W] over the ascending grid ``ascending`` [T].

    Returns largest [T, 4] (x0, y0, x1, y1) per threshold and, when ``want_all``, every component's box
    [K, 4] with its threshold index [K] (an empty mask contributes one (0, 0, 0, 0) row)."""
    n = height * width
    n_levels = ascending.size
    # Bucket = the highest threshold a pixel passes (value >= t, in float64), -1 for none (and NaN). Neighbouring
    # pixels of a smooth map fall in nearby buckets: walk a few steps from the previous pixel's bucket, else
    # binary search.
    level = np.empty(n, dtype=np.int32)
    counts = np.zeros(n_levels + 1, dtype=np.int32)
    lv = -1
    for p in range(n):
        v = values[p]
        if v != v:
            lv = -1
        else:
            steps = 0
            while lv + 1 < n_levels and ascending[lv + 1] <= v and steps < 4:
                lv += 1
                steps += 1
            while lv >= 0 and ascending[lv] > v and steps < 4:
                lv -= 1
                steps += 1
            if steps == 4:
                lo, hi = 0, n_levels  # first index whose threshold is > v, minus one
                while lo < hi:
                    mid = (lo + hi) // 2
                    if ascending[mid] <= v:
                        lo = mid + 1
                    else:
                        hi = mid
                lv = lo - 1
        level[p] = lv
        counts[lv + 1] += 1
    start = np.zeros(n_levels + 2, dtype=np.int32)
    for lv in range(n_levels + 1):
        start[lv + 1] = start[lv] + counts[lv]
    order = np.empty(n, dtype=np.int32)
    fill = start[:-1].copy()
    for p in range(n):
        b = level[p] + 1
        order[fill[b]] = p
        fill[b] += 1

    parent = np.full(n, -1, dtype=np.int32)
    size = np.zeros(n, dtype=np.int32)
    first = np.zeros(n, dtype=np.int32)
    x0 = np.zeros(n, dtype=np.int32)
    y0 = np.zeros(n, dtype=np.int32)
    x1 = np.zeros(n, dtype=np.int32)
    y1 = np.zeros(n, dtype=np.int32)
    roots = np.empty(n, dtype=np.int32)  # the current roots, unordered
    slot = np.full(n, -1, dtype=np.int32)  # position of a root in ``roots``
    n_roots = 0
    best, best_size, best_first = -1, 0, n

    largest = np.zeros((n_levels, 4), dtype=np.int64)
    capacity = 16 * n_levels if want_all else 0
    all_boxes = np.zeros((capacity, 4), dtype=np.int64)
    all_levels = np.zeros(capacity, dtype=np.int64)
    n_all = 0

    for lv in range(n_levels - 1, -1, -1):
        for i in range(start[lv + 1], start[lv + 2]):
            p = order[i]
            y = p // width
            x = p - y * width
            a = -1  # the root of p's component once p joins one
            # Invariant: any two 8-adjacent active pixels are in one component. So once the left (L) or
            # upper (U) neighbour is joined, the neighbours 8-adjacent to it need no visit.
            has_left = x > 0 and parent[p - 1] >= 0
            has_up = y > 0 and parent[p - width] >= 0
            for k in range(8):
                dx, dy = _DX[k], _DY[k]
                if k >= 2 and ((has_left and dx <= 0) or (has_up and dy <= 0)):
                    continue
                xx, yy = x + dx, y + dy
                if xx < 0 or xx >= width or yy < 0 or yy >= height:
                    continue
                b = parent[yy * width + xx]
                if b < 0 or b == a:  # inactive, or already in p's component
                    continue
                b = _find(parent, b)
                if a < 0:  # p joins its first neighbour's component
                    a = b
                    parent[p] = a
                    size[a] += 1
                    first[a] = min(first[a], p)
                    x0[a] = min(x0[a], x)
                    y0[a] = min(y0[a], y)
                    x1[a] = max(x1[a], x + 1)
                    y1[a] = max(y1[a], y + 1)
                    continue
                if a == b:
                    continue
                if size[a] < size[b]:
                    a, b = b, a
                parent[b] = a  # union by size; b stops being a root
                size[a] += size[b]
                first[a] = min(first[a], first[b])
                x0[a] = min(x0[a], x0[b])
                y0[a] = min(y0[a], y0[b])
                x1[a] = max(x1[a], x1[b])
                y1[a] = max(y1[a], y1[b])
                last = roots[n_roots - 1]
                roots[slot[b]] = last
                slot[last] = slot[b]
                n_roots -= 1
            if a < 0:  # no active neighbour: p starts a component
                a = p
                parent[p] = p
                size[p] = 1
                first[p] = p
                x0[p], y0[p], x1[p], y1[p] = x, y, x + 1, y + 1
                roots[n_roots] = p
                slot[p] = n_roots
                n_roots += 1
            if size[a] > best_size or (size[a] == best_size and first[a] < best_first):
                best, best_size, best_first = a, size[a], first[a]
        if best >= 0:
            largest[lv, 0], largest[lv, 1], largest[lv, 2], largest[lv, 3] = x0[best], y0[best], x1[best], y1[best]
        if want_all:
            need = n_all + max(n_roots, 1)
            if need > capacity:
                capacity = max(2 * capacity, need)
                grown = np.zeros((capacity, 4), dtype=np.int64)
                grown[:n_all] = all_boxes[:n_all]
                all_boxes = grown
                grown_levels = np.zeros(capacity, dtype=np.int64)
                grown_levels[:n_all] = all_levels[:n_all]
                all_levels = grown_levels
            if n_roots == 0:
                all_levels[n_all] = lv
                n_all += 1
            for k in range(n_roots):
                r = roots[k]
                all_boxes[n_all, 0], all_boxes[n_all, 1], all_boxes[n_all, 2], all_boxes[n_all, 3] = (
                    x0[r], y0[r], x1[r], y1[r])
                all_levels[n_all] = lv
                n_all += 1
    return largest, all_boxes[:n_all], all_levels[:n_all]


def _paper_image_boxes(score: np.ndarray, thresholds: np.ndarray, want_all: bool = True) -> ImageBoxes:
    """One map [H, W] at every threshold, DESIGN.md protocol: mask = map >= t, 8-connected components.

    Returns the largest component's box per threshold [T, 4] (by pixel count, ties to the first in
    raster order; (0, 0, 0, 0) for an empty mask), every component's box [K, 4] and their threshold
    indices [K] (an empty mask contributes one (0, 0, 0, 0) row; K = 0 without ``want_all``)."""
    height, width = score.shape
    order = np.argsort(thresholds, kind="stable")
    # float64 in (exact for float32 maps): one compiled signature for every map dtype
    values = np.ascontiguousarray(score, dtype=np.float64).reshape(-1)
    ascending = np.ascontiguousarray(thresholds[order], dtype=np.float64)
    largest, boxes, levels = _sweep(values, ascending, int(height), int(width), bool(want_all))
    out = np.empty_like(largest)
    out[order] = largest
    return out, boxes, order[levels]


def largest_component_boxes(maps: ArrayLike, thresholds: Thresholds = None) -> np.ndarray:
    """Box of the largest 8-connected component of ``map >= t`` for every map and threshold
    (DESIGN.md localization; activation-decomposition-tip2021 Sec. VI-A: "the bounding box that
    covers the largest connected component in the mask"), from one union-find sweep per map.

    Args:
        maps: [N, H, W] maps in the input frame, thresholded as given (normalise first); float64
            stays float64, other types become float32.
        thresholds: [T]; default ``threshold_grid()``.

    Returns:
        [N, T, 4] int64 (x0, y0, x1, y1) pixel-edge boxes (x1 = max x + 1). Size ties go to the
        component met first in raster order; an empty mask gives (0, 0, 0, 0) (area 0, IoU 0).
    """
    arr = _as_maps(maps, None)
    grid = _check_thresholds(thresholds)
    out = np.zeros((len(arr), grid.size, 4), dtype=np.int64)
    for n, m in enumerate(arr):
        out[n] = _paper_image_boxes(m, grid, want_all=False)[0]
    return out


def all_component_boxes(maps: ArrayLike, thresholds: Thresholds = None) -> ComponentBoxes:
    """Every 8-connected component's tight box of ``map >= t``, for MaxBoxAccV2's multi-contour
    evaluation (Choe et al. CVPR 2020: a prediction is correct when ANY box reaches the IoU). Same
    conventions as ``largest_component_boxes``; an empty mask contributes one (0, 0, 0, 0) row."""
    arr = _as_maps(maps, None)
    grid = _check_thresholds(thresholds)
    return _ragged([_paper_image_boxes(m, grid) for m in arr])
