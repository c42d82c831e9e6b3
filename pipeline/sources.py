"""Sources: list the work units (shards) of a source on the driver, and read rows from one shard on a worker.

Three formats: loose image files (grouped into chunks), WebDataset tars, Parquet files with image bytes.
Rows carry the encoded bytes (decoding happens in the Embedder) or an error kind; a bad file, member or cell
is a row with an error, never an exception that stops the read. Every read goes through ``storage``.

This module holds what the driver plans with: the row schema (`ROW_SCHEMA`, `rows_from_bytes`), `Shard`,
format detection, listing and sampling shards, the Parquet column checks (`check_source`), and `read_shard`,
which a worker calls: it hands the shard to the reader of its format in `pipeline.readers`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from pipeline import storage
from pipeline.config import IMAGE_EXTENSIONS, ConfigError, SourceConfig
from pipeline.storage import FileInfo

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
PARQUET_IMAGE_NAMES = ("image", "img", "image_bytes", "bytes", "jpg", "jpeg", "png", "content")

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


# --------------------------------------------------------------------------------------------------
# Parquet schema helpers (driver validation and worker reads share them)


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
# Worker side: reading rows (the readers are in pipeline.readers)


def read_shard(shard: Shard, cfg: SourceConfig, rows_per_batch: int = 64) -> Iterator[pa.Table]:
    """Rows of one shard as ROW_SCHEMA tables of at most rows_per_batch rows, streamed (bounded memory)."""
    from pipeline.readers import _read_files, _read_parquet, _read_webdataset, _Rows  # imports this module

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
