"""Decoding every kind of input image into upright RGB, or a reason."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fmbseg.images import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, ImageDecodeError, load_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def rgb_pattern(h=24, w=40):
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 4] = (220, 40, 40)  # red block top-left
    a[h // 2 :, :] = (40, 70, 210)
    return a


def png_header_only(w, h):
    """A PNG whose header claims w x h (8-bit gray) but carries almost no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_extensions_match_storage_planning():
    from storage.planning import IMAGE_EXTENSIONS as planned

    assert IMAGE_EXTENSIONS == planned


def test_rgb_png_and_path(tmp_path):
    a = rgb_pattern()
    (tmp_path / "a.png").write_bytes(encode(Image.fromarray(a), "PNG"))
    out = load_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (24, 40, 3)
    np.testing.assert_array_equal(out, a)
    np.testing.assert_array_equal(load_image(str(tmp_path / "a.png")), a)


@pytest.mark.parametrize("orientation,upright_from_stored", [
    (3, lambda s: s.transpose(Image.Transpose.ROTATE_180)),
    (6, lambda s: s.transpose(Image.Transpose.ROTATE_270)),
    (8, lambda s: s.transpose(Image.Transpose.ROTATE_90)),
])
def test_exif_orientation_gives_the_upright_frame(orientation, upright_from_stored):
    upright = rgb_pattern(24, 40)
    # store pixels such that applying the tag restores `upright`
    inverse = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]
    stored = Image.fromarray(upright).transpose(inverse)
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = load_image(encode(stored, "PNG", exif=exif.tobytes()))
    assert out.shape == (24, 40, 3)
    np.testing.assert_array_equal(out, upright)
    out_jpg = load_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95))
    assert out_jpg.shape == (24, 40, 3) and np.abs(out_jpg.astype(int) - upright).mean() < 6


def test_modes_grayscale_palette_cmyk_alpha_16bit_float():
    a = rgb_pattern()
    gray = Image.fromarray(a).convert("L")
    g = load_image(encode(gray, "PNG"))
    assert g.shape == (24, 40, 3) and (g[..., 0] == np.asarray(gray)).all() and (g[..., 0] == g[..., 2]).all()
    pal = Image.fromarray(a).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    np.testing.assert_array_equal(load_image(encode(pal, "PNG")), a)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    assert load_image(encode(pal_t, "PNG", transparency=0)).shape == (24, 40, 3)
    cmyk = load_image(encode(Image.fromarray(a).convert("CMYK"), "JPEG", quality=95))
    assert np.abs(cmyk.astype(int) - a).mean() < 6
    cmyk_tiff = load_image(encode(Image.fromarray(a).convert("CMYK"), "TIFF"))
    np.testing.assert_array_equal(cmyk_tiff, a)
    rgba = np.dstack([a, np.full(a.shape[:2], 7, np.uint8)])  # nearly transparent: colours are kept, alpha dropped
    np.testing.assert_array_equal(load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG")), a)
    la = Image.fromarray(np.dstack([np.asarray(gray), np.zeros_like(np.asarray(gray))]), "LA")
    assert (load_image(encode(la, "PNG"))[..., 1] == np.asarray(gray)).all()
    # 16-bit gray: 65535 -> 255, 32896 -> 128 (scaled, not truncated to the low byte)
    g16 = np.full((20, 20), 32896, np.uint16)
    g16[0, 0], g16[0, 1] = 65535, 0
    out16 = load_image(encode(Image.fromarray(g16), "PNG"))
    assert out16[0, 0, 0] == 255 and out16[0, 1, 0] == 0 and out16[5, 5, 0] == 128
    out16t = load_image(encode(Image.fromarray(g16), "TIFF"))
    np.testing.assert_array_equal(out16t, out16)
    f = np.linspace(-1, 1, 400, dtype=np.float32).reshape(20, 20)
    outf = load_image(encode(Image.fromarray(f, "F"), "TIFF"))
    assert outf[0, 0, 0] == 0 and outf[-1, -1, 0] == 255
    bw = Image.fromarray(a[..., 0] > 100)
    assert set(np.unique(load_image(encode(bw, "PNG")))) <= {0, 255}
    for fmt in ("WEBP", "BMP"):
        assert load_image(encode(Image.fromarray(a), fmt, **({"lossless": True} if fmt == "WEBP" else {}))).shape == (24, 40, 3)


def test_mislabelled_but_valid_file_decodes(tmp_path):
    a = rgb_pattern()
    (tmp_path / "really_a_png.jpg").write_bytes(encode(Image.fromarray(a), "PNG"))
    np.testing.assert_array_equal(load_image(tmp_path / "really_a_png.jpg"), a)


def test_failures_have_kind_and_reason(tmp_path):
    a = rgb_pattern(64, 64)
    jpg = encode(Image.fromarray(a), "JPEG")
    png = encode(Image.fromarray(a), "PNG")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_bytes(b"hello, I am not a picture")
    (tmp_path / "link.jpg").symlink_to(tmp_path / "gone.jpg")
    cases = {
        tmp_path / "empty.jpg": "empty file",
        tmp_path / "text.png": "not an image",
        tmp_path / "link.jpg": "unreadable",
        tmp_path / "nope.png": "unreadable",
        tmp_path: "unreadable",
    }
    for src, kind in cases.items():
        with pytest.raises(ImageDecodeError) as e:
            load_image(src)
        assert e.value.kind == kind and str(e.value).startswith(kind + ": ")
    for data in (jpg[: len(jpg) // 2], png[: len(png) // 2]):
        with pytest.raises(ImageDecodeError) as e:
            load_image(data)
        assert e.value.kind == "truncated"
        assert e.value.hw in (None, (64, 64))  # known when the header survived the cut
    with pytest.raises(ImageDecodeError, match=r"too small: 40x10 px") as e:
        load_image(encode(Image.new("RGB", (40, 10)), "PNG"))
    assert e.value.hw == (10, 40)


def test_huge_images_limit_is_250_megapixels():
    assert MAX_IMAGE_PIXELS == 250_000_000 and Image.MAX_IMAGE_PIXELS >= MAX_IMAGE_PIXELS
    # 15000 x 15000 = 225 MP: above Pillow's default bomb limit (2 x 89 MP) yet accepted; it then fails only
    # because this header-only file has no pixel data.
    with pytest.raises(ImageDecodeError) as e:
        load_image(png_header_only(15000, 15000))
    assert e.value.kind in ("truncated", "corrupt image data")
    with pytest.raises(ImageDecodeError, match=r"too large: 16000x16000 = 256.0 MP, over the 250 MP limit"):
        load_image(png_header_only(16000, 16000))
    with pytest.raises(ImageDecodeError, match="too large"):
        load_image(encode(Image.new("RGB", (100, 100)), "PNG"), max_pixels=5000)


# -- hostile files and resource bounds (issue 13 item 9) ---------------------------------------------------------
@pytest.mark.timeout(30)
def test_fifo_and_devices_fail_at_once_without_reading(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would block until a writer comes: never
    (tmp_path / "zero.png").symlink_to("/dev/zero")  # reads without end
    for name, what in (("pipe.png", "a FIFO"), ("zero.png", "a character device")):
        with pytest.raises(ImageDecodeError) as e:
            load_image(tmp_path / name)
        assert e.value.kind == "not a regular file" and what in str(e.value) and name in str(e.value)


@pytest.mark.timeout(30)
def test_bytes_read_per_file_are_capped(tmp_path, monkeypatch):
    import os

    from fmbseg.images import MAX_IMAGE_BYTES

    assert MAX_IMAGE_BYTES == 512 * 2**20
    with open(tmp_path / "sparse.png", "wb") as f:  # 4 GiB on paper, nothing on disk: refused by its size
        f.truncate(4 * 2**30)
    with pytest.raises(ImageDecodeError, match=r"too large: 4294967296 bytes, over the 536870912 byte limit"):
        load_image(tmp_path / "sparse.png")
    png = encode(Image.fromarray(rgb_pattern(64, 64)), "PNG")
    (tmp_path / "a.png").write_bytes(png)
    with pytest.raises(ImageDecodeError, match="too large"):
        load_image(tmp_path / "a.png", max_bytes=len(png) - 1)
    with pytest.raises(ImageDecodeError, match="too large"):
        load_image(png, max_bytes=len(png) - 1)
    assert load_image(tmp_path / "a.png", max_bytes=len(png)).shape == (64, 64, 3)
    monkeypatch.setenv("FMBSEG_MAX_IMAGE_BYTES", str(len(png) - 1))   # the operator's knob, read at each call
    with pytest.raises(ImageDecodeError, match="FMBSEG_MAX_IMAGE_BYTES"):
        load_image(tmp_path / "a.png")
    monkeypatch.setenv("FMBSEG_MAX_IMAGE_PIXELS", "4000")
    monkeypatch.delenv("FMBSEG_MAX_IMAGE_BYTES")
    with pytest.raises(ImageDecodeError, match="over the 0.004 MP limit"):
        load_image(tmp_path / "a.png")
    os.unlink(tmp_path / "sparse.png")


def test_error_messages_never_quote_file_content(tmp_path):
    (tmp_path / "secret.png").write_bytes(b"AWS_SECRET=hunter2hunter2\n")
    with pytest.raises(ImageDecodeError) as e:
        load_image(tmp_path / "secret.png")
    assert e.value.kind == "not an image" and "hunter2" not in str(e.value) and "AWS" not in str(e.value)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillows_exif_transpose(orientation):
    from PIL import ImageOps

    stored = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (20, 33, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "PNG", exif=exif.tobytes())
    with Image.open(io.BytesIO(data)) as im:
        ref = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    out = load_image(data)
    assert out.shape == ref.shape and out.flags.writeable and out.flags.c_contiguous
    np.testing.assert_array_equal(out, ref)


def test_strip_wise_conversion_equals_whole_image_conversion(monkeypatch):
    import fmbseg.images as images

    rng = np.random.default_rng(0)
    g16 = rng.integers(0, 65536, (50, 37), dtype=np.uint16)
    i32 = rng.integers(-70000, 90000, (50, 37)).astype(np.int32)     # outside 0..65535: min-max scaled
    f = rng.normal(size=(50, 37)).astype(np.float32)
    f[3, 4], f[10, 11] = np.nan, np.inf
    pal = Image.fromarray(rgb_pattern(50, 37)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    files = [encode(Image.fromarray(g16), "PNG"), encode(Image.fromarray(i32, "I"), "TIFF"),
             encode(Image.fromarray(f, "F"), "TIFF"), encode(pal, "PNG", transparency=0)]
    whole = [load_image(d) for d in files]
    monkeypatch.setattr(images, "STRIP_PIXELS", 40)                 # one row per strip
    for d, ref in zip(files, whole):
        np.testing.assert_array_equal(load_image(d), ref)
    # Hand-computed references for the scaled modes (global, not per-strip, min and max).
    np.testing.assert_array_equal(whole[0][..., 0], np.rint(g16 * (255 / 65535)).astype(np.uint8))
    lo, hi = i32.min(), i32.max()
    np.testing.assert_array_equal(whole[1][..., 1], np.rint((i32 - lo) * (255 / (hi - lo))).astype(np.uint8))
    fin = f[np.isfinite(f)]
    assert whole[2][3, 4, 0] == 0 and whole[2][10, 11, 0] == 0      # non-finite -> the minimum
    np.testing.assert_array_equal(whole[2][0, :3, 2], np.rint((f[0, :3] - fin.min()) * (255 / (fin.max() - fin.min()))))


_RSS_PROBE = r"""
import io, resource, struct, sys, zlib
import numpy as np
from PIL import Image
from fmbseg.images import load_image

def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

def bomb(w, h, color_type, depth):
    row = b"\0" * (1 + w * {0: 1, 2: 3}[color_type] * depth // 8)
    c = zlib.compressobj(9)
    idat = b"".join(c.compress(row) for _ in range(h)) + c.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))

w = h = int(sys.argv[1])
data = bomb(w, h, int(sys.argv[2]), int(sys.argv[3]))
b = io.BytesIO(); Image.new("RGB", (32, 32)).save(b, "PNG"); load_image(b.getvalue())  # warm every code path

def hwm_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

# ru_maxrss of a child starts at its parent's (pytest's, with torch loaded) peak on Linux: reset this process's
# high-water mark instead ("5" > clear_refs) and read the peak of the decode alone.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = hwm_kb()
out = load_image(data)
assert out.shape == (h, w, 3) and not out.any()
print(len(data), (hwm_kb() - before) * 1024 / (w * h))
"""


@pytest.mark.parametrize("color_type,depth", [(2, 8), (0, 16)], ids=["rgb8", "gray16"])
def test_decompression_bomb_decodes_in_bounded_memory(color_type, depth):
    """A tiny PNG declaring many pixels costs at most ~7 bytes per declared pixel (Pillow's raster + the result),
    whatever its mode (16-bit went through whole-image float64 copies: 25 bytes per pixel)."""
    import subprocess
    import sys

    side = 3000  # 9 MP: per-strip temporaries (a few MB) are noise beside the image
    res = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(side), str(color_type), str(depth)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    size, per_pixel = res.stdout.split()
    print(f"{color_type=} {depth=}: {int(size)} bytes on disk, peak {float(per_pixel):.2f} bytes per pixel")
    assert int(size) < 100_000 and float(per_pixel) < 8.5   # was 10.0 (RGB) and 28.0 (16-bit)
