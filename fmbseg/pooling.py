"""Mask pooling on a feature grid: the mean feature under each mask as one matrix product (DESIGN §1, Stage 1.2).

The grid tiles the original image exactly: cell (r, c) covers original px x in [c cw, (c + 1) cw),
y in [r ch, (r + 1) ch) with (cw, ch) = `cell_size_xy` (for `SlidingFeatures`, cw = P / sx). Pixel (i, j) covers
[j, j + 1) x [i, i + 1). Each mask is reduced to the exact area it shares with every cell (separable box integrals
via cumulative sums, so fractional cell sizes, larger or smaller than a pixel, are handled exactly), and the pooled
feature is sum_cells area * feature / mask area: the mean over the mask's pixels of the feature of the cell under
each point.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

# Masks are converted to float in chunks of at most this many pixels to bound memory on large images.
_CHUNK_PIXELS = 1 << 23


def _box_integrals(x: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """x (..., L) piecewise constant on unit intervals; bounds (G + 1,) increasing in [0, L]
    -> (..., G) integrals of x over [bounds[g], bounds[g + 1])."""
    L = x.shape[-1]
    csum = torch.cumsum(x, dim=-1)  # inclusive: csum[i] = integral over [0, i + 1)
    idx = bounds.floor().long().clamp(0, L - 1)
    frac = (bounds - idx.to(bounds.dtype)).to(x.dtype)
    # integral over [0, b) = integral over [0, idx) + frac * x[idx] = csum[idx] + (frac - 1) * x[idx]
    at = csum.index_select(-1, idx) + (frac - 1.0) * x.index_select(-1, idx)
    return at[..., 1:] - at[..., :-1]


def cell_bounds(n_cells: int, cell_size: float, length: int, device=None) -> torch.Tensor:
    """(n_cells + 1,) float64 cell borders in px, the last one pinned to `length` (the grid tiles the image)."""
    if abs(n_cells * cell_size - length) > 1e-6 * max(length, 1) + 1e-9:
        raise ValueError(f"a grid of {n_cells} cells of {cell_size} px does not tile an axis of {length} px")
    b = torch.arange(n_cells + 1, dtype=torch.float64, device=device) * cell_size
    b[-1] = float(length)
    return b.clamp_(0.0, float(length))


def _mask_chunks(masks: torch.Tensor | np.ndarray | Sequence[np.ndarray], device=None):
    """(N, H, W) masks -> (N, H, W, get(n0, n1) -> (n1 - n0, H, W) float32 on `device`). A sequence of (H, W)
    arrays is never stacked: each chunk's float32 buffer is filled mask by mask (the conversion the chunk needs
    anyway; a stack would be one more full-resolution copy of every mask)."""
    if isinstance(masks, (list, tuple)):
        items = [torch.as_tensor(np.ascontiguousarray(m)) for m in masks]
        H, W = tuple(items[0].shape) if items else (0, 0)
        for m in items:
            if m.shape != (H, W):
                raise ValueError(f"masks must all be (H, W) = {(H, W)}, got one of shape {tuple(m.shape)}")
        dev = torch.device("cpu") if device is None else torch.device(device)

        def get(n0: int, n1: int) -> torch.Tensor:
            out = torch.empty(len(items[n0:n1]), H, W, dtype=torch.float32, device=dev)
            for j, m in enumerate(items[n0:n1]):
                out[j].copy_(m)
            return out

        return len(items), H, W, get
    masks = torch.as_tensor(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {tuple(masks.shape)}")
    if device is not None:
        masks = masks.to(device)
    return (*masks.shape, lambda n0, n1: masks[n0:n1].to(torch.float32))


def cell_coverage(masks: torch.Tensor | np.ndarray | Sequence[np.ndarray], grid_hw: tuple[int, int],
                  cell_size_xy: tuple[float, float], device=None) -> torch.Tensor:
    """masks (N, H, W) bool (or a sequence of N (H, W) bool arrays) -> (N, Hg, Wg) float32 on `device` (default:
    the masks' device): the fraction of each grid cell the mask covers, in [0, 1]."""
    N, H, W, chunk = _mask_chunks(masks, device)
    dev = chunk(0, 0).device
    hg, wg = grid_hw
    cw, ch = cell_size_xy
    bx = cell_bounds(wg, cw, W, dev)
    by = cell_bounds(hg, ch, H, dev)
    out = torch.empty(N, hg, wg, dtype=torch.float32, device=dev)
    step = max(1, _CHUNK_PIXELS // max(H * W, 1))
    for n0 in range(0, N, step):
        # float32 is exact for the 0/1 running sums (< 2^24) and leaves ~1e-6 error on the coverage fractions.
        m = chunk(n0, n0 + step)
        rows = _box_integrals(m, bx)  # (n, H, Wg): area per (row, cell column)
        cells = _box_integrals(rows.transpose(1, 2), by).transpose(1, 2)  # (n, Hg, Wg)
        out[n0 : n0 + step] = cells / (cw * ch)
    return out


def mask_pool(masks: torch.Tensor | np.ndarray | Sequence[np.ndarray], feats: torch.Tensor,
              cell_size_xy: tuple[float, float]) -> torch.Tensor:
    """Mean feature under each mask.

    masks: (N, H, W) bool at the original resolution, or a sequence of N (H, W) bool arrays (not stacked: see
    `cell_coverage`); feats: (Hg, Wg, D) grid whose cells measure `cell_size_xy` = (width, height) original px and
    tile the image. Returns (N, D) float32 on `feats.device` (not normalised); an empty mask pools to zeros."""
    if feats.ndim != 3:
        raise ValueError(f"feats must be (Hg, Wg, D), got shape {tuple(feats.shape)}")
    hg, wg, D = feats.shape
    if len(masks) == 0:
        if not isinstance(masks, (list, tuple)) and np.ndim(masks) != 3:
            raise ValueError(f"masks must be (N, H, W), got shape {tuple(np.shape(masks))}")
        return torch.zeros(0, D, dtype=torch.float32, device=feats.device)
    cov = cell_coverage(masks, (hg, wg), cell_size_xy, feats.device)
    cov = cov.reshape(cov.shape[0], hg * wg)
    # float64 accumulation: the float32 result then does not depend on the thread count's summation order, so
    # workers with different numbers of cores write the same scores.
    cov = cov.double()
    weight = cov / cov.sum(1, keepdim=True).clamp_min(1e-12)
    return (weight @ feats.reshape(hg * wg, D).double()).float()
