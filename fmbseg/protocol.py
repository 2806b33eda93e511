"""The evaluation protocol of TCL (mmsegmentation 0.27 + mmcv 1.6, DESIGN §2), piece by piece, without mmcv.

- `rescale_size`: mmseg's `Resize(keep_ratio=True)` with `img_scale=(2048, 448)` (mmcv `rescale_size`: scale
  factor min(long/max(h, w), short/min(h, w)), sizes rounded half up with `int(x + 0.5)`).
- `resize_uint8`: mmcv `imresize(..., 'bilinear')` = `cv2.resize(INTER_LINEAR)` on the uint8 image, no
  antialiasing, reproduced in integer arithmetic: OpenCV's 11-bit fixed-point taps and the rounding of its SIMD
  vertical pass (`VResizeLinearVec_32s8u`), so the result equals OpenCV's byte for byte on x86 builds (tests
  compare with cv2 side by side). Geometry: source coordinate (d + 0.5) * in / out - 0.5; columns clamp the
  coordinate at the borders, rows clamp the row index (OpenCV's own asymmetry, kept).
- `SlidingWindow`: mmseg's `slide_inference` windows (crop 448, stride 224, last row/column flush with the border;
  an image smaller than a window is one smaller window).
- `patch_padding`: TCL's `compute_padsize`: a window whose side is not a multiple of the patch is zero-padded (zero
  of the *normalised* image) to the next multiple, the padding split left/right (top/bottom) with the smaller
  half first; the window's logits are upsampled bilinearly to the padded size and cut back.
- `upsampled_argmax`: the averaged logits resized bilinearly (align_corners=False) to the original image size,
  arg-max there (mmseg `resize` + `simple_test`), computed in channel chunks so memory stays bounded.
  mmseg takes the arg-max of the softmax; the softmax is monotone, so only exact float ties after the softmax can
  differ (a first-index tie-break on values a few ulp apart), which the plain arg-max here does not reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

_COEF_BITS = 11                     # OpenCV's INTER_RESIZE_COEF_BITS
_COEF_SCALE = 1 << _COEF_BITS


def rescale_size(height: int, width: int, short_side: int = 448, max_long_side: int = 2048) -> tuple[int, int]:
    """mmcv `rescale_size((w, h), (max_long_side, short_side))` -> (new height, new width)."""
    scale = min(max_long_side / max(height, width), short_side / min(height, width))
    return int(height * float(scale) + 0.5), int(width * float(scale) + 0.5)


def _linear_taps(in_n: int, out_n: int, clamp_coordinate: bool) -> tuple[np.ndarray, ...]:
    """OpenCV's INTER_LINEAR taps along one axis -> (index0, index1, weight0, weight1), weights in 1/2048.

    Columns (`clamp_coordinate`): a coordinate left of the first pixel or at/after the last one is moved onto it
    with weight (2048, 0). Rows: the coordinate is kept and the two row indices are clipped into the image."""
    inv_scale = out_n / in_n
    scale = 1.0 / inv_scale
    f = ((np.arange(out_n, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    f = (f - s.astype(np.float32)).astype(np.float32)
    if clamp_coordinate:
        low = s < 0
        f[low], s[low] = 0, 0
        high = s >= in_n - 1
        f[high], s[high] = 0, in_n - 1
    w0 = np.rint((np.float32(1) - f) * np.float32(_COEF_SCALE)).astype(np.int32)
    w1 = np.rint(f * np.float32(_COEF_SCALE)).astype(np.int32)
    return np.clip(s, 0, in_n - 1), np.clip(s + 1, 0, in_n - 1), w0, w1


def resize_uint8(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """(H, W[, C]) uint8 -> (h, w[, C]) uint8 as `cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)`."""
    if image.dtype != np.uint8:
        raise ValueError(f"resize_uint8 takes a uint8 image, got {image.dtype}")
    h, w = image.shape[:2]
    oh, ow = int(out_hw[0]), int(out_hw[1])
    if oh < 1 or ow < 1:
        raise ValueError(f"cannot resize to {out_hw}")
    if (oh, ow) == (h, w):
        return image.copy()
    x0, x1, a0, a1 = _linear_taps(w, ow, clamp_coordinate=True)
    y0, y1, b0, b1 = _linear_taps(h, oh, clamp_coordinate=False)
    extra = (1,) * (image.ndim - 2)
    a0, a1 = a0.reshape((1, ow) + extra), a1.reshape((1, ow) + extra)
    # Horizontal pass, exact integers (scale 2^11); columns are picked before widening, so memory is (H, w', C).
    rows = image[:, x0].astype(np.int32) * a0 + image[:, x1].astype(np.int32) * a1
    b0, b1 = b0.reshape((oh, 1) + extra), b1.reshape((oh, 1) + extra)
    # Vertical pass as OpenCV's SIMD kernel: 16-bit high products of (row >> 4) and the 11-bit weights, then +2 >> 2.
    out = (((rows[y0] >> 4) * b0) >> 16) + (((rows[y1] >> 4) * b1) >> 16)
    return np.clip((out + 2) >> 2, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class SlidingWindow:
    """TCL's evaluation protocol (DESIGN §2): resize so the short side is `short_side` with the long side at most
    `max_long_side`, then `window`² windows at `stride`, logits averaged over overlaps."""

    short_side: int = 448
    max_long_side: int = 2048
    window: int = 448
    stride: int = 224
    batch_size: int = 8

    def resized_hw(self, height: int, width: int) -> tuple[int, int]:
        """mmseg's keep-ratio resize (mmcv `rescale_size`, rounded half up), at least 1 px per side."""
        rh, rw = rescale_size(height, width, self.short_side, self.max_long_side)
        return max(1, rh), max(1, rw)

    def windows(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """(y0, x0, y1, x1) windows over an image of that size, in mmseg `slide_inference`'s order."""
        rows = max(height - self.window + self.stride - 1, 0) // self.stride + 1
        cols = max(width - self.window + self.stride - 1, 0) // self.stride + 1
        out = []
        for r in range(rows):
            for c in range(cols):
                y1, x1 = min(r * self.stride + self.window, height), min(c * self.stride + self.window, width)
                out.append((max(y1 - self.window, 0), max(x1 - self.window, 0), y1, x1))
        return out


def patch_padding(height: int, width: int, patch: int) -> tuple[int, int, int, int]:
    """TCL's `compute_padsize` -> (left, right, top, bottom) padding up to multiples of `patch`."""
    left = right = top = bottom = 0
    if width % patch:
        lr = patch - width % patch
        left, right = lr // 2, lr - lr // 2
    if height % patch:
        tb = patch - height % patch
        top, bottom = tb // 2, tb - tb // 2
    return left, right, top, bottom


def upsampled_argmax(logits: torch.Tensor, out_hw: tuple[int, int], max_bytes: int = 256 << 20) -> torch.Tensor:
    """(P, h, w) logits -> (H, W) int64 arg-max over P of the logits resized bilinearly (align_corners=False) to
    `out_hw`. Bilinear resizing acts on each channel alone, so resizing `max_bytes`-sized channel chunks and
    keeping a running maximum (ties keep the lower index, as `argmax`) equals resizing all at once."""
    p = logits.shape[0]
    oh, ow = int(out_hw[0]), int(out_hw[1])
    per_channel = oh * ow * 4
    chunk = max(1, min(p, max_bytes // max(per_channel, 1)))
    best_val = best_idx = None
    for c0 in range(0, p, chunk):
        up = F.interpolate(logits[None, c0:c0 + chunk].float(), size=(oh, ow), mode="bilinear",
                           align_corners=False)[0]
        val, idx = up.max(dim=0)
        del up
        if best_val is None:
            best_val, best_idx = val, idx + c0
        else:
            better = val > best_val
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx + c0, best_idx)
    return best_idx
