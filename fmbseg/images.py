"""Decoding input images into upright RGB arrays, or a human-readable reason why not (DESIGN §5 `images`).

`load_image(path_or_bytes) -> np.ndarray (H, W, 3) uint8` RGB, rotated upright by the EXIF orientation tag
(all coordinates of the pipeline are in this upright frame). Mode handling:
- grayscale, 1-bit, palette, CMYK, YCbCr, LAB, HSV -> converted to RGB by Pillow;
- 16-bit grayscale (`I;16*`, and `I` from 16-bit files) -> scaled by 255/65535 (rounded), not truncated;
  32-bit float (`F`) -> min-max scaled;
- alpha (`RGBA`, `LA`, `PA`, palette with transparency) -> the alpha channel is dropped: the stored colours are
  labelled as they are, not as they would look composited on some background.
Failures raise `ImageDecodeError` whose message starts with a short kind (`"empty file"`, `"not an image"`,
`"truncated"`, `"too small"`, `"too large"`, `"unreadable"`, ...) followed by `": "` and details; `kind` holds it,
and `hw` the image's (height, width) when the header was readable.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

# Deliberately raised from Pillow's default (~89 MP) so that huge scans and panoramas are processed; above
# this, `load_image` refuses the image itself (Pillow would only warn up to twice its limit).
MAX_IMAGE_PIXELS = 250_000_000
MIN_SIDE = 16
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


class ImageDecodeError(ValueError):
    """An input image that cannot be used; `str(e)` is `"<kind>: <details>"`."""

    def __init__(self, kind: str, details: str, hw: tuple[int, int] | None = None):
        super().__init__(f"{kind}: {details}")
        self.kind = kind
        self.hw = hw


def _read(source: str | os.PathLike | bytes) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    path = os.fspath(source)
    try:
        if "://" in path:
            import fsspec

            with fsspec.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ImageDecodeError("unreadable", f"file not found (or a broken link): {path}") from None
    except IsADirectoryError:
        raise ImageDecodeError("unreadable", f"is a directory: {path}") from None
    except PermissionError:
        raise ImageDecodeError("unreadable", f"permission denied: {path}") from None
    except OSError as e:
        raise ImageDecodeError("unreadable", f"{e.strerror or e}: {path}") from None


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.float64)
        if mode == "I" and a.size and (a.min() < 0 or a.max() > 65535):
            a = (a - a.min()) * (65535.0 / max(a.max() - a.min(), 1.0))
        g = np.clip(np.rint(a * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        finite = np.isfinite(a)
        lo, hi = (a[finite].min(), a[finite].max()) if finite.any() else (0.0, 1.0)
        g = np.clip(np.rint((np.where(finite, a, lo) - lo) * (255.0 / max(hi - lo, 1e-12))), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if mode in ("RGBA", "RGBa", "RGBX", "LA", "La", "PA") or img.mode == "RGBA":
        img = img.convert("RGBA")
        return np.ascontiguousarray(np.asarray(img, dtype=np.uint8)[..., :3])
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def load_image(
    source: str | os.PathLike | bytes, min_side: int = MIN_SIDE, max_pixels: int = MAX_IMAGE_PIXELS
) -> np.ndarray:
    """A path (local or fsspec URL) or the file's bytes -> (H, W, 3) uint8 RGB, upright. Raises `ImageDecodeError`."""
    data = _read(source)
    if not data:
        raise ImageDecodeError("empty file", "0 bytes")
    with warnings.catch_warnings():
        # Size is checked explicitly below; Pillow's DecompressionBombWarning would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            # Never quote the bytes: an error column must not leak a secret file's content (issue 13.8).
            raise ImageDecodeError("not an image", f"unrecognised file content ({len(data)} bytes)") from None
        except Image.DecompressionBombError as e:
            raise ImageDecodeError("too large", str(e)) from None
        except Exception as e:  # malformed headers surface as many exception types
            kind = "truncated" if "truncated" in str(e).lower() else "corrupt header"
            raise ImageDecodeError(kind, f"{type(e).__name__}: {e}") from None
    w, h = img.size
    # EXIF orientations 5-8 swap the axes: report the upright size.
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:
        orientation = 1
    hw = (w, h) if orientation in (5, 6, 7, 8) else (h, w)
    if w * h > max_pixels:
        raise ImageDecodeError("too large", f"{w}x{h} = {w * h / 1e6:.1f} MP, over the {max_pixels / 1e6:g} MP limit", hw)
    if min(w, h) < min_side:
        raise ImageDecodeError("too small", f"{w}x{h} px, the shorter side must be at least {min_side} px", hw)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e)
        kind = "truncated" if "truncated" in msg.lower() or isinstance(e, EOFError) else "corrupt image data"
        raise ImageDecodeError(kind, f"{msg} ({img.format} {w}x{h})", hw) from None
    except Exception as e:
        raise ImageDecodeError("corrupt image data", f"{type(e).__name__}: {e} ({img.format} {w}x{h})", hw) from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:
        raise ImageDecodeError("bad EXIF orientation", f"{type(e).__name__}: {e}", hw) from None
    try:
        rgb = _to_rgb(img)
    except Exception as e:
        raise ImageDecodeError("unsupported pixel format", f"mode {img.mode}: {type(e).__name__}: {e}", hw) from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[:2] != hw:
        raise ImageDecodeError("unsupported pixel format", f"mode {img.mode} decoded to shape {rgb.shape}", hw)
    # Arrays over Pillow's buffer are read-only; callers wrap the image in tensors and may write to it.
    return rgb if rgb.flags.writeable else rgb.copy()
