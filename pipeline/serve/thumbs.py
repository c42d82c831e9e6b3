"""Thumbnails of stored images, read through `pipeline.storage` from where the table says each row came from:
a loose file (its ``source`` is the file), a WebDataset member (``source`` is the tar, the id ends with the
sample's key) or a Parquet cell (``source`` is the file, the id ends with ``#<row>``). Resized on the server,
kept in a small in-memory cache; an image that is gone or damaged gives ``None`` (the page shows a
placeholder), never an exception."""

from __future__ import annotations

import io
import tarfile
import threading
from collections import OrderedDict

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline import storage

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def remap(source: str | None, source_map: dict[str, str]) -> str | None:
    """``source`` with the longest matching prefix of ``source_map`` replaced."""
    if source is None:
        return None
    for old in sorted(source_map, key=len, reverse=True):
        if source.startswith(old):
            return source_map[old] + source[len(old):]
    return source


def _tar_member(uri: str, row_id: str) -> bytes | None:
    """The image member of the sample ``row_id`` names: ``<shard rel>/<key>``, where the shard's rel ends with
    the tar's file name and the key is a member's path up to the first dot of its file name (without a
    leading ``./``), as the WebDataset reader names samples."""
    tar_name = uri.rstrip("/").rsplit("/", 1)[-1]
    at = row_id.rfind(tar_name + "/")
    if at < 0:
        return None
    want = row_id[at + len(tar_name) + 1:]
    with storage.open_input(uri) as f, tarfile.open(fileobj=f, mode="r|*") as tf:
        for m in tf:
            if not m.isfile():
                continue
            name = m.name[2:] if m.name.startswith("./") else m.name
            folder, _, base = name.rpartition("/")
            stem, _, ext = base.partition(".")
            key = f"{folder}/{stem}" if folder else stem
            if ext.lower() in IMAGE_SUFFIXES and key == want:
                data = tf.extractfile(m)
                return data.read() if data is not None else None
    return None


def _image_column(schema: pa.Schema) -> str | None:
    for field in schema:
        t = field.type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return field.name
        if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
            return field.name
    return None


def _parquet_cell(uri: str, row_id: str) -> bytes | None:
    """The image bytes of row ``#<n>`` of a Parquet file (its first binary, or struct<bytes>, column)."""
    head, sep, tail = row_id.rpartition("#")
    if not sep or not tail.isdigit():
        return None
    row = int(tail)
    with storage.open_input(uri) as f:
        pf = pq.ParquetFile(f)
        column = _image_column(pf.schema_arrow)
        if column is None:
            return None
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row < n:
                value = pf.read_row_group(g, columns=[column]).column(0)[row].as_py()
                return value.get("bytes") if isinstance(value, dict) else value
            row -= n
    return None


def read_image_bytes(source: str, row_id: str) -> bytes | None:
    """The encoded image of one row, or None when it cannot be found."""
    lower = source.lower()
    if lower.endswith(TAR_SUFFIXES):
        return _tar_member(source, row_id)
    if lower.endswith(".parquet"):
        return _parquet_cell(source, row_id)
    return storage.read_bytes(source)


def thumbnail(data: bytes, size: int, max_pixels: int, max_bytes: int) -> bytes | None:
    """A JPEG of at most ``size`` px on its longest side; None for data that is not a decodable image."""
    from pipeline.preprocess.decode import DecodeError, decode_image  # its package imports torch: when needed

    img = decode_image(data, max_pixels=max_pixels, max_bytes=max_bytes, draft_size=(size, size))
    if isinstance(img, DecodeError):
        return None
    img.thumbnail((size, size), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    img.convert("RGB").save(out, format="JPEG", quality=82)
    return out.getvalue()


class Thumbnails:
    """Thumbnails by row id, cached (least recently used goes first)."""

    def __init__(self, size: int = 192, capacity: int = 4096, max_pixels: int = 50_000_000,
                 max_bytes: int = 64 << 20) -> None:
        self.size, self.capacity = size, capacity
        self.max_pixels, self.max_bytes = max_pixels, max_bytes
        self._cache: OrderedDict[str, bytes | None] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, row_id: str, source: str | None) -> bytes | None:
        with self._lock:
            if row_id in self._cache:
                self._cache.move_to_end(row_id)
                self.hits += 1
                return self._cache[row_id]
        self.misses += 1
        out = None
        if source:
            try:
                data = read_image_bytes(source, row_id)
                out = thumbnail(data, self.size, self.max_pixels, self.max_bytes) if data else None
            except (OSError, ValueError, tarfile.TarError, pa.ArrowException):
                out = None  # gone, unreadable or damaged: the page shows a placeholder
        if self.capacity and out is not None:  # a missing image is looked for again next time
            with self._lock:
                self._cache[row_id] = out
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
        return out
