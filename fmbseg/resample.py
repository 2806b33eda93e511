"""Pillow's `Image.resize` (BICUBIC, BILINEAR) for uint8 images as torch integer ops, bit for bit, on any device.

Why: the label pipeline's two resizes per image — the CLIP upscale (bicubic, 2x) and SAM's long-side resize
(bilinear, the PIL path of `ResizeLongestSide`) — were half of its host CPU time per image. On a GPU server they
can run on the device instead, from the uploaded original, with the same bytes out (so no stored byte or label
changes with where they run).

Pillow's algorithm (src/libImaging/Resample.c), replicated: per axis, `precompute_coeffs` in float64 (filter
support scaled by the downscale factor: antialiased shrinking), each output pixel a window of input pixels
`[xmin, xmin + xmax)`, coefficients normalised to sum 1 then to fixed point with 22 fractional bits
(`normalize_coeffs_8bpc`); two passes, each into 8 bits (the order Pillow takes: `pass_order`); each pass
`clip8((1 << 21) + sum(pixel * coeff))` = the sum shifted right 22 bits, clamped to [0, 255]. The coefficients
are computed here with numpy in the same float64 operations in the same order as the C code (the tests compare
with the installed Pillow on many sizes both ways); the sums are int32 and exact in any order (|sum| < 2^31).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

PRECISION_BITS = 32 - 8 - 2
_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}


def _filter(name: str, x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    if name == "bilinear":
        return np.where(x < 1.0, 1.0 - x, 0.0)
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@lru_cache(maxsize=64)
def resample_coeffs(in_size: int, out_size: int, filter: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the whole axis (box 0..in_size) ->
    (xmin (out,) int64, xmax (out,) int64 window lengths, kk (out, ksize) int32 fixed-point coefficients, zero
    beyond each window)."""
    if filter not in _SUPPORT:
        raise ValueError(f"filter must be one of {sorted(_SUPPORT)}, got {filter!r}")
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = _SUPPORT[filter] * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    center = 0.0 + (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    ss = 1.0 / filterscale
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    x = np.arange(ksize, dtype=np.int64)
    inside = x[None, :] < xmax[:, None]
    w = np.where(inside, _filter(filter, ((x[None, :] + xmin[:, None]).astype(np.float64) - center[:, None] + 0.5)
                                 * ss), 0.0)
    ww = np.zeros(out_size, np.float64)
    for t in range(ksize):  # the C loop's summation order
        ww += w[:, t]
    k = np.where(inside & (ww[:, None] != 0.0), w / np.where(ww == 0.0, 1.0, ww)[:, None], w)
    k = np.where(inside, k, 0.0)
    fixed = k * (1 << PRECISION_BITS)
    kk = np.where(k < 0, np.trunc(-0.5 + fixed), np.trunc(0.5 + fixed)).astype(np.int32)
    return xmin, xmax, kk


@lru_cache(maxsize=256)
def _device_coeffs(in_size: int, out_size: int, filter: str, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(taps (ksize, out) int64 source indices, kk (ksize, out) int32) on `device`, uploaded once per size."""
    xmin, _, kk = resample_coeffs(in_size, out_size, filter)
    idx = np.minimum(xmin[:, None] + np.arange(kk.shape[1]), in_size - 1)  # past a window: coefficient 0
    return (torch.as_tensor(np.ascontiguousarray(idx.T), device=device),
            torch.as_tensor(np.ascontiguousarray(kk.T), device=device))


def _pass(x: torch.Tensor, dim: int, out_size: int, filter: str) -> torch.Tensor:
    """One 8-bit pass along `dim` (0: rows, 1: columns) of (H, W, C) uint8."""
    taps, kk = _device_coeffs(int(x.shape[dim]), out_size, filter, x.device)
    shape = (-1, 1, 1) if dim == 0 else (1, -1, 1)
    src = x.to(torch.int32)
    acc = torch.full((), 1 << (PRECISION_BITS - 1), dtype=torch.int32, device=x.device)
    for t in range(kk.shape[0]):
        acc = acc + src.index_select(dim, taps[t]) * kk[t].reshape(shape)
    return torch.bitwise_right_shift(acc, PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


@lru_cache(maxsize=4096)
def pass_order(in_hw: tuple[int, int], out_hw: tuple[int, int], filter: str) -> str | None:
    """The order in which the installed Pillow runs the two passes of this resize: "hv" (horizontal first, as
    Pillow <= 12 always did), "vh", or None when a probe cannot tell (then the caller resizes with PIL itself).

    Pillow 13 runs the vertical pass first for some downscales, by a rule it does not document; each 8-bit pass
    rounds, so the order changes bytes. The probe resizes one seeded noise image of this shape with PIL whole and
    as each one-axis sequence (one-axis resizes have no order) and keeps the order that reproduces the whole
    resize, once per (shape, size, filter): a labeling run sees few distinct image shapes."""
    (H, W), (h, w) = in_hw, out_hw
    if H == h or W == w:
        return "hv"
    from PIL import Image

    f = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[filter]
    probe = Image.fromarray(np.random.default_rng([H, W, h, w]).integers(0, 256, (H, W, 3), dtype=np.uint8))
    whole = np.asarray(probe.resize((w, h), resample=f))
    hv = np.asarray(probe.resize((w, H), resample=f).resize((w, h), resample=f))
    vh = np.asarray(probe.resize((W, h), resample=f).resize((w, h), resample=f))
    if np.array_equal(hv, vh):
        return None
    if np.array_equal(whole, hv):
        return "hv"
    if np.array_equal(whole, vh):
        return "vh"
    return None


def pil_resize(image: torch.Tensor | np.ndarray, height: int, width: int, filter: str = "bicubic") -> torch.Tensor:
    """(H, W, C) uint8 -> (height, width, C) uint8 on the image's device, equal to
    `np.asarray(Image.fromarray(image).resize((width, height), resample=BICUBIC | BILINEAR))` (the same tensor
    when the size is unchanged). Raises `UnknownPassOrder` when `pass_order` cannot tell Pillow's order for this
    resize (the caller then uses PIL)."""
    x = torch.as_tensor(image)
    if x.ndim != 3 or x.dtype != torch.uint8:
        raise ValueError(f"expected an (H, W, C) uint8 image, got {tuple(x.shape)} {x.dtype}")
    if height < 1 or width < 1:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    if filter not in _SUPPORT:
        raise ValueError(f"filter must be one of {sorted(_SUPPORT)}, got {filter!r}")
    order = pass_order((int(x.shape[0]), int(x.shape[1])), (int(height), int(width)), filter)
    if order is None:
        raise UnknownPassOrder(f"cannot tell the order of Pillow's passes for {tuple(x.shape[:2])} -> "
                               f"{(height, width)} ({filter})")
    for dim in ((1, 0) if order == "hv" else (0, 1)):  # a pass only when its size changes, as Pillow
        size = width if dim == 1 else height
        if x.shape[dim] != size:
            x = _pass(x, dim, size, filter)
    return x


class UnknownPassOrder(RuntimeError):
    """`pil_resize` cannot reproduce Pillow for this size (see `pass_order`)."""
