"""Mask pooling on the feature grid: exact per-cell coverage (hand-computed and brute force), mean features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmbseg.pooling import cell_coverage, mask_pool


def brute_coverage(mask: np.ndarray, grid_hw, cell_size_xy, k: int) -> np.ndarray:
    """Reference: supersample each pixel k x k times and count sub-pixel centres per cell (exact when the cell
    borders fall on multiples of 1/k px)."""
    H, W = mask.shape
    hg, wg = grid_hw
    cw, ch = cell_size_xy
    fine = np.repeat(np.repeat(mask, k, 0), k, 1)
    ys = (np.arange(H * k) + 0.5) / k
    xs = (np.arange(W * k) + 0.5) / k
    r = np.minimum((ys / ch).astype(int), hg - 1)
    c = np.minimum((xs / cw).astype(int), wg - 1)
    out = np.zeros(grid_hw)
    np.add.at(out, (r[:, None].repeat(W * k, 1)[fine], c[None, :].repeat(H * k, 0)[fine]), 1.0)
    return out / (k * k) / (cw * ch)


def test_hand_computed_coverage():
    # 3 x 3 px image, 2 x 2 grid of 1.5 px cells. Pixel (0, 0) lies wholly in cell (0, 0): 1 / 2.25 of it.
    m = np.zeros((1, 3, 3), dtype=bool)
    m[0, 0, 0] = True
    torch.testing.assert_close(cell_coverage(m, (2, 2), (1.5, 1.5)), torch.tensor([[[1 / 2.25, 0.0], [0.0, 0.0]]]))
    # The centre pixel is split in four quarters, one per cell: 0.25 / 2.25 each.
    m = np.zeros((1, 3, 3), dtype=bool)
    m[0, 1, 1] = True
    torch.testing.assert_close(cell_coverage(m, (2, 2), (1.5, 1.5)), torch.full((1, 2, 2), 0.25 / 2.25))
    # Cells smaller than a pixel: one pixel of a 2 x 2 image spans 2 x 2 cells of 0.5 px, all fully covered.
    m = np.zeros((1, 2, 2), dtype=bool)
    m[0, 1, 0] = True
    expect = torch.zeros(1, 4, 4)
    expect[0, 2:, :2] = 1.0
    torch.testing.assert_close(cell_coverage(m, (4, 4), (0.5, 0.5)), expect)


@pytest.mark.parametrize("hw,grid", [((30, 50), (4, 8)), ((17, 23), (8, 5)), ((7, 9), (14, 12))])
def test_coverage_matches_brute_force(hw, grid):
    H, W = hw
    rng = np.random.default_rng(H + W)
    masks = rng.random((3, H, W)) < 0.4
    cell = (W / grid[1], H / grid[0])
    got = cell_coverage(masks, grid, cell).numpy()
    k = int(np.lcm(grid[0], grid[1]))  # borders at multiples of 1/k px, so the supersampled count is exact
    for i in range(3):
        np.testing.assert_allclose(got[i], brute_coverage(masks[i], grid, cell, k), atol=1e-5)


def test_mask_pool_is_the_mean_feature_under_the_mask():
    # Integer cells (4 px): the mean over the mask's pixels of the feature of the cell under each pixel.
    H, W, P = 12, 16, 4
    rng = np.random.default_rng(0)
    feats = torch.from_numpy(rng.normal(size=(H // P, W // P, 5))).float()
    masks = rng.random((4, H, W)) < 0.3
    masks[3] = False
    masks[2] = False
    masks[2, 4:8, 8:12] = True  # exactly cell (1, 2)
    pixel_feats = feats.repeat_interleave(P, 0).repeat_interleave(P, 1).numpy()  # (H, W, D)
    got = mask_pool(masks, feats, (P, P))
    for i in range(2):
        expect = torch.from_numpy(pixel_feats[masks[i]].mean(0)).float()
        torch.testing.assert_close(got[i], expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], feats[1, 2])
    torch.testing.assert_close(got[3], torch.zeros(5))  # an empty mask pools to zeros
    assert mask_pool(np.zeros((0, H, W), bool), feats, (P, P)).shape == (0, 5)


def test_grid_must_tile_the_image():
    with pytest.raises(ValueError, match="tile"):
        cell_coverage(np.zeros((1, 10, 10), bool), (2, 2), (4.0, 5.0))
    with pytest.raises(ValueError, match=r"\(Hg, Wg, D\)"):
        mask_pool(np.zeros((1, 10, 10), bool), torch.zeros(2, 2), (5.0, 5.0))


def test_mask_pool_of_a_list_equals_the_stack():
    """The label pipeline hands its masks over unstacked: same float32 bits as the stacked call, odd sizes and
    chunk boundaries included."""
    import fmbseg.pooling as pooling

    rng = np.random.default_rng(5)
    H, W = 37, 53
    hg, wg = 8, 11  # cells of 4.625 x 4.818 px: fractional, tiling the image
    feats = torch.from_numpy(rng.normal(size=(hg, wg, 6))).float()
    masks = rng.random((7, H, W)) < rng.random((7, 1, 1))
    masks[3] = False
    cell = (W / wg, H / hg)
    for chunk_pixels in (1 << 23, 3 * H * W):  # one chunk, and chunks of 3 masks
        old = pooling._CHUNK_PIXELS
        pooling._CHUNK_PIXELS = chunk_pixels
        try:
            a, b = mask_pool(masks, feats, cell), mask_pool(list(masks), feats, cell)
            assert torch.equal(a, b)
            assert torch.equal(cell_coverage(masks, (hg, wg), cell), cell_coverage(list(masks), (hg, wg), cell))
        finally:
            pooling._CHUNK_PIXELS = old
    assert mask_pool([], feats, cell).shape == (0, 6)
    with pytest.raises(ValueError, match="must all be"):
        mask_pool([masks[0], masks[1][:, :-1]], feats, cell)
