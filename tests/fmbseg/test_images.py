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
