"""Decoding input images into upright RGB arrays, or a human-readable reason why not (DESIGN §5 `images`).

`load_image(path_or_bytes) -> np.ndarray (H, W, 3) uint8` RGB, rotated upright by the EXIF orientation tag
(all coordinates of the pipeline are in this upright frame). Mode handling:
- grayscale, 1-bit, palette, CMYK, YCbCr, LAB, HSV -> converted to RGB by Pillow;
- 16-bit grayscale (`I;16*`, and `I` from 16-bit files) -> scaled by 255/65535 (rounded), not truncated;
  32-bit float (`F`) -> min-max scaled;
- alpha (`RGBA`, `LA`, `PA`, palette with transparency) -> the alpha channel is dropped: the stored colours are
  labelled as they are, not as they would look composited on some background.
Failures raise `ImageDecodeError` whose message starts with a short kind (`"empty file"`, `"not an image"`,
`"not a regular file"`, `"truncated"`, `"too small"`, `"too large"`, `"unreadable"`, ...) followed by `": "` and
details; `kind` holds it, and `hw` the image's (height, width) when the header was readable. Messages never
quote the file's content.

Resource bounds (hostile or broken inputs must not hang a worker or exhaust its memory):
- Only regular files are opened (checked with `stat` before opening, and again on the open descriptor, which is
  opened non-blocking): a FIFO, `/dev/zero` or a device named `x.png` fails at once as "not a regular file".
- At most `max_bytes` are read per file (default `MAX_IMAGE_BYTES` = 512 MiB, or the environment variable
  `FMBSEG_MAX_IMAGE_BYTES`); a larger file (sparse ones included) fails as "too large" without being read.
- At most `max_pixels` pixels (default `MAX_IMAGE_PIXELS` = 250 MP, or `FMBSEG_MAX_IMAGE_PIXELS`), checked on
  the header before any pixel is decoded. Images up to the cap are processed. The decode is bounded: Pillow's
  decoded raster (4 bytes per pixel for RGB/RGBA/CMYK/I/F, 2 for I;16, 1 for L/P) plus the (H, W, 3) result,
  with conversion done in strips of `STRIP_PIXELS` and the EXIF rotation written straight into the result, so
  the peak is at most ~7 bytes per pixel plus the file's bytes: about 1.75 GB for an image at the 250 MP cap
  (measured: a 690 KB PNG declaring 237 MP peaks at 1.7 GB RSS in `load_image`, was 2.3 GB; 16-bit images,
  which went through float64 copies of the whole image, cost the same as 8-bit ones now). The rest of the
  pipeline keeps full-resolution maps of the image (see README), so lower the caps on small machines.
"""

from __future__ import annotations

import io
import os
import stat
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

# Deliberately raised from Pillow's default (~89 MP) so that huge scans and panoramas are processed; above
# this, `load_image` refuses the image itself (Pillow would only warn up to twice its limit).
MAX_IMAGE_PIXELS = 250_000_000
MAX_IMAGE_BYTES = 512 * 2**20
MIN_SIDE = 16
# Pixels converted to RGB at a time: bounds the temporaries of mode conversion (float64 for 16-bit/float
# images: 8 bytes per pixel per temporary) to a few tens of MB whatever the image size.
STRIP_PIXELS = 1 << 18
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

_NOT_REGULAR = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
                stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


class ImageDecodeError(ValueError):
    """An input image that cannot be used; `str(e)` is `"<kind>: <details>"`."""

    def __init__(self, kind: str, details: str, hw: tuple[int, int] | None = None):
        super().__init__(f"{kind}: {details}")
        self.kind = kind
        self.hw = hw


def default_max_pixels() -> int:
    """`FMBSEG_MAX_IMAGE_PIXELS` when set (read at each call, so workers inherit it), else `MAX_IMAGE_PIXELS`."""
    return _env_int("FMBSEG_MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS)


def default_max_bytes() -> int:
    """`FMBSEG_MAX_IMAGE_BYTES` when set, else `MAX_IMAGE_BYTES` (512 MiB)."""
    return _env_int("FMBSEG_MAX_IMAGE_BYTES", MAX_IMAGE_BYTES)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(float(raw))
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {raw!r}")
    return value


def _too_many_bytes(n: int | str, max_bytes: int, path: str) -> ImageDecodeError:
    return ImageDecodeError("too large", f"{n} bytes, over the {max_bytes} byte limit (FMBSEG_MAX_IMAGE_BYTES): {path}")


def _check_regular(mode: int, path: str) -> None:
    if stat.S_ISDIR(mode):
        raise ImageDecodeError("unreadable", f"is a directory: {path}")
    if not stat.S_ISREG(mode):
        what = _NOT_REGULAR.get(stat.S_IFMT(mode), "not a regular file")
        raise ImageDecodeError("not a regular file", f"{what}, not an image file: {path}")


def _read_local(path: str, max_bytes: int) -> bytes:
    # stat first: opening a FIFO for reading blocks until a writer appears, and /dev/zero never ends.
    st = os.stat(path)
    _check_regular(st.st_mode, path)
    if st.st_size > max_bytes:
        raise _too_many_bytes(st.st_size, max_bytes, path)
    # O_NONBLOCK: if the path was swapped for a FIFO after the stat, the open still returns and fstat refuses it.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        _check_regular(os.fstat(fd).st_mode, path)
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew since the stat
        raise _too_many_bytes(f"more than {max_bytes}", max_bytes, path)
    return data


def _read(source: str | os.PathLike | bytes, max_bytes: int) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) > max_bytes:
            raise _too_many_bytes(len(source), max_bytes, "<bytes>")
        return bytes(source)
    path = os.fspath(source)
    try:
        if "://" in path:
            import fsspec

            with fsspec.open(path, "rb") as f:
                data = f.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise _too_many_bytes(f"more than {max_bytes}", max_bytes, path)
            return data
        return _read_local(path, max_bytes)
    except FileNotFoundError:
        raise ImageDecodeError("unreadable", f"file not found (or a broken link): {path}") from None
    except IsADirectoryError:
        raise ImageDecodeError("unreadable", f"is a directory: {path}") from None
    except PermissionError:
        raise ImageDecodeError("unreadable", f"permission denied: {path}") from None
    except OSError as e:
        raise ImageDecodeError("unreadable", f"{e.strerror or type(e).__name__}: {path}") from None


def _stored_view(out: np.ndarray, orientation: int) -> np.ndarray:
    """A view of the upright result `out` (H, W, 3) in the stored (pre-EXIF) frame: writing the stored pixels
    into it leaves `out` equal to Pillow's `ImageOps.exif_transpose` of the image, without a second copy."""
    if orientation == 2:    # FLIP_LEFT_RIGHT (each of 2, 3, 4, 5, 7 is its own inverse)
        return out[:, ::-1]
    if orientation == 3:    # ROTATE_180
        return out[::-1, ::-1]
    if orientation == 4:    # FLIP_TOP_BOTTOM
        return out[::-1]
    if orientation == 5:    # TRANSPOSE
        return out.swapaxes(0, 1)
    if orientation == 6:    # upright = ROTATE_270 (counter-clockwise) of stored; its inverse is a 90° turn
        return np.rot90(out, 1)
    if orientation == 7:    # TRANSVERSE
        return out[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:    # upright = ROTATE_90 of stored
        return np.rot90(out, -1)
    return out


def _scale_params(img: Image.Image, rows: int) -> tuple[float, float] | None:
    """Global (offset, scale) for modes whose strips must share one mapping: `I` outside 0..65535 and `F`
    (min-max over finite values); None otherwise. Computed strip by strip, never on a whole-image copy."""
    mode = img.mode
    if mode not in ("I", "F"):
        return None
    w, h = img.size
    lo, hi = np.inf, -np.inf
    for y0 in range(0, h, rows):
        a = np.asarray(img.crop((0, y0, w, min(h, y0 + rows))), dtype=np.float64)
        a = a[np.isfinite(a)] if mode == "F" else a
        if a.size:
            lo, hi = min(lo, float(a.min())), max(hi, float(a.max()))
    if mode == "I":
        if lo == np.inf or (lo >= 0 and hi <= 65535):
            return (0.0, 255.0 / 65535.0)
        return (lo, 255.0 / max(hi - lo, 1.0))
    if lo == np.inf:
        lo, hi = 0.0, 1.0
    return (lo, 255.0 / max(hi - lo, 1e-12))


def _strip_to_rgb(img: Image.Image, params: tuple[float, float] | None) -> np.ndarray:
    """One strip -> (rows, W, 3) uint8."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8)
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img).astype(np.float64)
        if mode == "F":
            a = np.where(np.isfinite(a), a, params[0])
        off, scale = params if params is not None else (0.0, 255.0 / 65535.0)
        g = np.clip(np.rint((a - off) * scale), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if mode in ("RGBA", "RGBa", "RGBX", "LA", "La", "PA") or img.mode == "RGBA":
        return np.asarray(img.convert("RGBA"), dtype=np.uint8)[..., :3]
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def load_image(
    source: str | os.PathLike | bytes, min_side: int = MIN_SIDE, max_pixels: int | None = None,
    max_bytes: int | None = None,
) -> np.ndarray:
    """A path (local or fsspec URL) or the file's bytes -> (H, W, 3) uint8 RGB, upright. Raises `ImageDecodeError`.

    `max_pixels` / `max_bytes` default to `default_max_pixels()` / `default_max_bytes()` (see the module
    docstring for the memory an image at the cap costs)."""
    max_pixels = default_max_pixels() if max_pixels is None else int(max_pixels)
    max_bytes = default_max_bytes() if max_bytes is None else int(max_bytes)
    data = _read(source, max_bytes)
    if not data:
        raise ImageDecodeError("empty file", "0 bytes")
    with warnings.catch_warnings():
        # Size is checked explicitly below; Pillow's DecompressionBombWarning would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            # Never quote the content: a path pointing at a secret would leak it into the `error` column.
            raise ImageDecodeError("not an image", f"unrecognised file content ({len(data)} bytes; not a JPEG, "
                                   "PNG, WebP, BMP or TIFF file)") from None
        except Image.DecompressionBombError as e:
            raise ImageDecodeError("too large", str(e)) from None
        except Exception as e:  # malformed headers surface as many exception types
            kind = "truncated" if "truncated" in str(e).lower() else "corrupt header"
            raise ImageDecodeError(kind, f"{type(e).__name__}: {e}") from None
    del data  # Pillow keeps its own reference while decoding; ours would outlive it
    w, h = img.size
    try:
        orientation = int(img.getexif().get(0x0112, 1))
    except Exception:
        orientation = 1
    # EXIF orientations 5-8 swap the axes: report the upright size.
    hw = (w, h) if orientation in (5, 6, 7, 8) else (h, w)
    if w * h > max_pixels:
        raise ImageDecodeError("too large", f"{w}x{h} = {w * h / 1e6:.1f} MP, over the {max_pixels / 1e6:g} MP limit", hw)
    if min(w, h) < min_side:
        raise ImageDecodeError("too small", f"{w}x{h} px, the shorter side must be at least {min_side} px", hw)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e)
        kind = "truncated" if "truncated" in msg.lower() or isinstance(e, EOFError) else "corrupt image data"
        raise ImageDecodeError(kind, f"{msg} ({img.format} {w}x{h})", hw) from None
    except MemoryError:
        raise ImageDecodeError("too large", f"out of memory decoding {w}x{h} ({img.format})", hw) from None
    except Exception as e:
        raise ImageDecodeError("corrupt image data", f"{type(e).__name__}: {e} ({img.format} {w}x{h})", hw) from None
    out = np.empty((*hw, 3), np.uint8)
    stored = _stored_view(out, orientation)
    rows = max(1, STRIP_PIXELS // max(w, 1))
    try:
        params = _scale_params(img, rows)
        for y0 in range(0, h, rows):
            y1 = min(h, y0 + rows)
            strip = _strip_to_rgb(img.crop((0, y0, w, y1)), params)
            if strip.shape != (y1 - y0, w, 3):
                raise ValueError(f"decoded to shape {strip.shape}")
            stored[y0:y1] = strip
    except Exception as e:
        raise ImageDecodeError("unsupported pixel format", f"mode {img.mode}: {type(e).__name__}: {e}", hw) from None
    finally:
        img.close()
    return out
