"""Per-format row readers, run on workers: one shard (loose files, a WebDataset tar, a Parquet file) to
ROW_SCHEMA tables, streamed with bounded memory.

`pipeline.sources.read_shard` picks the reader by ``Shard.format``; each reader adds rows to a `_Rows`
batcher. A bad file, member or cell is a row with an error kind (read_error, too_large, unsafe_name, no_image,
duplicate_key, shard_corrupt, schema_mismatch, missing: an object a manifest names that does not exist, or a
null Parquet cell), never an exception that stops the read. Every read goes through ``storage`` (looked up at
call time, so tests can patch ``storage.read_bytes``).
"""

from __future__ import annotations

import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from pipeline import storage
from pipeline.config import ConfigError, SourceConfig
from pipeline.sources import ROW_SCHEMA, Shard, _columns_text, _label_column, resolve_image_column
from pipeline.storage import StorageError

# WebDataset image members, in order of preference when a sample holds several.
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

_MAX_LABEL_BYTES = 1 << 20  # a label member larger than this is ignored
_MAX_BATCH_BYTES = 64 << 20  # a batch is also cut when its encoded bytes reach this
_PREFETCH = 8  # loose files fetched concurrently within one shard (object storage is latency bound)


class _Rows:
    """Accumulates rows of one shard; emits ROW_SCHEMA tables of at most `limit` rows (or ~64 MiB)."""

    def __init__(self, shard: Shard, limit: int) -> None:
        self.shard = shard
        self.limit = max(1, int(limit))
        self.next_row = 0
        self._cols: dict[str, list[Any]] = {n: [] for n in ROW_SCHEMA.names}
        self._bytes = 0

    def add(self, id_: str, source: str, label: str | None = None, data: bytes | None = None,
            kind: str | None = None, message: str | None = None) -> pa.Table | None:
        """Add one row; returns a full batch when one is ready."""
        c = self._cols
        c["id"].append(id_)
        c["source"].append(source)
        c["label"].append(label)
        c["bytes"].append(data)
        c["error_kind"].append(kind)
        c["error_message"].append(message)
        c["shard"].append(self.shard.key)
        c["row"].append(self.next_row)
        self.next_row += 1
        self._bytes += len(data) if data else 0
        if len(c["id"]) >= self.limit or self._bytes >= _MAX_BATCH_BYTES:
            return self.flush()
        return None

    def flush(self) -> pa.Table | None:
        if not self._cols["id"]:
            return None
        arrays = [pa.array(self._cols[f.name], f.type) for f in ROW_SCHEMA]
        self._cols = {n: [] for n in ROW_SCHEMA.names}
        self._bytes = 0
        return pa.Table.from_arrays(arrays, schema=ROW_SCHEMA)


def _error_text(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _too_large(size: int, max_bytes: int) -> str:
    return f"{size} bytes, above the limit of {max_bytes} (source.max_bytes)"


# -- loose files --------------------------------------------------------------------------------------


def _folder_label(rel: str) -> str | None:
    parts = rel.split("/")
    return parts[-2] if len(parts) > 1 else None


def _ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], window: int) -> Iterator[Any]:
    """fn over items with up to `window` calls in flight, results in input order."""
    items = list(items)
    if window <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(min(window, len(items))) as pool:
        futures = [pool.submit(fn, it) for it in items[:window]]
        for i in range(len(items)):
            result = futures[i].result()
            futures[i] = None  # drop the reference: bounded memory
            if i + window < len(items):
                futures.append(pool.submit(fn, items[i + window]))
            yield result


def _fetch(uri: str, listed_size: int | None, max_bytes: int,
           missing: str = "read_error") -> tuple[bytes | None, str | None, str | None]:
    """(bytes, error kind, message) of one loose file; an object that does not exist is ``missing``."""
    if listed_size is not None and listed_size > max_bytes:
        return None, "too_large", f"file is {_too_large(listed_size, max_bytes)}; not read"
    try:
        data = storage.read_bytes(uri)
    except (StorageError, OSError) as e:
        gone = isinstance(e, FileNotFoundError) or isinstance(e.__cause__, FileNotFoundError)
        return None, missing if gone else "read_error", _error_text(e)
    if len(data) > max_bytes:
        return None, "too_large", f"file is {_too_large(len(data), max_bytes)}"
    return data, None, None


def _read_files(shard: Shard, cfg: SourceConfig, rows: _Rows) -> Iterator[pa.Table | None]:
    """Loose files of a listed chunk, or the objects a manifest names (one that does not exist: missing)."""
    manifest = shard.format == "manifest"
    if not manifest and cfg.labels not in ("none", "folder"):
        raise ConfigError(f"--labels {cfg.labels} does not apply to loose image files: use folder or none")
    members = shard.members()
    window = _PREFETCH if storage.protocol_of(members[0].uri) != "file" else 4
    missing = "missing" if manifest else "read_error"
    fetched = _ordered_map(lambda m: _fetch(m.uri, m.size or None, cfg.max_bytes, missing), members, window)
    for m, (data, kind, message) in zip(members, fetched, strict=True):
        if manifest:
            label = m.label if cfg.labels != "folder" else _folder_label(m.uri.split("://", 1)[-1])
        else:
            label = _folder_label(m.rel) if cfg.labels == "folder" else None
        yield rows.add(m.rel, m.uri, label, data, kind, message)


# -- WebDataset ---------------------------------------------------------------------------------------


def _split_member(name: str) -> tuple[str, str] | None:
    """(key, ext) of a member name; None for a name to ignore (hidden, no extension)."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or parts[-1].startswith("."):
        return None
    base = parts[-1]
    if "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return "/".join([*parts[:-1], stem]), ext.lower()


def _is_unsafe(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or bool(re.match(r"^[A-Za-z]:", name))


class _Sample:
    """Members of one WebDataset sample as they stream by; keeps only the best image and the label."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.exts: list[str] = []
        self.image: bytes | None = None
        self.image_rank = len(WDS_IMAGE_EXTS)
        self.image_error: tuple[str, str] | None = None
        self.labels: dict[str, str] = {}


def _label_exts(cfg: SourceConfig) -> tuple[str, ...]:
    if cfg.labels == "none":
        return ()
    if cfg.labels == "folder":
        return ("cls", "txt")
    return (cfg.labels.lower().lstrip("."),)


def _read_webdataset(shard: Shard, cfg: SourceConfig, rows: _Rows) -> Iterator[pa.Table | None]:
    uri, rel = shard.uris[0], shard.rels[0]
    label_exts = _label_exts(cfg)
    seen: set[str] = set()

    def add(id_: str, label: str | None, data: bytes | None, kind: str | None = None,
            message: str | None = None) -> pa.Table | None:
        if id_ in seen:  # a key whose members are not consecutive, or a repeated member name
            return rows.add(f"{id_}#{rows.next_row}", uri, label, None, "duplicate_key",
                            f"'{id_}' appears more than once in this shard; only the first is used")
        seen.add(id_)
        return rows.add(id_, uri, label, data, kind, message)

    def emit(s: _Sample) -> pa.Table | None:
        label = next((s.labels[e] for e in label_exts if e in s.labels), None)
        id_ = f"{rel}/{s.key}"
        if s.image is not None:
            return add(id_, label, s.image)
        if s.image_error:
            return add(id_, label, None, *s.image_error)
        found = ", ".join(s.exts) or "none"
        return add(id_, label, None, "no_image",
                   f"sample has no image member ({', '.join(WDS_IMAGE_EXTS)}); members: {found}")

    try:
        fobj = storage.open_input(uri)
    except (StorageError, OSError) as e:
        yield rows.add(f"{rel}/<unreadable>", uri, None, None, "read_error", _error_text(e))
        return
    current: _Sample | None = None
    try:
        with fobj, tarfile.open(fileobj=fobj, mode="r|*") as tf:
            for member in tf:
                tf.members = []  # streaming: do not keep every TarInfo of the shard
                if _is_unsafe(member.name):
                    yield add(f"{rel}/{member.name}", None, None, "unsafe_name",
                              f"member name '{member.name}' is absolute or contains '..'; not read")
                    continue
                split = _split_member(member.name) if member.isfile() else None
                if split is None:  # directories, links, hidden or extension-less names
                    continue
                key, ext = split
                if current is None or key != current.key:
                    if current is not None:
                        yield emit(current)
                    current = _Sample(key)
                current.exts.append(ext)
                if ext in WDS_IMAGE_EXTS:
                    rank = WDS_IMAGE_EXTS.index(ext)
                    if rank < current.image_rank:
                        current.image_rank = rank
                        if member.size > cfg.max_bytes:
                            big = _too_large(member.size, cfg.max_bytes)
                            current.image = None
                            current.image_error = ("too_large", f"member '{member.name}' is {big}; not read")
                        else:
                            current.image, current.image_error = _read_member(tf, member), None
                elif ext in label_exts and member.size <= _MAX_LABEL_BYTES:
                    current.labels[ext] = _read_member(tf, member).decode("utf-8", errors="replace").strip()
            if current is not None:
                yield emit(current)
                current = None
            # tarfile stops quietly at a missing end-of-archive marker: a plain tar cut at a member boundary.
            if rel.lower().endswith(".tar") and shard.size and tf.offset + tarfile.BLOCKSIZE > shard.size:
                raise tarfile.ReadError(
                    f"archive ends at byte {shard.size} without the end-of-archive marker: truncated"
                )
    except (tarfile.TarError, EOFError, OSError, zlib.error, StorageError, ValueError) as e:
        id_ = f"{rel}/{current.key}" if current is not None else f"{rel}/<corrupt>"
        what = f"; sample '{current.key}' is incomplete" if current is not None else ""
        yield add(id_, None, None, "shard_corrupt",
                  f"corrupt or truncated tar after {rows.next_row} rows{what}: {_error_text(e)}")


def _read_member(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tf.extractfile(member)
    if f is None:  # pragma: no cover - only regular files reach here
        return b""
    return f.read()


# -- Parquet ------------------------------------------------------------------------------------------


def _as_text(col: pa.ChunkedArray | pa.Array) -> list[str | None]:
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = col.cast(pa.string())
    return col.to_pylist()


def _read_parquet(shard: Shard, cfg: SourceConfig, rows: _Rows) -> Iterator[pa.Table | None]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    uri, rel = shard.uris[0], shard.rels[0]
    try:
        fobj = storage.open_input(uri)
    except (StorageError, OSError) as e:
        yield rows.add(f"{rel}#<unreadable>", uri, None, None, "read_error", _error_text(e))
        return
    with fobj:
        try:
            pf = pq.ParquetFile(fobj)
            schema = pf.schema_arrow
        except Exception as e:  # noqa: BLE001 - a bad file is data
            yield rows.add(f"{rel}#<unreadable>", uri, None, None, "read_error", _error_text(e))
            return
        label_col = _label_column(cfg)
        try:
            image_col = resolve_image_column(schema, cfg.image_column, f"'{uri}'")
            for name in (cfg.id_column, label_col):
                if name and name not in schema.names:
                    raise ConfigError(f"column '{name}' not found; columns: {_columns_text(schema)}")
        except ConfigError as e:
            yield rows.add(f"{rel}#<schema>", uri, None, None, "schema_mismatch",
                           f"this file's schema differs from the first shard's: {e}")
            return
        columns = list(dict.fromkeys(c for c in (image_col, cfg.id_column, label_col) if c))
        index = 0
        try:
            for batch in pf.iter_batches(batch_size=rows.limit, columns=columns):
                images = batch.column(image_col)
                if pa.types.is_struct(images.type):
                    # HF datasets' Image feature: struct<bytes, path>; a null struct gives a null cell
                    images = pc.struct_field(images, "bytes")
                data = images.to_pylist()
                n = len(data)
                ids = _as_text(batch.column(cfg.id_column)) if cfg.id_column else [None] * n
                labels = _as_text(batch.column(label_col)) if label_col else [None] * n
                for i in range(n):
                    id_ = ids[i] if ids[i] is not None else f"{rel}#{index}"
                    blob = data[i]
                    if blob is None:
                        out = rows.add(id_, uri, labels[i], None, "missing", "null image cell")
                    elif len(blob) > cfg.max_bytes:
                        out = rows.add(id_, uri, labels[i], None, "too_large",
                                       f"image cell is {_too_large(len(blob), cfg.max_bytes)}")
                    else:
                        out = rows.add(id_, uri, labels[i], blob)
                    index += 1
                    yield out
                del data, images, batch
        except Exception as e:  # noqa: BLE001 - keep the rows read so far, report the rest
            yield rows.add(f"{rel}#<corrupt>", uri, None, None, "shard_corrupt",
                           f"corrupt Parquet file after {index} rows: {_error_text(e)}")
