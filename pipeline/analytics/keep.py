"""Which row of a group of near-duplicates `pipeline dedup` keeps (Ray-free).

Rules (``--keep``):
- ``largest`` (default): the most pixels, then a lossless file (PNG, BMP, uncompressed or losslessly
  compressed TIFF, lossless WebP) over a lossy one (JPEG, lossy WebP, GIF's palette), then the larger file
  (of two same-size JPEGs, the one compressed less: a copy re-encoded at a lower quality is smaller), then
  the smallest id. Only the image headers (and sizes) of rows that have a near-duplicate are read, through
  ``pipeline.storage``. A row whose header cannot be read (its source is a WebDataset tar or a Parquet file,
  or the file is gone or damaged) ranks after every row whose header was read: among such rows the id
  decides.
- ``first``: the smallest id.
- ``centroid``: the row nearest its cluster's centroid (SemDeDup's rule), ties by id.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipeline import storage

KEEP_RULES = {
    "largest": "in each group the row with the most pixels is kept, then a lossless file over a lossy one, "
               "then the larger file, then the smaller id (a row whose image header cannot be read ranks "
               "last)",
    "first": "in each group the row with the smallest id is kept",
    "centroid": "in each group the row nearest its cluster's centroid is kept (ties: the smaller id)",
}
LOSSLESS_FORMATS = ("PNG", "BMP", "TIFF", "PPM", "TGA")
HEADER_THREADS = 16


@dataclass(frozen=True)
class ImageInfo:
    """What an image file's header says: pixels (width x height), its format, whether that is lossless; and
    the file's size in bytes."""

    pixels: int
    format: str
    lossless: bool
    bytes: int = 0


def check_rule(keep: str) -> str:
    """The rule, or ValueError naming the choices."""
    if keep not in KEEP_RULES:
        raise ValueError(f"unknown keep rule '{keep}': use --keep largest, --keep first or --keep centroid")
    return keep


def _lossless(img, head: bytes) -> bool:
    fmt = (img.format or "").upper()
    if fmt == "WEBP":  # RIFF....WEBP then the first chunk: VP8L is lossless, VP8 lossy, VP8X extended
        if head[12:16] == b"VP8L":
            return True
        return head[12:16] == b"VP8X" and b"VP8L" in head[:4096]
    if fmt == "TIFF":
        return str(img.info.get("compression", "raw")).lower() not in ("jpeg", "tiff_jpeg", "webp")
    return fmt in LOSSLESS_FORMATS


def image_info(uri: str | None) -> ImageInfo | None:
    """The header of one image file (its pixels are not decoded); None when it cannot be read."""
    if not uri:
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with storage.open_input(uri) as f:
            head = f.read(4096)
            f.seek(0)
            with Image.open(f) as img:
                w, h = img.size
                fmt, lossless = (img.format or "").upper(), _lossless(img, head)
            f.seek(0, 2)
            return ImageInfo(int(w) * int(h), fmt, lossless, int(f.tell()))
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError):
        return None


def image_infos(sources: dict[str, str | None], threads: int = HEADER_THREADS) -> dict[str, ImageInfo | None]:
    """``image_info`` of each id's source, read by a pool of threads."""
    ids = sorted(sources)
    if not ids:
        return {}
    with ThreadPoolExecutor(max(1, min(threads, len(ids)))) as pool:
        return dict(zip(ids, pool.map(image_info, [sources[i] for i in ids])))


def keep_order(ids: list[str], distance: np.ndarray, keep: str,
               infos: dict[str, ImageInfo | None] | None = None) -> np.ndarray:
    """Positions of ``ids`` in keep order (the first of a group is kept) under rule ``keep``."""
    check_rule(keep)
    names = np.asarray(ids, dtype=object)
    by_id = np.argsort(names, kind="stable")  # ids are unique: this is the last criterion of every rule
    rank_id = np.empty(len(ids), np.int64)
    rank_id[by_id] = np.arange(len(ids))
    if keep == "first":
        return by_id
    if keep == "centroid":
        return np.lexsort((rank_id, np.asarray(distance, np.float64)))
    infos = infos or {}
    got = [infos.get(i) for i in ids]
    unread = np.array([g is None for g in got], bool)
    pixels = np.array([g.pixels if g else 0 for g in got], np.int64)
    lossy = np.array([not (g and g.lossless) for g in got], bool)
    size = np.array([g.bytes if g else 0 for g in got], np.int64)
    return np.lexsort((rank_id, -size, lossy, -pixels, unread))
