"""The synthetic world (DESIGN §6): flat palette-coloured shapes on a palette-coloured background, with the
planted ground truth, so the pipeline's logic can be scored where the right answer is known.

Every image has a background colour and 2-4 foreground classes. Each foreground class gets one large instance
(a rectangle, ellipse, or a concave L/U/ring shape) in its own cell of a grid laid over the image, so it dominates
some of Stage 1.1's crops; small instances of the present classes and, sometimes, thin stripes are scattered on
top. Ground truth is the painted index map (palette index = class index = line of `classes.txt`).

On disk (`write_world`) a world is the `custom` benchmark layout of DESIGN §2:
`out_dir/images/<stem>.<png|jpg>`, `out_dir/annotations/<stem>.png` (uint8 class index), `out_dir/classes.txt`
(all palette names, so the vocabulary is the palette). JPEGs are written at quality 95 without chroma
subsampling, so every decoded pixel keeps its planted nearest palette colour (checked by the tests).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from fmbseg.testing.palette import NUM_COLOURS, PALETTE_NAMES, PALETTE_RGB, palette_index

# (height, width) of the default world images: non-square both ways, several sizes. An odd count, so that with
# the two default formats every size appears as PNG and as JPEG within 2 * len(DEFAULT_SIZES) images.
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((240, 320), (517, 301), (301, 517), (200, 450), (450, 600))

JPEG_QUALITY = 95
MIN_SIDE = 16

LARGE_SHAPES = ("rect", "ellipse", "L", "U", "ring")


def _class_indices(classes: Sequence[str | int] | None) -> list[int]:
    if classes is None:
        return list(range(NUM_COLOURS))
    out = []
    for c in classes:
        if isinstance(c, str):
            out.append(palette_index(c))
        elif isinstance(c, (int, np.integer)) and 0 <= int(c) < NUM_COLOURS:
            out.append(int(c))
        else:
            raise ValueError(f"world class {c!r} is neither a palette name nor an index in [0, {NUM_COLOURS})")
    out = sorted(set(out))
    if len(out) < 2:
        raise ValueError(f"a world needs at least 2 classes (a background and one object), got {classes!r}")
    return out


def _grid(n: int, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) with rows * cols >= n whose cells are closest to square (fewest empty cells on ties)."""
    best = None
    for rows in range(1, n + 1):
        cols = math.ceil(n / rows)
        cost = (abs(math.log((width / cols) / (height / rows))), rows * cols - n)
        if best is None or cost < best[0]:
            best = (cost, rows, cols)
    return best[1], best[2]


def _draw_large(draw: ImageDraw.ImageDraw, rng: np.random.Generator, box: tuple[float, float, float, float],
                fill: int, background: int, shape: str) -> None:
    """One large instance inside `box` = (x0, y0, x1, y1) in px (x1, y1 exclusive)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if shape == "rect":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif shape == "ellipse":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif shape == "L":
        # A rectangle with one corner quadrant cut away (which corner is random).
        a, b = rng.uniform(0.4, 0.6) * w, rng.uniform(0.4, 0.6) * h
        pts = [(0, 0), (a, 0), (a, h - b), (w, h - b), (w, h), (0, h)]
        if rng.random() < 0.5:
            pts = [(w - px, py) for px, py in pts]
        if rng.random() < 0.5:
            pts = [(px, h - py) for px, py in pts]
        draw.polygon([(x0 + px, y0 + py) for px, py in pts], fill=fill)
    elif shape == "U":
        # A rectangle with a notch from the top (or bottom) middle.
        t = rng.uniform(0.25, 0.35) * w
        d = rng.uniform(0.4, 0.6) * h
        pts = [(0, 0), (t, 0), (t, d), (w - t, d), (w - t, 0), (w, 0), (w, h), (0, h)]
        if rng.random() < 0.5:
            pts = [(px, h - py) for px, py in pts]
        draw.polygon([(x0 + px, y0 + py) for px, py in pts], fill=fill)
    elif shape == "ring":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        f = rng.uniform(0.25, 0.4)  # hole half-extent as a fraction of the size: the ring stays thick
        cx, cy = x0 + w / 2, y0 + h / 2
        draw.ellipse([cx - f * w / 2, cy - f * h / 2, cx + f * w / 2, cy + f * h / 2], fill=background)
    else:
        raise ValueError(f"unknown large shape {shape!r}; choose from {LARGE_SHAPES}")


def make_world_image(
    rng: np.random.Generator,
    height: int,
    width: int,
    classes: Sequence[str | int] | None = None,
    n_foreground: int | None = None,
    n_small: int | None = None,
    stripe_prob: float = 0.5,
    concave_prob: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """One world image and its ground truth.

    classes: palette names or indices the image may use (default: the whole palette); n_foreground: number of
    foreground classes (default 2-4 at random, capped by the classes available); n_small: small instances
    (default 2-6); stripe_prob: chance of 1-2 thin stripes (3-8 px); concave_prob: chance that a large instance
    is an L, U or ring instead of a rectangle or ellipse.
    Returns (image (H, W, 3) uint8 RGB, gt (H, W) int64 palette index)."""
    if height < MIN_SIDE or width < MIN_SIDE:
        raise ValueError(f"world images need sides >= {MIN_SIDE} px, got {height}x{width}")
    pool = _class_indices(classes)
    background = int(rng.choice(pool))
    others = [c for c in pool if c != background]
    if n_foreground is None:
        n_foreground = int(rng.integers(2, 5))
    if n_foreground < 1:
        raise ValueError(f"n_foreground must be >= 1, got {n_foreground}")
    n_fg = min(n_foreground, len(others))
    fg = [int(c) for c in rng.choice(others, size=n_fg, replace=False)]

    canvas = Image.new("L", (width, height), color=background)
    draw = ImageDraw.Draw(canvas)

    rows, cols = _grid(n_fg, height, width)
    cells = [(r, c) for r in range(rows) for c in range(cols)]
    order = rng.permutation(len(cells))[:n_fg]
    ch, cw = height / rows, width / cols
    for cls, cell_i in zip(fg, order):
        r, c = cells[cell_i]
        fw, fh = rng.uniform(0.7, 0.9), rng.uniform(0.7, 0.9)
        w, h = fw * cw, fh * ch
        x0 = c * cw + rng.uniform(0, cw - w)
        y0 = r * ch + rng.uniform(0, ch - h)
        if rng.random() < concave_prob:
            shape = str(rng.choice(["L", "U", "ring"]))
        else:
            shape = str(rng.choice(["rect", "ellipse"]))
        _draw_large(draw, rng, (x0, y0, x0 + w, y0 + h), cls, background, shape)

    if rng.random() < stripe_prob:
        for _ in range(int(rng.integers(1, 3))):
            cls = int(rng.choice(fg))
            sw = int(rng.integers(3, 9))
            kind = rng.choice(["h", "v", "d"])
            if kind == "h":
                y = rng.uniform(0, height - sw)
                draw.rectangle([0, y, width - 1, y + sw - 1], fill=cls)
            elif kind == "v":
                x = rng.uniform(0, width - sw)
                draw.rectangle([x, 0, x + sw - 1, height - 1], fill=cls)
            else:
                xa, xb = rng.uniform(0, width, size=2)
                draw.line([(xa, 0), (xb, height - 1)], fill=cls, width=sw)

    if n_small is None:
        n_small = int(rng.integers(2, 7))
    side = min(height, width)
    for _ in range(n_small):
        cls = int(rng.choice(fg))
        w = max(6.0, rng.uniform(0.05, 0.12) * side)
        h = max(6.0, rng.uniform(0.05, 0.12) * side)
        x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        if rng.random() < 0.5:
            draw.rectangle([x0, y0, x0 + w - 1, y0 + h - 1], fill=cls)
        else:
            draw.ellipse([x0, y0, x0 + w - 1, y0 + h - 1], fill=cls)

    gt = np.asarray(canvas, dtype=np.int64)
    return PALETTE_RGB[gt], gt


def write_world(
    out_dir: str | Path,
    n_images: int,
    seed: int,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    formats: Sequence[str] = ("png", "jpg"),
    classes: Sequence[str | int] | None = None,
) -> list[Path]:
    """Write `n_images` world images in the `custom` benchmark layout; returns the image paths in stem order.

    Image i has size `sizes[i % len(sizes)]` (height, width) and format `formats[i % len(formats)]`; its content
    depends only on (seed, i), so a larger world starts with the images of a smaller one."""
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    if not sizes:
        raise ValueError("sizes must name at least one (height, width)")
    fmts = [f.lower().lstrip(".") for f in formats]
    bad = [f for f in fmts if f not in ("png", "jpg", "jpeg")]
    if bad or not fmts:
        raise ValueError(f"world formats must be png, jpg or jpeg, got {list(formats)}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("".join(f"{n}\n" for n in PALETTE_NAMES), encoding="utf-8")
    paths = []
    for i in range(n_images):
        height, width = sizes[i % len(sizes)]
        fmt = fmts[i % len(fmts)]
        rng = np.random.default_rng([seed, i])
        image, gt = make_world_image(rng, int(height), int(width), classes=classes)
        stem = f"world_{i:04d}"
        path = out / "images" / f"{stem}.{fmt}"
        if fmt == "png":
            Image.fromarray(image).save(path, format="PNG")
        else:
            Image.fromarray(image).save(path, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
        Image.fromarray(gt.astype(np.uint8)).save(out / "annotations" / f"{stem}.png", format="PNG")
        paths.append(path)
    return paths


def load_annotation(image_path: str | Path) -> np.ndarray:
    """Ground truth (H, W) int64 of an image written by `write_world` (read from `../annotations/<stem>.png`)."""
    p = Path(image_path)
    ann = p.parent.parent / "annotations" / f"{p.stem}.png"
    if not ann.is_file():
        raise FileNotFoundError(f"no annotation for {p}: expected {ann}")
    with Image.open(ann) as im:
        return np.asarray(im, dtype=np.int64)
