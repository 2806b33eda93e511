"""4-connected labelling of equal-valued regions against a breadth-first-search reference."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from fmbseg.testing.components import label_regions


def bfs_regions(values: np.ndarray) -> tuple[np.ndarray, int]:
    H, W = values.shape
    lab = np.full((H, W), -1)
    n = 0
    for i in range(H):
        for j in range(W):
            if lab[i, j] >= 0:
                continue
            lab[i, j] = n
            queue = deque([(i, j)])
            while queue:
                a, b = queue.popleft()
                for y, x in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                    if 0 <= y < H and 0 <= x < W and lab[y, x] < 0 and values[y, x] == values[a, b]:
                        lab[y, x] = n
                        queue.append((y, x))
            n += 1
    return lab, n


def test_matches_bfs_on_random_maps():
    rng = np.random.default_rng(0)
    for _ in range(60):
        H, W = rng.integers(1, 25, size=2)
        values = rng.integers(0, rng.integers(1, 4), size=(H, W))
        got, n = label_regions(values)
        ref, m = bfs_regions(values)
        assert n == m
        np.testing.assert_array_equal(got, ref)  # same raster-order numbering


def test_long_thin_and_diagonal_shapes():
    # A serpentine of value 0 is one region; diagonal neighbours are not connected (4-connectivity).
    v = np.ones((9, 10), dtype=int)
    v[0::4, :] = 0
    v[1::4, -1] = 0
    v[2::4, :] = 0
    v[3::4, 0] = 0
    labels, n = label_regions(v)
    assert labels[v == 0].min() == labels[v == 0].max()
    checker = np.indices((4, 4)).sum(0) % 2
    assert label_regions(checker)[1] == 16
    big = np.zeros((1000, 1000), dtype=np.int64)
    big[1::4, :-1] = 1
    big[3::4, 1:] = 1
    assert label_regions(big)[1] == 1 + 500
    with pytest.raises(ValueError):
        label_regions(np.zeros((0, 3)))
