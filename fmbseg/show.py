"""Pictures of a campaign's pseudo-labels (`fmbseg show`): arrays in, arrays out; no file or campaign access here.

`show_image(image, label, masks, class_names)` -> one (H', W', 3) uint8 picture of two panels side by side and a
legend below:
- left: the merged label map (H, W) blended over the image, one colour per class (`class_palette`), ignore
  pixels left as they are;
- right: every individual mask outlined in its stage's colour (Stage 1.1 orange, Stage 1.2 blue), selected masks
  (the ones that made the label map) with a solid 2-px outline and a light fill, unselected masks with a dashed
  1-px outline and no fill; each mask's class name is written at a point inside it.
Drawing uses torchvision's `draw_segmentation_masks`; text uses Pillow. Small images are scaled up by an integer
factor (nearest neighbour, so pixels stay square and colours exact) until the long side reaches `min_side`, so
the class names stay legible: panel pixel (i, j) shows image pixel (i // scale, j // scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

STAGE_COLOURS = {"1.1": (255, 140, 0), "1.2": (30, 110, 255)}  # orange, blue: told apart also by most colour-blind
LABEL_ALPHA = 0.55  # left panel: class colour weight over the image
FILL_ALPHA = 0.25  # right panel: light fill of selected masks
IGNORE_LABEL = 65535


@dataclass
class MaskDrawing:
    """One mask of the right panel: `mask` (H, W) bool, its `stage` ("1.1" | "1.2"), class name, selected flag."""

    mask: np.ndarray
    stage: str
    class_name: str
    selected: bool


@lru_cache(maxsize=8)
def _palette(n: int) -> np.ndarray:
    # Farthest-point sampling over a 16^3 RGB grid (too dark and too bright corners dropped so that text and the
    # image stay visible): every new colour is the one farthest from all chosen ones, so any n <= 4096 colours are
    # as far apart as the cube allows (150 colours: >= 41 RGB units from each other, 256: >= 38).
    levels = np.linspace(0, 255, 16).round().astype(np.int64)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    grid = grid[(grid.sum(1) > 90) & (grid.sum(1) < 700)]
    chosen = [int(np.argmin(np.abs(grid - np.array([230, 25, 75])).sum(1)))]  # start from a strong red
    dist = ((grid - grid[chosen[0]]) ** 2).sum(1).astype(np.float64)
    for _ in range(min(n, len(grid)) - 1):
        i = int(np.argmax(dist))
        chosen.append(i)
        dist = np.minimum(dist, ((grid - grid[i]) ** 2).sum(1))
    out = grid[chosen]
    if n > len(out):  # beyond the grid: repeat (never reached by real vocabularies)
        out = np.concatenate([out] * (n // len(out) + 1))[:n]
    return out.astype(np.uint8)


def class_palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours of classes 0..n-1, pairwise distinct and far apart (>= 41 RGB units for n <= 150,
    >= 38 for n <= 256). The colours of the first k classes do not depend on n."""
    if n < 0:
        raise ValueError(f"palette size must be >= 0, got {n}")
    return _palette(max(n, 1))[:n].copy()


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _draw(image, masks: np.ndarray, alpha: float, colors):
    """torchvision's `draw_segmentation_masks` on a (3, H, W) uint8 tensor (imported here: torchvision is slow to
    import, and `class_palette` alone must not pay for it)."""
    import torch
    from torchvision.utils import draw_segmentation_masks

    return draw_segmentation_masks(image, torch.from_numpy(np.ascontiguousarray(masks)), alpha=alpha, colors=colors)


def _to_tensor(image: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def _to_array(t) -> np.ndarray:
    return t.permute(1, 2, 0).contiguous().numpy()


def label_overlay(image: np.ndarray, label: np.ndarray, colours: np.ndarray, alpha: float = LABEL_ALPHA) -> np.ndarray:
    """(H, W, 3) uint8 image, (H, W) class ids (>= len(colours) = ignore, e.g. 65535) -> (H, W, 3) uint8 with
    every labelled pixel = trunc((1 - alpha) * image + alpha * colour[class]) (torchvision's blend)."""
    if image.shape[:2] != label.shape:
        raise ValueError(f"image {image.shape[:2]} and label map {label.shape} differ in size")
    present = [int(c) for c in np.unique(label) if c < len(colours)]
    if not present:
        return image.copy()
    masks = np.stack([label == c for c in present])
    out = _draw(_to_tensor(image), masks, alpha, [tuple(int(v) for v in colours[c]) for c in present])
    return _to_array(out)


def _boundary(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of `mask` within `width` px (4-neighbourhood steps) of its outside."""
    inner = mask.copy()
    for _ in range(width):
        p = np.pad(inner, 1, constant_values=False)
        inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def _anchor(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of a pixel inside the mask near its middle: the most interior pixel of the row through the centroid."""
    ys, xs = np.nonzero(mask)
    cy = int(np.round(ys.mean()))
    row = np.nonzero(mask[cy])[0]
    if row.size == 0:
        k = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
        return int(xs[k]), int(ys[k])
    # the longest run of the row, its middle
    breaks = np.nonzero(np.diff(row) > 1)[0]
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [row.size - 1]])
    r = int(np.argmax(ends - starts))
    return int((row[starts[r]] + row[ends[r]]) // 2), cy


def masks_panel(image: np.ndarray, masks: list[MaskDrawing], scale: int = 1) -> np.ndarray:
    """Right panel at `scale` x the image size: outlines by stage, selected solid + light fill, others dashed."""
    big = np.repeat(np.repeat(image, scale, 0), scale, 1)
    t = _to_tensor(big)
    h, w = big.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    dashes = ((xx + yy) // 4) % 2 == 0
    # Unselected before selected (a selected mask's solid outline stays visible where an unselected one shares its
    # border), and largest first within each, so that small masks' outlines stay on top.
    order = sorted(range(len(masks)), key=lambda i: (masks[i].selected, -int(masks[i].mask.sum())))
    for i in order:
        m = masks[i]
        if m.selected and m.mask.any():
            mb = np.repeat(np.repeat(m.mask, scale, 0), scale, 1)
            t = _draw(t, mb, FILL_ALPHA, STAGE_COLOURS[m.stage])
    for i in order:
        m = masks[i]
        if not m.mask.any():
            continue
        mb = np.repeat(np.repeat(m.mask, scale, 0), scale, 1)
        edge = _boundary(mb, 2 if m.selected else 1)
        if not m.selected:
            edge &= dashes
        if edge.any():
            t = _draw(t, edge, 1.0, STAGE_COLOURS[m.stage])
    pil = Image.fromarray(_to_array(t))
    draw = ImageDraw.Draw(pil)
    font = _font(11)
    placed: list[tuple[int, int, int, int]] = []
    for i in order:
        m = masks[i]
        if not m.mask.any():
            continue
        x, y = _anchor(m.mask)
        x, y = x * scale + scale // 2, y * scale + scale // 2
        text = m.class_name if m.selected else f"({m.class_name})"
        l, tp, r, b = draw.textbbox((0, 0), text, font=font)
        tw, th = r - l, b - tp
        x0 = int(np.clip(x - tw // 2, 0, max(0, w - tw - 2)))
        y0 = int(np.clip(y - th // 2, 0, max(0, h - th - 2)))
        # Masks sharing a centre (a 1.1 mask and its 1.2 twin) would stack their names: move down, then up.
        for step in (0, 1, -1, 2, -2, 3):
            yt = int(np.clip(y0 + step * (th + 4), 0, max(0, h - th - 2)))
            if not any(x0 < px1 and px0 < x0 + tw + 2 and yt < py1 and py0 < yt + th + 2
                       for px0, py0, px1, py1 in placed):
                y0 = yt
                break
        placed.append((x0, y0, x0 + tw + 2, y0 + th + 2))
        draw.rectangle([x0, y0, x0 + tw + 2, y0 + th + 2], fill=(255, 255, 255), outline=STAGE_COLOURS[m.stage])
        draw.text((x0 + 1 - l, y0 + 1 - tp), text, fill=(0, 0, 0), font=font)
    return np.asarray(pil)


def _legend(width: int, classes: list[tuple[str, tuple[int, int, int]]], n_masks: dict[str, int]) -> np.ndarray:
    font = _font(12)
    row_h, pad = 18, 6
    items: list[tuple[str, tuple[int, int, int], str]] = [(name, col, "box") for name, col in classes]
    items += [
        (f"Stage 1.1 selected ({n_masks.get('1.1 sel', 0)})", STAGE_COLOURS["1.1"], "solid"),
        (f"Stage 1.2 selected ({n_masks.get('1.2 sel', 0)})", STAGE_COLOURS["1.2"], "solid"),
        (f"not selected, (name) ({n_masks.get('1.1 unsel', 0) + n_masks.get('1.2 unsel', 0)})",
         STAGE_COLOURS["1.2"], "dashed"),
    ]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    placed, x, row = [], pad, 0
    for text, col, kind in items:
        tw = int(probe.textlength(text, font=font))
        item_w = 16 + tw + 14
        if x + item_w > width and x > pad:
            x, row = pad, row + 1
        placed.append((x, row, text, col, kind))
        x += item_w
    strip = Image.new("RGB", (width, (row + 1) * row_h + 2 * pad), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for x, r, text, col, kind in placed:
        y = pad + r * row_h
        if kind == "box":
            draw.rectangle([x, y + 3, x + 11, y + 14], fill=col, outline=(0, 0, 0))
        elif kind == "solid":
            draw.rectangle([x, y + 3, x + 11, y + 14], outline=col, width=2)
        else:
            for k in range(0, 12, 4):
                draw.line([x + k, y + 3, x + k + 2, y + 3], fill=col)
                draw.line([x + k, y + 14, x + k + 2, y + 14], fill=col)
                draw.line([x, y + 3 + k, x, y + 5 + k], fill=col)
                draw.line([x + 11, y + 3 + k, x + 11, y + 5 + k], fill=col)
        draw.text((x + 16, y + 1), text, fill=(0, 0, 0), font=font)
    return np.asarray(strip)


def auto_scale(height: int, width: int, min_side: int = 384) -> int:
    """The integer up-scaling factor that brings the long side to at least `min_side` (1 for large images)."""
    return max(1, -(-min_side // max(height, width, 1)))


def show_image(image: np.ndarray, label: np.ndarray, masks: list[MaskDrawing], class_names: list[str],
               title: str | None = None, scale: int | None = None) -> np.ndarray:
    """The `fmbseg show` picture of one image: (H, W, 3) uint8 image, (H, W) uint16 label map (65535 = ignore),
    its masks -> (H', W', 3) uint8. Layout: [label map over image | masks] side by side at `scale` x the image
    size (a 4-px white gap between), the title above, the legend below. Panel 1 occupies rows
    [top, top + scale*H) and columns [0, scale*W), where top = `title_height(title)`."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    scale = scale or auto_scale(h, w)
    colours = class_palette(len(class_names))
    left = label_overlay(image, label, colours)
    left = np.repeat(np.repeat(left, scale, 0), scale, 1)
    right = masks_panel(image, masks, scale)
    gap = np.full((h * scale, 4, 3), 255, np.uint8)
    panels = np.concatenate([left, gap, right], axis=1)
    present = [int(c) for c in np.unique(label) if c < len(class_names)]
    counts: dict[str, int] = {}
    for m in masks:
        key = f"{m.stage} {'sel' if m.selected else 'unsel'}"
        counts[key] = counts.get(key, 0) + 1
    legend = _legend(panels.shape[1], [(class_names[c], tuple(int(v) for v in colours[c])) for c in present], counts)
    parts = [panels, legend]
    if title:
        bar = Image.new("RGB", (panels.shape[1], title_height(title)), (255, 255, 255))
        ImageDraw.Draw(bar).text((4, 3), title, fill=(0, 0, 0), font=_font(12))
        parts.insert(0, np.asarray(bar))
    return np.concatenate(parts, axis=0)


def title_height(title: str | None) -> int:
    return 20 if title else 0
