"""4-connected labelling of equal-valued regions, vectorised with numpy (scipy is not a dependency).

Pixels are first grouped into horizontal runs of equal value (one per row segment), then runs of adjacent rows
with the same value and overlapping columns are joined by a vectorised union-find (hook every root onto its
smallest neighbouring root, then pointer-jump to the roots; the number of trees per region at least halves each
round). Flat-coloured images have few runs per row, so a 1000 x 1000 image labels in milliseconds; noise images
still finish in a few rounds of O(H W) work.
"""

from __future__ import annotations

import numpy as np


def _compress(parent: np.ndarray) -> np.ndarray:
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def label_regions(values: np.ndarray) -> tuple[np.ndarray, int]:
    """(H, W) integer map -> (labels (H, W) int32 in [0, n), n): 4-connected regions of equal value.

    Regions are numbered in raster order of their first pixel (top row first, then left to right)."""
    values = np.asarray(values)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"expected a non-empty (H, W) map, got shape {values.shape}")
    H, W = values.shape
    start = np.ones((H, W), dtype=bool)
    start[:, 1:] = values[:, 1:] != values[:, :-1]
    run_id = (np.cumsum(start.ravel()) - 1).reshape(H, W)
    n_runs = int(run_id[-1, -1]) + 1

    # One edge per pair of vertically overlapping equal-valued runs: at the first column of their overlap one of
    # the two runs starts, and no other run starts inside the overlap.
    link = (values[1:] == values[:-1]) & (start[1:] | start[:-1])
    u = run_id[:-1][link]
    v = run_id[1:][link]

    parent = np.arange(n_runs, dtype=np.int64)
    while u.size:
        parent = _compress(parent)
        ru, rv = parent[u], parent[v]
        cross = ru != rv
        if not cross.any():
            break
        u, v, ru, rv = u[cross], v[cross], ru[cross], rv[cross]
        # Hooking roots onto smaller roots cannot form cycles, and the region's smallest run stays its root.
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))
    parent = _compress(parent)
    roots, comp = np.unique(parent, return_inverse=True)
    return comp.astype(np.int32)[run_id], int(roots.size)
