"""Stage 1.1's sliding-window CLIP pass (DESIGN §1 steps 1-4): upscale with a cap, square crops at CLIP's native
size with a half-crop stride (last row/column flush), batched crops, dense features stitched with overlaps averaged.

Geometry (DESIGN is silent; written down in docs/ARCHITECTURE.md): with crop size S and patch size P, each axis of
the upscaled image is rounded to a multiple of P and raised to at least S (a small image is upscaled more rather
than padded); crop offsets are multiples of P (stride = S/2 rounded down to a multiple of P). So every crop patch
lands exactly on one cell of a global grid of P x P upscaled px, and overlapping crops only ever average features
of the same cell. The per-axis scale `scale_xy = (Wu / W, Hu / H)` keeps the mapping to original px exact:
grid cell (r, c) covers original px x in [c P / sx, (c + 1) P / sx), y in [r P / sy, (r + 1) P / sy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fmbseg.device import autocast
from fmbseg.models.base import ClipModel
from fmbseg.resample import pass_order, pil_resize


@dataclass
class SlidingFeatures:
    """Everything Stage 1 needs from the sliding-window pass over one image.

    crop_cls: (N, D) L2-normalised CLS embedding of every crop (row-major crop order).
    crop_boxes: (N, 4) int64 XYXY of every crop in upscaled px (x1, y1 exclusive).
    dense: (Hg, Wg, D) stitched dense embeddings (overlaps averaged), then L2-normalised; cell = P upscaled px.
    scale_xy: upscaled px per original px along x and y.
    patch_size: P, upscaled px per grid cell side.
    image_hw: (H, W) of the original image."""

    crop_cls: torch.Tensor
    crop_boxes: np.ndarray
    dense: torch.Tensor
    scale_xy: tuple[float, float]
    patch_size: int
    image_hw: tuple[int, int]

    @property
    def grid_hw(self) -> tuple[int, int]:
        return int(self.dense.shape[0]), int(self.dense.shape[1])

    @property
    def cell_size_xy(self) -> tuple[float, float]:
        """Width and height of one grid cell in original px."""
        return self.patch_size / self.scale_xy[0], self.patch_size / self.scale_xy[1]

    def cell_centres(self) -> np.ndarray:
        """(Hg, Wg, 2) float64 (x, y) in ORIGINAL px of every grid cell centre."""
        hg, wg = self.grid_hw
        cw, ch = self.cell_size_xy
        xs = (np.arange(wg) + 0.5) * cw
        ys = (np.arange(hg) + 0.5) * ch
        gx, gy = np.meshgrid(xs, ys)
        return np.stack([gx, gy], axis=-1)


def upscaled_size(height: int, width: int, crop_size: int, patch_size: int, upscale: float = 2.0,
                  max_side: int = 2048) -> tuple[int, int]:
    """(Hu, Wu) of the upscaled image: scale by `upscale`, capped so the long side is <= max_side, each axis
    rounded to a multiple of P (never above the cap) and raised to at least the crop size S."""
    if height < 1 or width < 1:
        raise ValueError(f"image must have positive size, got {height}x{width}")
    if not upscale > 0:
        raise ValueError(f"upscale must be > 0, got {upscale}")
    if crop_size % patch_size:
        raise ValueError(f"crop size {crop_size} is not a multiple of the patch size {patch_size}")
    if max_side < crop_size:
        raise ValueError(f"max_side {max_side} is smaller than CLIP's crop size {crop_size}")
    scale = min(float(upscale), max_side / max(height, width))
    cap = max_side // patch_size

    def axis(n: int) -> int:
        cells = min(max(int(round(n * scale / patch_size)), 1), cap)
        return max(cells * patch_size, crop_size)

    return axis(height), axis(width)


def crop_offsets(length: int, crop_size: int, patch_size: int) -> list[int]:
    """Crop start offsets along one axis of `length` upscaled px: multiples of the stride (S/2 rounded down to a
    multiple of P), then one crop flush with the far border."""
    if length < crop_size:
        raise ValueError(f"axis of {length} px is shorter than the crop size {crop_size}")
    stride = max((crop_size // 2) // patch_size * patch_size, patch_size)
    offs = list(range(0, length - crop_size + 1, stride))
    if offs[-1] != length - crop_size:
        offs.append(length - crop_size)
    return offs


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8 with PIL's bicubic filter (antialiased when shrinking)."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample=Image.Resampling.BICUBIC))


@dataclass
class SlidingInput:
    """The host half of the sliding-window pass for one image (no model work; runs ahead in the label pipeline).

    pixels: (Hu, Wu, 3) uint8 upscaled image (a numpy array, or a pinned uint8 tensor for a fast upload); or, with
      `resize_to` = (Hu, Wu) set, the original (H, W, 3) image, upscaled on the model's device by
      `fmbseg.resample.pil_resize` (the same bytes as PIL's: no host CPU for the upscale).
    boxes: (N, 4) int64 XYXY crops in upscaled px, row-major; image_hw: (H, W) of the original image."""

    pixels: np.ndarray | torch.Tensor
    boxes: np.ndarray
    image_hw: tuple[int, int]
    resize_to: tuple[int, int] | None = None


def prepare_sliding(image: np.ndarray, crop_size: int, patch_size: int, upscale: float = 2.0,
                    max_side: int = 2048, device_resize: bool = False) -> SlidingInput:
    """Upscale `image` (H, W, 3) uint8 RGB (PIL bicubic) and lay out its crops (see the module docstring).
    `device_resize`: leave the upscale to `sliding_features_many` on the model's device (same bytes), unless
    `fmbseg.resample.pass_order` cannot tell Pillow's pass order for this size (then PIL, here)."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        desc = f"{type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}"
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {desc}")
    S, P = int(crop_size), int(patch_size)
    H, W = image.shape[:2]
    Hu, Wu = upscaled_size(H, W, S, P, upscale, max_side)
    ys, xs = crop_offsets(Hu, S, P), crop_offsets(Wu, S, P)
    boxes = np.array([(x, y, x + S, y + S) for y in ys for x in xs], dtype=np.int64)
    if device_resize and pass_order((H, W), (Hu, Wu), "bicubic") is not None:
        return SlidingInput(pixels=np.ascontiguousarray(image), boxes=boxes, image_hw=(H, W), resize_to=(Hu, Wu))
    up = resize_image(np.ascontiguousarray(image), Hu, Wu)
    return SlidingInput(pixels=np.array(up, copy=True), boxes=boxes, image_hw=(H, W))


def _device_pixels(inp: SlidingInput, device: torch.device) -> torch.Tensor:
    """(3, Hu, Wu) float in [0, 1] on `device`: the upload, the upscale there when `inp.resize_to` asks for it."""
    x = torch.as_tensor(inp.pixels).to(device, non_blocking=True)
    if inp.resize_to is not None:
        x = pil_resize(x, *inp.resize_to, "bicubic")
    return x.permute(2, 0, 1).contiguous().float().div_(255.0)


def sliding_features_many(clip: ClipModel, inputs: list[SlidingInput], batch_size: int = 32,
                          across_images: bool = True) -> list[SlidingFeatures]:
    """The model half: CLIP over the crops of several prepared images, at most `batch_size` crops per
    `encode_crops` call, stitched per image in crop order. `across_images`: a batch may hold the last crops of one
    image and the first of the next (full batches for the GPU); else batches are cut per image, as
    `sliding_window_features` cuts them. Each image's result equals the one it gets alone when `encode_crops` is
    exact per crop (the oracle); a real model's CLS may move by ~1e-7 with the batch's composition (CPU GEMMs
    depend on the row count), so bit-exact callers keep `across_images=False`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    S, P = int(clip.input_size), int(clip.patch_size)
    device = clip.device
    n = S // P
    # Channels-first and contiguous once, so each crop is a cheap row-wise copy.
    pixels = [_device_pixels(inp, device) for inp in inputs]
    work = [(i, box) for i, inp in enumerate(inputs) for box in inp.boxes]
    if across_images:
        chunks = [work[b0 : b0 + batch_size] for b0 in range(0, len(work), batch_size)]
    else:
        chunks = [[(i, box) for box in inp.boxes[b0 : b0 + batch_size]]
                  for i, inp in enumerate(inputs) for b0 in range(0, len(inp.boxes), batch_size)]
    acc: list[torch.Tensor | None] = [None] * len(inputs)
    count = [torch.zeros(p.shape[1] // P, p.shape[2] // P, device=device) for p in pixels]
    cls_parts: list[list[torch.Tensor]] = [[] for _ in inputs]
    with torch.no_grad():
        for chunk in chunks:
            crops = torch.stack([pixels[i][:, y0:y1, x0:x1] for i, (x0, y0, x1, y1) in chunk])
            with autocast(device):
                cls, dense = clip.encode_crops(crops)
            cls, dense = cls.float().to(device), dense.float().to(device)
            if dense.shape[1:3] != (n, n):
                raise ValueError(f"{clip.model_id}: encode_crops returned a {tuple(dense.shape[1:3])} grid for "
                                 f"{S}px crops with patch {P}; expected ({n}, {n})")
            start = 0
            for j, ((i, (x0, y0, _, _)), d) in enumerate(zip(chunk, dense)):
                if acc[i] is None:
                    acc[i] = torch.zeros(*count[i].shape, dense.shape[-1], device=device)
                r, c = y0 // P, x0 // P
                acc[i][r : r + n, c : c + n] += d
                count[i][r : r + n, c : c + n] += 1
                if j + 1 == len(chunk) or chunk[j + 1][0] != i:  # one slice of cls per image and batch
                    cls_parts[i].append(cls[start : j + 1])
                    start = j + 1
    out = []
    for i, inp in enumerate(inputs):
        H, W = inp.image_hw
        Hu, Wu = pixels[i].shape[1:]
        out.append(SlidingFeatures(
            crop_cls=F.normalize(torch.cat(cls_parts[i]), dim=-1),
            crop_boxes=inp.boxes,
            dense=F.normalize(acc[i] / count[i][..., None], dim=-1),
            scale_xy=(Wu / W, Hu / H),
            patch_size=P,
            image_hw=(H, W),
        ))
    return out


def sliding_window_features(
    clip: ClipModel,
    image: np.ndarray,
    upscale: float = 2.0,
    max_side: int = 2048,
    batch_size: int = 32,
) -> SlidingFeatures:
    """Run CLIP over square crops of the upscaled image and stitch the dense features (DESIGN §1 steps 1-4):
    `prepare_sliding` then `sliding_features_many` on this one image.

    image: (H, W, 3) uint8 RGB. Crops are fed to `clip.encode_crops` as (B, 3, S, S) float in [0, 1], at most
    `batch_size` at a time, under bf16 autocast on CUDA. Outputs live on `clip.device`, float32."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    inp = prepare_sliding(image, int(clip.input_size), int(clip.patch_size), upscale, max_side)
    return sliding_features_many(clip, [inp], batch_size)[0]
