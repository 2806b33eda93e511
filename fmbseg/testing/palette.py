"""The synthetic world's 12-colour palette (DESIGN §6): every colour is a class, the background colour too.

A pixel belongs to the palette colour nearest to it in RGB (Euclidean), so JPEG noise and resampling blends
are classified without any threshold. Class index k is `PALETTE_NAMES[k]` with colour `PALETTE_RGB[k]`.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (220, 40, 40)),
    ("green", (40, 170, 60)),
    ("blue", (40, 70, 210)),
    ("yellow", (235, 210, 40)),
    ("magenta", (200, 50, 200)),
    ("cyan", (40, 200, 210)),
    ("orange", (240, 140, 30)),
    ("purple", (110, 50, 160)),
    ("gray", (128, 128, 128)),
    ("brown", (130, 80, 40)),
    ("white", (245, 245, 245)),
    ("black", (15, 15, 15)),
)

PALETTE_NAMES: tuple[str, ...] = tuple(name for name, _ in PALETTE)
PALETTE_RGB: np.ndarray = np.array([rgb for _, rgb in PALETTE], dtype=np.uint8)  # (12, 3)
PALETTE_RGB.setflags(write=False)
NUM_COLOURS = len(PALETTE)


def palette_index(name: str) -> int:
    """Class index of a palette colour name (case and surrounding blanks ignored); ValueError when unknown."""
    key = name.strip().lower()
    try:
        return PALETTE_NAMES.index(key)
    except ValueError:
        raise ValueError(f"{name!r} is not a palette colour; the palette is {list(PALETTE_NAMES)}") from None


@functools.lru_cache(maxsize=1)
def _lut() -> np.ndarray:
    """(256^3,) uint8: nearest palette index of every 8-bit RGB colour, index r * 65536 + g * 256 + b (16 MiB,
    built once per process in about a second; ties go to the lower palette index)."""
    pal = PALETTE_RGB.astype(np.int32)
    levels = np.arange(256, dtype=np.int32)
    gb = np.stack(np.meshgrid(levels, levels, indexing="ij"), -1).reshape(-1, 2)  # (65536, 2) (g, b)
    d_gb = ((gb[:, None, :] - pal[None, :, 1:]) ** 2).sum(-1)  # (65536, 12)
    d_r = (levels[:, None] - pal[None, :, 0]) ** 2  # (256, 12)
    out = np.empty(256**3, dtype=np.uint8)
    for r in range(256):
        out[r * 65536 : (r + 1) * 65536] = (d_gb + d_r[r]).argmin(-1)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=4)
def _lut_on(device: torch.device) -> torch.Tensor:
    return torch.from_numpy(_lut().copy()).to(device)


def nearest_colour(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) int64 index of the nearest palette colour (Euclidean in RGB)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    px = image.astype(np.int32)
    return _lut()[(px[..., 0] << 16) | (px[..., 1] << 8) | px[..., 2]].astype(np.int64)


def nearest_colour_torch(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] -> (B, H, W) int64 index of the nearest palette colour (any device).

    Pixels are first rounded to 8-bit levels, which moves a decision only for colours within half a level of a
    boundary between two palette colours."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, H, W) tensor, got shape {tuple(pixels.shape)}")
    q = (pixels.float() * 255.0).round_().clamp_(0, 255)
    key = q[:, 0] * 65536.0 + q[:, 1] * 256.0 + q[:, 2]  # integers < 2^24: exact in float32
    return _lut_on(pixels.device)[key.long()].long()


def colourise(labels: np.ndarray) -> np.ndarray:
    """(H, W) int palette indices -> (H, W, 3) uint8 image with the flat palette colours."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_COLOURS):
        raise ValueError(f"palette indices must lie in [0, {NUM_COLOURS}), got [{labels.min()}, {labels.max()}]")
    return PALETTE_RGB[labels]
