"""decode_image: every error kind, orientation, colour modes, and limits checked before pixels are decoded."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.preprocess import decode
from pipeline.preprocess.decode import DecodeError, decode_image

LIMITS = {"max_pixels": 50_000_000, "max_bytes": 64 * 1024 * 1024}


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (8-bit gray) with a tiny IDAT: a decompression bomb."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def _ok(data: bytes, **kw) -> Image.Image:
    out = decode_image(data, **{**LIMITS, **kw})
    assert isinstance(out, Image.Image), out
    assert out.mode == "RGB"
    return out


def _err(data: bytes | None, **kw) -> DecodeError:
    out = decode_image(data, **{**LIMITS, **kw})
    assert isinstance(out, DecodeError), f"expected an error, got {out}"
    assert out.message
    return out


# -- error kinds ----------------------------------------------------------------------------------------


def test_missing_empty_and_too_large():
    assert _err(None).kind == "missing"
    assert _err(b"").kind == "empty"
    data = _encode(_noise(32, 32), "PNG")
    e = _err(data, max_bytes=len(data) - 1)
    assert e.kind == "too_large" and "max_bytes" in e.message
    _ok(data, max_bytes=len(data))


@pytest.mark.parametrize("data", [
    b"hello, this is a text file named photo.jpg\n",
    b"<!DOCTYPE html><html><head><title>403 Forbidden</title></head><body>denied</body></html>",
    b"\x00" * 100,
])
def test_not_an_image(data):
    assert _err(data).kind == "not_an_image"


def test_truncated_jpeg():
    data = _encode(_noise(128, 128), "JPEG", quality=90)
    e = _err(data[: len(data) // 2])
    assert e.kind == "truncated"
    assert _err(_encode(_noise(64, 64), "PNG")[:-40]).kind == "truncated"


def test_too_many_pixels_checked_on_the_header_before_decoding():
    # 8000x8000 is under PIL's own bomb limit: our max_pixels check must refuse it before load(), which on
    # this data would otherwise fail as 'truncated' after allocating 64 MB.
    bomb = _png_header_only(8000, 8000)
    t0 = time.perf_counter()
    e = _err(bomb, max_pixels=1_000_000)
    assert e.kind == "too_many_pixels" and "8000x8000" in e.message
    assert time.perf_counter() - t0 < 1.0
    assert _err(bomb, max_pixels=10**8).kind == "truncated"  # proves the data itself would have been decoded


def test_decompression_bomb_refused_by_pil_as_well():
    bomb = _png_header_only(20000, 20000)
    t0 = time.perf_counter()
    assert _err(bomb).kind == "too_many_pixels"
    # Even when our limit is higher, PIL's DecompressionBombError is a value, not an exception.
    assert _err(bomb, max_pixels=10**12).kind == "too_many_pixels"
    assert time.perf_counter() - t0 < 1.0


def test_decompression_bomb_warning_as_error_is_handled():
    bomb = _png_header_only(10000, 10000)  # above PIL's warning limit, below its error limit
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert _err(bomb, max_pixels=10**12).kind == "too_many_pixels"


def test_decode_failed_for_anything_else(monkeypatch):
    def boom(img):
        raise RuntimeError("unexpected")

    monkeypatch.setattr(decode, "_to_rgb", boom)
    e = _err(_encode(_noise(8, 8), "PNG"))
    assert e.kind == "decode_failed" and "unexpected" in e.message


# -- orientation, frames, modes --------------------------------------------------------------------------


def test_exif_rotated_jpeg_comes_out_upright():
    w, h = 60, 20
    a = np.zeros((h, w, 3), np.uint8)
    a[:10, :10] = (255, 0, 0)  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = _encode(Image.fromarray(a), "JPEG", quality=95, exif=exif.tobytes())
    out = _ok(data)
    assert out.size == (h, w)
    r, g, b = out.getpixel((h - 5, 5))  # stored top-left shows at the displayed top-right
    assert r > 200 and g < 60 and b < 60
    assert out.getpixel((5, 5))[0] < 60


def test_plain_rgb_jpeg_equals_timm_loader():
    data = _encode(_noise(40, 30, seed=3), "JPEG", quality=85)
    ref = Image.open(io.BytesIO(data)).convert("RGB")
    out = _ok(data)
    assert out.size == (40, 30)
    assert np.array_equal(np.asarray(out), np.asarray(ref))


def test_cmyk_jpeg():
    data = _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    r, g, b = _ok(data).getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60


def test_16_bit_png_scaled_not_clipped():
    a = np.array([[0, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    data = _encode(Image.fromarray(a), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = np.asarray(_ok(data))
    assert out.shape == (4, 3, 3)
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 1].tolist() == [128, 128, 128]  # mid-gray stays mid-gray (a plain convert gives 255)
    assert out[0, 2].tolist() == [255, 255, 255]


def test_32_bit_int_and_float_images():
    ints = np.array([[0, 32768, 65535]], dtype=np.int32)
    out = np.asarray(_ok(_encode(Image.fromarray(ints, "I"), "TIFF")))
    assert out[0, :, 0].tolist() == [0, 128, 255]
    floats = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    out = np.asarray(_ok(_encode(Image.fromarray(floats, "F"), "TIFF")))
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_palette_png_with_transparency_no_warning():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((1, 1), 1)
    data = _encode(img, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).info.get("transparency") == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _ok(data)
    assert out.getpixel((0, 0)) == (10, 20, 30)  # a transparent pixel keeps its palette colour, as timm's
    assert out.getpixel((1, 1)) == (200, 100, 50)


@pytest.mark.parametrize("mode,value", [("L", 77), ("LA", (77, 10)), ("RGBA", (1, 2, 3, 0)), ("1", 1)])
def test_other_modes(mode, value):
    img = Image.new(mode, (5, 3), value)
    data = _encode(img, "PNG")
    out = _ok(data)
    assert out.size == (5, 3)
    assert out.getpixel((2, 1)) == img.convert("RGB").getpixel((2, 1))


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    assert _ok(data).getpixel((4, 4)) == (255, 0, 0)


def test_one_pixel_image():
    out = _ok(_encode(Image.new("RGB", (1, 1), (9, 8, 7)), "PNG"))
    assert out.size == (1, 1) and out.getpixel((0, 0)) == (9, 8, 7)


def test_draft_size_reduces_jpeg_decode_only_when_asked():
    data = _encode(_noise(800, 600), "JPEG", quality=80)
    assert _ok(data).size == (800, 600)
    small = _ok(data, draft_size=(100, 100))
    assert min(small.size) >= 100 and small.size[0] < 800
    assert _ok(_encode(_noise(80, 60), "PNG"), draft_size=(10, 10)).size == (80, 60)  # PNG: no draft


def test_a_thin_sliver_is_refused_before_it_is_resized_to_the_models_size():
    """1x20000 is only 20,000 pixels, but a 256 px shortest-side resize makes it 256x5,120,000."""
    sliver = _encode(Image.new("RGB", (20000, 1), (200, 10, 10)), "PNG")
    assert _ok(sliver).size == (20000, 1)  # without a model's resize: decoded as is
    err = _err(sliver, resize_side=256)
    assert err.kind == "extreme_aspect_ratio"
    assert "20000x1" in err.message and "runtime.max_pixels" in err.message
    assert _ok(_encode(_noise(400, 100), "PNG"), resize_side=256).size == (400, 100)  # 4:1 is fine
