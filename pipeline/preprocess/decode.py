"""Encoded bytes -> fully loaded RGB PIL image, with limits; bad data comes back as a DecodeError value.

The image header is checked against ``max_pixels`` before any pixel is decoded, so a decompression bomb never
allocates. Colour handling matches the timm / torchvision ImageFolder loaders (``convert("RGB")``), plus EXIF
orientation, and proper scaling of 16-bit and float images (a plain convert would clip them to white).
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats PIL may open. EPS is left out on purpose: PIL hands it to Ghostscript, an interpreter.
_BLOCKED_FORMATS = frozenset({"EPS"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})



@dataclass(frozen=True)
class DecodeError:
    """Why an image could not be decoded: a short machine-readable kind and a human-readable message."""

    kind: str
    message: str


def _open_formats() -> list[str]:
    Image.init()
    return [f for f in Image.OPEN if f not in _BLOCKED_FORMATS]


def _scale_to_uint8(a: np.ndarray, full_range: float | None) -> np.ndarray:
    """Map values to 0..255: divide by full_range/255 when given, else stretch min..max."""
    a = a.astype(np.float64)
    if full_range is None:
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        a = (a - lo) / max(hi - lo, 1e-12) * 255.0
    else:
        a = a * (255.0 / full_range)
    return np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. 8-bit modes use PIL's convert (as timm does); 16-bit/int/float are rescaled."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_MODES:
        gray = _scale_to_uint8(np.asarray(img), 65535.0)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "I":
        a = np.asarray(img)
        lo, hi = int(a.min()), int(a.max())
        if lo >= 0 and hi <= 255:
            full = 255.0
        elif lo >= 0 and hi <= 65535:
            full = 65535.0  # a 16-bit image stored as 32-bit ints (older PIL, TIFF)
        else:
            full = None
        return Image.fromarray(_scale_to_uint8(a, full), "L").convert("RGB")
    if mode == "F":
        a = np.asarray(img)
        finite = a[np.isfinite(a)]
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 0.0
        full = 1.0 if lo >= 0 and hi <= 1.0 else (255.0 if lo >= 0 and hi <= 255.0 else None)
        return Image.fromarray(_scale_to_uint8(a, full), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        # Same pixels as convert("RGB"), without PIL's "convert to RGBA first" warning.
        return img.convert("RGBA").convert("RGB")
    if mode == "PA":
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")


def resized_pixels(width: int, height: int, side: int) -> int:
    """Pixels after resizing the shorter side to ``side``, aspect ratio kept (as torchvision's Resize)."""
    short, long = sorted((max(width, 1), max(height, 1)))
    return side * int(side * long / short)


def aspect_error(width: int, height: int, side: int | None, max_pixels: int) -> DecodeError | None:
    """A thin sliver (1x50000) has few pixels but becomes a huge image once its shorter side is resized
    to the model's size; refused like a decompression bomb, before any pixel is decoded or resized."""
    if side is None:
        return None
    n = resized_pixels(width, height, side)
    if n <= max_pixels:
        return None
    return DecodeError("extreme_aspect_ratio",
                       f"image is {width}x{height}: resizing its shorter side to {side} px would make {n} "
                       f"pixels, above the limit of {max_pixels} (runtime.max_pixels)")


def decode_image(
    data: bytes | None,
    *,
    max_pixels: int,
    max_bytes: int,
    draft_size: tuple[int, int] | None = None,
    resize_side: int | None = None,
) -> Image.Image | DecodeError:
    """Decode encoded image bytes into a fully loaded, upright RGB image, or return a DecodeError.

    Never raises for bad data. ``draft_size`` (off by default): for JPEGs, let libjpeg decode at a reduced
    scale whose both sides stay >= max(draft_size), i.e. enough for a shortest-side resize to that size.
    ``resize_side``: the model's shortest-side resize; images whose resized size would exceed ``max_pixels``
    are refused (extreme_aspect_ratio).
    """
    if data is None:
        return DecodeError("missing", "no image bytes")
    n = len(data)
    if n == 0:
        return DecodeError("empty", "image is 0 bytes")
    if n > max_bytes:
        return DecodeError("too_large", f"image is {n} bytes, above the limit of {max_bytes} "
                                        "(source.max_bytes)")

    # 1. Identify: reads the header only.
    try:
        img = Image.open(io.BytesIO(data), formats=_open_formats())
    except UnidentifiedImageError:
        head = bytes(data[:16])
        return DecodeError("not_an_image", f"not a recognised image format ({n} bytes starting {head!r})")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return DecodeError("too_many_pixels", f"{e}")
    except Exception as e:  # noqa: BLE001 - bad data is a value, never an exception
        return DecodeError("decode_failed", f"cannot open image: {type(e).__name__}: {e}")

    # 2. Refuse oversized images before decoding any pixel.
    try:
        width, height = img.size
        if width * height > max_pixels:
            return DecodeError(
                "too_many_pixels",
                f"image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels} "
                "(runtime.max_pixels)",
            )
        if width <= 0 or height <= 0:
            return DecodeError("decode_failed", f"image has an invalid size {width}x{height}")
        aspect = aspect_error(width, height, resize_side, max_pixels)
        if aspect is not None:
            return aspect

        # 3. Decode the pixels (first frame of an animation).
        try:
            if draft_size is not None and img.format in ("JPEG", "MPO"):
                side = max(int(draft_size[0]), int(draft_size[1]), 1)
                img.draft("RGB", (side, side))
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            return DecodeError("too_many_pixels", f"{e}")
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, zlib.error) as e:
            return DecodeError("truncated", f"truncated or corrupt image data ({img.format}): "
                                            f"{type(e).__name__}: {e}")

        # 4. Orientation and colour.
        try:
            ImageOps.exif_transpose(img, in_place=True)
        except Exception:  # noqa: BLE001 - a broken EXIF block should not lose a good image
            pass
        rgb = _to_rgb(img)
        rgb.load()
        return rgb
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return DecodeError("too_many_pixels", f"{e}")
    except Exception as e:  # noqa: BLE001
        return DecodeError("decode_failed", f"{type(e).__name__}: {e}")
