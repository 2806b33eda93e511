"""Pictures of predictions: the label map as a PNG other tools read back, and an overlay on the image.

- `save_label_png(label, path)`: (H, W) class indices -> a palette PNG (8-bit indices, so `np.array(Image.open())`
  gives the class ids back, and viewers show colours) when every id is < 256, else a 16-bit grey PNG.
- `overlay(image, label, class_names)`: (H, W, 3) uint8 blended with the class colours, plus a legend strip of
  the classes present.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 distinct colours: the PASCAL VOC bit-interleaving palette (class 0 black)."""
    ids = np.arange(n)
    colours = np.zeros((n, 3), np.int64)
    for shift in range(8):
        for ch in range(3):
            colours[:, ch] |= ((ids >> (3 * shift + ch)) & 1) << (7 - shift)
    return colours.astype(np.uint8)


def save_label_png(label: np.ndarray, path: str) -> None:
    """Write (H, W) non-negative integer class ids losslessly (8-bit palette PNG, or 16-bit when ids >= 256)."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label map must be (H, W), got {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 65535):
        raise ValueError("label ids must lie in 0..65535 to be stored as PNG")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if label.size == 0 or label.max() < 256:
        im = Image.fromarray(label.astype(np.uint8), mode="P")
        im.putpalette(palette(256).ravel().tolist())
    else:
        im = Image.fromarray(label.astype(np.uint16))
    tmp = path + ".tmp.png"
    im.save(tmp)
    os.replace(tmp, path)


def overlay(image: np.ndarray, label: np.ndarray, class_names: list[str] | None = None,
            alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8 image, (H, W) class ids -> (H', W, 3) uint8 blend; with names, a legend strip is appended
    below the picture listing the classes present in their colours."""
    if image.shape[:2] != label.shape:
        raise ValueError(f"image {image.shape[:2]} and label map {label.shape} differ in size")
    n = int(label.max()) + 1 if label.size else 1
    colours = palette(max(n, 1))
    blend = (image.astype(np.float32) * (1 - alpha) + colours[label].astype(np.float32) * alpha)
    out = blend.round().clip(0, 255).astype(np.uint8)
    if not class_names:
        return out
    present = [int(c) for c in np.unique(label) if 0 <= c < len(class_names)]
    row_h, width = 16, out.shape[1]
    entries, x, rows = [], 4, 0
    for c in present:
        text_w = 12 + 7 * len(class_names[c]) + 12
        if x + text_w > width and x > 4:
            x, rows = 4, rows + 1
        entries.append((c, x, rows))
        x += text_w
    strip = Image.new("RGB", (width, (rows + 1) * row_h + 4), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for c, x, r in entries:
        y = 2 + r * row_h
        draw.rectangle([x, y + 2, x + 9, y + 11], fill=tuple(int(v) for v in colours[c]), outline=(0, 0, 0))
        draw.text((x + 13, y), class_names[c], fill=(0, 0, 0))
    return np.concatenate([out, np.asarray(strip)], axis=0)
