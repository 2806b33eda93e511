"""Stage 2: the alignment module that maps frozen DINOv2 patch features into CLIP's text space, and the
training inputs it learns from (DESIGN §1, Stage 2).

- `train_view(image, label, size)`: resize so the short side is `size` (bilinear, antialiased; the label map
  nearest-neighbour), centre-crop `size`² -> image (3, size, size) in [0, 1] and label (size, size).
- `patch_labels(label, patch, num_classes)`: per patch, the plurality label when it covers > 50% of the patch's
  pixels (ignored pixels count in the denominator), else -1.
- `random_windows(feats, labels, min_fraction, generator)`: the training-time crop of the patch grid (one window
  size per batch, one offset per image), see docs/STAGE2.md.
- `AlignmentModule`: one pre-norm transformer block (heads = C/64, at least 1, MLP ratio 4) then a linear map
  to D, output L2-normalised. Input (B, h, w, C) channels-last, output (B, h, w, D).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fmbseg import IGNORE_LABEL


@dataclass(frozen=True)
class AlignmentConfig:
    """in_dim = C (DINOv2 width), out_dim = D (CLIP text width)."""

    in_dim: int
    out_dim: int
    num_heads: int = 0       # 0: C/64 (at least 1; lowered to a divisor of C)
    mlp_ratio: float = 4.0

    def heads(self) -> int:
        if self.num_heads:
            return self.num_heads
        h = max(1, self.in_dim // 64)
        while self.in_dim % h:
            h -= 1
        return h

    def to_json(self) -> dict:
        return {**asdict(self), "num_heads": self.heads()}


class AlignmentBlock(nn.Module):
    """Pre-norm transformer block over the patch tokens of one image: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])     # (B, heads, N, C/heads)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


class AlignmentModule(nn.Module):
    """(B, h, w, C) DINOv2 patch features -> (B, h, w, D) L2-normalised embeddings in the CLIP text space."""

    def __init__(self, config: AlignmentConfig):
        super().__init__()
        self.config = config
        self.block = AlignmentBlock(config.in_dim, config.heads(), config.mlp_ratio)
        self.head = nn.Linear(config.in_dim, config.out_dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.ndim != 4 or feats.shape[-1] != self.config.in_dim:
            raise ValueError(f"expected features (B, h, w, {self.config.in_dim}), got {tuple(feats.shape)}")
        b, h, w, c = feats.shape
        x = self.block(feats.reshape(b, h * w, c))
        return F.normalize(self.head(x), dim=-1).reshape(b, h, w, -1)


def build_alignment(config: AlignmentConfig) -> AlignmentModule:
    """A freshly initialised module (torch's default init; seed torch before calling for reproducibility)."""
    return AlignmentModule(config)


def load_alignment(config: AlignmentConfig, state_dict: dict) -> AlignmentModule:
    """Build the module and load trained weights (strict: a mismatching checkpoint is an error)."""
    module = build_alignment(config)
    module.load_state_dict(state_dict, strict=True)
    return module.eval()


def short_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(H, W) after resizing so the short side is `short`, aspect kept (long side rounded)."""
    if height <= width:
        return short, max(short, int(round(width * short / height)))
    return max(short, int(round(height * short / width))), short


def nearest_resize(label: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a (H, W) map: output pixel centre (j + 0.5) samples input floor((j + 0.5)·W/W')."""
    h, w = label.shape[:2]
    oh, ow = out_hw
    rows = np.minimum(((np.arange(oh) + 0.5) * h / oh).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(ow) + 0.5) * w / ow).astype(np.int64), w - 1)
    return label[rows[:, None], cols[None, :]]


def resize_image(image: np.ndarray, out_hw: tuple[int, int]) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H', W') float32 in [0, 1], bilinear with antialiasing when shrinking."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div_(255.0)
    if tuple(x.shape[-2:]) != tuple(out_hw):
        x = F.interpolate(x, size=out_hw, mode="bilinear", align_corners=False, antialias=True).clamp_(0.0, 1.0)
    return x[0]


def _centre_crop(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """(resized H, resized W, top, left) of the short-side resize + centre crop."""
    rh, rw = short_side_size(h, w, size)
    return rh, rw, (rh - size) // 2, (rw - size) // 2


def train_label_view(label: np.ndarray, size: int) -> np.ndarray:
    """The label map under `train_view`'s geometry (nearest-neighbour): (H, W) -> (size, size), same dtype."""
    rh, rw, top, left = _centre_crop(*label.shape[:2], size)
    return nearest_resize(label, (rh, rw))[top:top + size, left:left + size]


def train_view(image: np.ndarray, label: np.ndarray | None, size: int) -> tuple[torch.Tensor, np.ndarray | None]:
    """Short side -> `size`, centre crop `size`². image (H, W, 3) uint8, label (H, W) or None
    -> (3, size, size) float32 in [0, 1], label (size, size) (same dtype, nearest-neighbour)."""
    h, w = image.shape[:2]
    if label is not None and label.shape != (h, w):
        raise ValueError(f"label map {label.shape} does not match image {(h, w)}")
    rh, rw, top, left = _centre_crop(h, w, size)
    x = resize_image(image, (rh, rw))[:, top:top + size, left:left + size].contiguous()
    return x, (None if label is None else train_label_view(label, size))


def patch_labels(label: np.ndarray, patch: int, num_classes: int, ignore: int = IGNORE_LABEL) -> np.ndarray:
    """(S, S') label map with class ids in [0, K) and `ignore` -> (S/p, S'/p) int64 patch labels, -1 = ignore.

    A patch takes its plurality class when that class covers more than half of the patch's p² pixels
    (ignored pixels count in the denominator); otherwise -1."""
    hs, ws = label.shape
    if hs % patch or ws % patch:
        raise ValueError(f"label map {label.shape} is not a multiple of the patch size {patch}")
    lab = label.astype(np.int64)
    unknown = (lab != ignore) & ((lab < 0) | (lab >= num_classes))
    if unknown.any():
        raise ValueError(f"label map has class ids {np.unique(lab[unknown])[:5].tolist()} outside 0..{num_classes - 1}")
    lab = np.where(lab == ignore, num_classes, lab)     # ignore gets its own bucket, never a winner
    h, w = hs // patch, ws // patch
    cells = lab.reshape(h, patch, w, patch).transpose(0, 2, 1, 3).reshape(h * w, patch * patch)
    k1 = num_classes + 1
    counts = np.bincount((np.arange(h * w)[:, None] * k1 + cells).ravel(), minlength=h * w * k1).reshape(h * w, k1)
    best = counts[:, :num_classes].argmax(1)
    covered = counts[np.arange(h * w), best] * 2 > patch * patch
    return np.where(covered, best, -1).reshape(h, w)


def window_sides(grid_hw: tuple[int, int], min_fraction: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """((smallest, largest) window height, (smallest, largest) width) in patches for `random_windows`: from
    ceil(min_fraction x side) (at least 1) to the whole side."""
    return tuple((min(side, max(1, math.ceil(min_fraction * side - 1e-9))), side) for side in grid_hw)


def random_windows(feats: torch.Tensor, labels: torch.Tensor, min_fraction: float,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random window of each image's patch grid: feats (B, h, w, C), labels (B, h, w) -> (B, h', w', C),
    (B, h', w'), same devices. h' and w' are drawn once per batch (so the batch stays one tensor), independently and
    uniformly in `window_sides`; each image gets its own offset, uniform over the positions that keep the window
    inside its grid. `min_fraction` 1 returns the inputs unchanged (and draws nothing). All draws come from
    `generator` (CPU), so a seeded generator gives the same windows on any device."""
    if min_fraction >= 1:
        return feats, labels
    b, h, w = labels.shape
    (h_lo, h_hi), (w_lo, w_hi) = window_sides((h, w), min_fraction)
    wh = int(torch.randint(h_lo, h_hi + 1, (1,), generator=generator))
    ww = int(torch.randint(w_lo, w_hi + 1, (1,), generator=generator))
    top = torch.randint(0, h - wh + 1, (b,), generator=generator)
    left = torch.randint(0, w - ww + 1, (b,), generator=generator)
    rows = (top[:, None] + torch.arange(wh))[:, :, None]                    # (B, h', 1)
    cols = (left[:, None] + torch.arange(ww))[:, None, :]                   # (B, 1, w')
    batch = torch.arange(b)[:, None, None]
    dev = feats.device
    return (feats[batch.to(dev), rows.to(dev), cols.to(dev)],
            labels[batch.to(labels.device), rows.to(labels.device), cols.to(labels.device)])


@torch.no_grad()
def rotate_to_anchors(module: AlignmentModule, class_sums: torch.Tensor, present: torch.Tensor, text: torch.Tensor,
                      momentum_buffers: list[torch.Tensor | None] = ()) -> torch.Tensor:
    """Turn the module's output space so its class centroids point at their text anchors; returns R (D, D).

    class_sums (K, D): per class, the sum of its patches' embeddings (any positive scale per class); present (K,)
    bool: the classes with patches; text (K, D) anchors (unit rows). R is the orthogonal matrix maximising
    Σ_k present_k · t_k · R ĉ_k (ĉ_k the unit centroid): the orthogonal Procrustes solution R = U Vᵀ with
    U S Vᵀ = Σ_k t_k ĉ_kᵀ (float64). The head becomes W <- R W, b <- R b, and `momentum_buffers` (the head
    weight's and bias's, when the optimiser has them) turn with it, so the outputs are exactly R times the
    previous ones. Every dot product between embeddings is unchanged (R is orthogonal and the output is
    L2-normalised), so TSupCon's patch-patch term, which only sees those, keeps its value; only the patch-text
    term moves, downhill. Without present classes nothing changes and R = I."""
    d = module.head.weight.shape[0]
    keep = present.to(class_sums.device).bool()
    if not bool(keep.any()):
        return torch.eye(d, device=class_sums.device)
    cents = F.normalize(class_sums[keep].double(), dim=-1)                          # (K', D)
    u, _, vh = torch.linalg.svd(text.to(cents.device, torch.float64)[keep].T @ cents)  # (D, D) each
    r = (u @ vh).to(module.head.weight.dtype)
    module.head.weight.copy_(r @ module.head.weight)
    module.head.bias.copy_(r @ module.head.bias)
    for buf in momentum_buffers:
        if buf is not None:
            buf.copy_(r @ buf)
    return r
