"""Sources: list the work units (shards) of a source on the driver, and read rows from one shard on a worker.

Three formats: loose image files (grouped into chunks), WebDataset tars, Parquet files with image bytes.
Rows carry the encoded bytes (decoding happens in the Embedder) or an error kind; a bad file, member or cell
is a row with an error, never an exception that stops the read. Every read goes through ``storage``.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline import storage
from pipeline.config import IMAGE_EXTENSIONS, ConfigError, SourceConfig
from pipeline.storage import FileInfo, StorageError

ROW_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("source", pa.string()),
    pa.field("label", pa.string()),
    pa.field("bytes", pa.binary()),
    pa.field("error_kind", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("row", pa.int64(), nullable=False),
])



def rows_from_bytes(datas: list[bytes | None], kinds: list[str | None] | None = None,
                    shard: str = "memory") -> pa.Table:
    """Encoded images as read tasks deliver them (ROW_SCHEMA), to call a stage (the Embedder) directly:
    ids ``<shard>#<row>``; ``kinds`` marks rows that failed before decoding (as a read error does)."""
    n = len(datas)
    return pa.table({
        "id": [f"{shard}#{k}" for k in range(n)], "source": [shard] * n, "label": [None] * n,
        "bytes": pa.array(datas, pa.binary()), "error_kind": pa.array(kinds or [None] * n, pa.string()),
        "error_message": pa.array([None] * n, pa.string()), "shard": [shard] * n, "row": list(range(n)),
    }, schema=ROW_SCHEMA)


FORMATS = ("files", "webdataset", "parquet")
TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
PARQUET_EXTENSIONS = (".parquet",)
# WebDataset image members, in order of preference when a sample holds several.
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
PARQUET_IMAGE_NAMES = ("image", "img", "image_bytes", "bytes", "jpg", "jpeg", "png", "content")

_MAX_LABEL_BYTES = 1 << 20  # a label member larger than this is ignored
_MAX_BATCH_BYTES = 64 << 20  # a batch is also cut when its encoded bytes reach this
_PREFETCH = 8  # loose files fetched concurrently within one shard (object storage is latency bound)

_FORMAT_FLAG = "pass --format files|webdataset|parquet (or set source.format)"


@dataclass(frozen=True)
class Shard:
    """One work unit: a chunk of loose image files, or one WebDataset/Parquet shard file."""

    key: str  # stable, unique, filesystem-safe; names the output files of this unit
    format: str  # files | webdataset | parquet
    uris: tuple[str, ...]
    rels: tuple[str, ...]  # relative to the source root, '/'-separated
    size: int  # total bytes
    version: str  # changes when any member file changes
    sizes: tuple[int, ...] = ()  # per file, as listed (empty when unknown)


# --------------------------------------------------------------------------------------------------
# Driver side: listing


def _kind_of(rel: str) -> str | None:
    name = rel.lower()
    if name.endswith(IMAGE_EXTENSIONS):
        return "files"
    if name.endswith(TAR_EXTENSIONS):
        return "webdataset"
    if name.endswith(PARQUET_EXTENSIONS):
        return "parquet"
    return None


def _describe_counts(counts: dict[str, int]) -> str:
    names = {"files": "image files", "webdataset": "WebDataset .tar shards", "parquet": "Parquet files"}
    return ", ".join(f"{n} {names[k]}" for k, n in counts.items() if n)


def detect_format(files: list[FileInfo]) -> str:
    """files | webdataset | parquet from the file extensions; ConfigError when none or several are present."""
    counts = {k: 0 for k in FORMATS}
    for f in files:
        kind = _kind_of(f.rel)
        if kind:
            counts[kind] += 1
    present = [k for k, n in counts.items() if n]
    if not present:
        raise ConfigError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}), WebDataset .tar or Parquet files among {len(files)} "
            "files: check --source / --format"
        )
    if len(present) > 1:
        raise ConfigError(
            f"the source mixes formats ({_describe_counts(counts)}): {_FORMAT_FLAG} to choose one, or point "
            "--source at a prefix that holds only one kind"
        )
    return present[0]


def _sanitize(text: str, limit: int = 80) -> str:
    """Filesystem-safe [A-Za-z0-9._-], not hidden (no leading '.' or '_'), at most `limit` characters."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:limit].lstrip("._-")
    return safe or "shard"


def _short_hash(*parts: str) -> str:
    return hashlib.sha1("\n".join(parts).encode("utf-8")).hexdigest()[:10]


def _make_shard(fmt: str, members: list[FileInfo]) -> Shard:
    rels = tuple(f.rel for f in members)
    version = hashlib.sha1(
        "\n".join(f"{f.rel}\t{f.size}\t{f.version}" for f in members).encode("utf-8")
    ).hexdigest()[:16]
    return Shard(
        key=f"{_sanitize(rels[0])}-{_short_hash(fmt, *rels)}",
        format=fmt,
        uris=tuple(f.uri for f in members),
        rels=rels,
        size=sum(f.size for f in members),
        version=version,
        sizes=tuple(f.size for f in members),
    )


def list_shards(cfg: SourceConfig) -> tuple[list[Shard], int]:
    """(shards, skipped): the work units under cfg.uri, and how many listed files are not inputs.

    Lists only; never reads image bytes. A source may be a prefix or a single file.
    """
    files = storage.list_files(cfg.uri)
    if not files:
        if not storage.exists(cfg.uri):
            raise ConfigError(f"source '{cfg.uri}' does not exist: check --source")
        raise ConfigError(f"no images/shards found under {cfg.uri} (it is empty): check --source / --format")
    fmt = detect_format(files) if cfg.format == "auto" else cfg.format
    inputs = sorted((f for f in files if _kind_of(f.rel) == fmt), key=lambda f: f.rel)
    if not inputs:
        counts = {k: 0 for k in FORMATS}
        for f in files:
            kind = _kind_of(f.rel)
            if kind:
                counts[kind] += 1
        found = _describe_counts(counts) or "none of them images or shards"
        raise ConfigError(
            f"no images/shards found under {cfg.uri} for format '{fmt}' ({len(files)} files: {found}): "
            "check --source / --format"
        )
    skipped = len(files) - len(inputs)
    if fmt == "files":
        step = cfg.files_per_shard
        shards = [_make_shard(fmt, inputs[i:i + step]) for i in range(0, len(inputs), step)]
    else:
        shards = [_make_shard(fmt, [f]) for f in inputs]
    return shards, skipped


# --------------------------------------------------------------------------------------------------
# Parquet schema helpers (driver validation and worker reads share them)


def sample_shards(shards: list[Shard], n: int, files_per_shard: int) -> list[Shard] | None:
    """At most n loose files, chosen by a hash of their path (deterministic, spread over all folders),
    regrouped into shards; None for shard formats (tar, Parquet), which the caller limits by rows."""
    if not shards or shards[0].format != "files":
        return None
    members = [
        FileInfo(uri, rel, size, "")
        for s in shards
        for uri, rel, size in zip(s.uris, s.rels, s.sizes or (0,) * len(s.uris))
    ]
    if len(members) <= n:
        return shards
    chosen = sorted(members, key=lambda f: hashlib.sha1(f.rel.encode("utf-8")).hexdigest())[:n]
    chosen.sort(key=lambda f: f.rel)
    return [_make_shard("files", chosen[i:i + files_per_shard]) for i in range(0, n, files_per_shard)]


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) or (
        hasattr(pa.types, "is_binary_view") and pa.types.is_binary_view(t)
    )


def _is_image_struct(t: pa.DataType) -> bool:
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and _is_binary(t.field("bytes").type)


def _is_scalar_text(t: pa.DataType) -> bool:
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
            or pa.types.is_boolean(t) or pa.types.is_dictionary(t)
            or (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t)))


def _columns_text(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name} ({f.type})" for f in schema)


def resolve_image_column(schema: pa.Schema, image_column: str | None, where: str) -> str:
    """The Parquet column holding image bytes (binary, or struct<bytes, path>); ConfigError naming the fix."""
    if image_column:
        if image_column not in schema.names:
            raise ConfigError(
                f"image column '{image_column}' not found in {where}; available columns: "
                f"{_columns_text(schema)}. Set source.image_column (--set source.image_column=NAME)"
            )
        t = schema.field(image_column).type
        if not (_is_binary(t) or _is_image_struct(t)):
            raise ConfigError(
                f"image column '{image_column}' in {where} is {t}, not binary image bytes or "
                f"struct<bytes, path>; available columns: {_columns_text(schema)}. Set source.image_column"
            )
        return image_column
    named = [f.name for f in schema if f.name.lower() in PARQUET_IMAGE_NAMES and _is_binary(f.type)]
    if len(named) == 1:
        return named[0]
    structs = [f.name for f in schema if _is_image_struct(f.type)]
    binaries = [f.name for f in schema if _is_binary(f.type)]
    candidates = named or structs or binaries
    if len(candidates) == 1:
        return candidates[0]
    what = "several possible image columns" if candidates else "no binary image column"
    raise ConfigError(
        f"{what} in {where}; available columns: {_columns_text(schema)}. Set source.image_column "
        "(--set source.image_column=NAME)"
    )


def _label_column(cfg: SourceConfig) -> str | None:
    if cfg.labels == "none":
        return None
    return "label" if cfg.labels == "folder" else cfg.labels


def _check_text_column(schema: pa.Schema, name: str, key: str, where: str, hint: str) -> None:
    if name not in schema.names:
        raise ConfigError(
            f"column '{name}' ({key}) not found in {where}; available columns: {_columns_text(schema)}. "
            f"{hint}"
        )
    t = schema.field(name).type
    if not _is_scalar_text(t):
        raise ConfigError(
            f"column '{name}' ({key}) in {where} is {t}; it must hold strings or integers. {hint}"
        )


def _read_parquet_schema(uri: str) -> pa.Schema:
    import pyarrow.parquet as pq

    with storage.open_input(uri) as f:
        try:
            return pq.ParquetFile(f).schema_arrow
        except Exception as e:  # noqa: BLE001 - reported with the file it concerns
            raise ConfigError(f"cannot read the Parquet schema of '{uri}': {type(e).__name__}: {e}") from e


def check_source(cfg: SourceConfig, shards: list[Shard]) -> None:
    """Cheap driver-side validation before any work; ConfigError naming the flag or key to set."""
    if not shards:
        return
    fmt = shards[0].format
    if fmt != "parquet":
        for key, value in (("image_column", cfg.image_column), ("id_column", cfg.id_column)):
            if value:
                raise ConfigError(
                    f"source.{key}='{value}' only applies to Parquet sources, but this source is '{fmt}': "
                    f"remove source.{key} or {_FORMAT_FLAG}"
                )
    if fmt == "files":
        if cfg.labels not in ("none", "folder"):
            raise ConfigError(
                f"--labels {cfg.labels} names a Parquet column or WebDataset member; loose image files take "
                "--labels folder (the parent folder name) or --labels none"
            )
        return
    if fmt == "webdataset":
        return
    where = f"'{shards[0].uris[0]}'"
    schema = _read_parquet_schema(shards[0].uris[0])
    resolve_image_column(schema, cfg.image_column, where)
    if cfg.id_column:
        _check_text_column(schema, cfg.id_column, "source.id_column", where,
                           "Set source.id_column to an existing column, or unset it for <file>#<row> ids")
    label = _label_column(cfg)
    if label:
        hint = ("--labels folder reads the 'label' column of Parquet sources; pass --labels <column> or "
                "--labels none" if cfg.labels == "folder" else
                "Pass --labels <column> (source.labels) with an existing column, or --labels none")
        _check_text_column(schema, label, "source.labels", where, hint)


# --------------------------------------------------------------------------------------------------
# Worker side: reading rows


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


def read_shard(shard: Shard, cfg: SourceConfig, rows_per_batch: int = 64) -> Iterator[pa.Table]:
    """Rows of one shard as ROW_SCHEMA tables of at most rows_per_batch rows, streamed (bounded memory)."""
    rows = _Rows(shard, rows_per_batch)
    if shard.format == "files":
        gen = _read_files(shard, cfg, rows)
    elif shard.format == "webdataset":
        gen = _read_webdataset(shard, cfg, rows)
    elif shard.format == "parquet":
        gen = _read_parquet(shard, cfg, rows)
    else:
        raise ConfigError(f"unknown shard format '{shard.format}': {_FORMAT_FLAG}")
    for table in gen:
        if table is not None:
            yield table
    last = rows.flush()
    if last is not None:
        yield last


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


def _fetch(uri: str, listed_size: int | None, max_bytes: int) -> tuple[bytes | None, str | None, str | None]:
    """(bytes, error kind, message) of one loose file."""
    if listed_size is not None and listed_size > max_bytes:
        return None, "too_large", f"file is {_too_large(listed_size, max_bytes)}; not read"
    try:
        data = storage.read_bytes(uri)
    except (StorageError, OSError) as e:
        return None, "read_error", _error_text(e)
    if len(data) > max_bytes:
        return None, "too_large", f"file is {_too_large(len(data), max_bytes)}"
    return data, None, None


def _read_files(shard: Shard, cfg: SourceConfig, rows: _Rows) -> Iterator[pa.Table | None]:
    if cfg.labels not in ("none", "folder"):
        raise ConfigError(f"--labels {cfg.labels} does not apply to loose image files: use folder or none")
    sizes = shard.sizes if len(shard.sizes) == len(shard.uris) else (None,) * len(shard.uris)
    window = _PREFETCH if storage.protocol_of(shard.uris[0]) != "file" else 4
    items = zip(shard.uris, sizes, strict=True)
    fetched = _ordered_map(lambda item: _fetch(item[0], item[1], cfg.max_bytes), items, window)
    for uri, rel, (data, kind, message) in zip(shard.uris, shard.rels, fetched, strict=True):
        label = _folder_label(rel) if cfg.labels == "folder" else None
        yield rows.add(rel, uri, label, data, kind, message)


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
