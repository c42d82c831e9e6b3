"""Manifest sources: a CSV or Parquet file that names the objects to read, so a bucket is never listed.

A manifest is a CSV (with a header row; ``.csv``, ``.tsv``, optionally gzipped) or a Parquet file
(``--format manifest``) with one object per row: a URI column (``uri``, ``url``, ``path``... or
``source.uri_column``, or ``bucket`` + ``key`` columns), and optionally an id column (``source.id_column``),
a label column (``--labels NAME``), a size and a version column (a content checksum such as ``sha256``, or an
ETag or a modification time: they make a changed object a changed shard).
An S3 Inventory report is read directly from its ``manifest.json`` (CSV or Parquet data files; the
inventory's keys are URL-decoded, delete markers and non-current versions are skipped) and its ids are
relative to the inventoried bucket.

Rows are read in batches and cut into shards as they stream by (`shards.Chunker`), in the manifest's
order: ids are the id column, else the URI relative to ``source.root`` (else the full URI).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import unquote_plus

import pyarrow as pa

from pipeline import storage
from pipeline.config import IMAGE_EXTENSIONS, ConfigError, SourceConfig
from pipeline.sources.shards import Chunker, Layout, Member, Shard, as_text, chunk_shard, folder_label

CSV_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz")
URI_COLUMNS = ("uri", "url", "path", "s3_uri", "location", "image_uri", "image_url", "file")
SIZE_COLUMNS = ("size", "bytes", "content_length")
# what makes a changed object a changed shard, best first: a checksum of the content (what `rsync --checksum`
# compares: an edit that keeps the size and mtime still shows), then an ETag, then a modification time
VERSION_COLUMNS = ("sha256", "sha1", "md5", "checksum", "content_md5", "checksum_sha256", "checksum_crc32c",
                   "crc32c", "e_tag", "etag", "last_modified_date", "lastmodifieddate", "last_modified",
                   "mtime", "version")
_BATCH_ROWS = 65536


def is_manifest(cfg: SourceConfig) -> bool:
    """--format manifest, or --format auto with a CSV/TSV file or an S3 Inventory manifest.json."""
    if cfg.format == "manifest":
        return True
    name = cfg.uri.lower().rstrip("/")
    return cfg.format == "auto" and (name.endswith(CSV_SUFFIXES) or name.endswith("manifest.json"))


def _inventory(uri: str) -> dict:
    try:
        doc = json.loads(storage.read_bytes(uri))
    except ValueError as e:
        raise ConfigError(f"'{uri}' is not an S3 Inventory manifest.json ({e}): check --source") from None
    missing = [k for k in ("sourceBucket", "destinationBucket", "fileFormat", "files") if k not in doc]
    if missing:
        raise ConfigError(f"'{uri}' lacks {', '.join(missing)}: it is not an S3 Inventory manifest.json; "
                          "pass a CSV or Parquet manifest with --format manifest")
    return doc


def inventory_root(uri: str) -> str:
    """The root ids are relative to when a manifest has no source.root: the inventoried bucket of an S3
    Inventory report; '' (ids are full URIs) for any other manifest."""
    if not uri.lower().rstrip("/").endswith("manifest.json"):
        return ""
    return f"s3://{_inventory(uri)['sourceBucket']}/"


@dataclass
class _Columns:
    """Which manifest columns hold what."""

    uri: str | None = None
    bucket: str | None = None
    key: str | None = None
    id: str | None = None
    label: str | None = None
    size: str | None = None
    version: str | None = None
    latest: str | None = None
    delete_marker: str | None = None
    url_encoded: bool = False


def _pick(names: list[str], wanted: tuple[str, ...]) -> str | None:
    lower = {n.lower(): n for n in names}
    return next((lower[w] for w in wanted if w in lower), None)


def _columns(names: list[str], cfg: SourceConfig, where: str) -> _Columns:
    cols = _Columns(size=_pick(names, SIZE_COLUMNS), version=_pick(names, VERSION_COLUMNS),
                    latest=_pick(names, ("is_latest", "islatest")),
                    delete_marker=_pick(names, ("is_delete_marker", "isdeletemarker")))
    listed = ", ".join(names)
    if cfg.uri_column:
        if cfg.uri_column not in names:
            raise ConfigError(f"column '{cfg.uri_column}' (source.uri_column) not found in {where}; columns: "
                              f"{listed}. Set source.uri_column to the column of object URIs")
        cols.uri = cfg.uri_column
    else:
        cols.uri = _pick(names, URI_COLUMNS)
        if cols.uri is None:
            cols.bucket, cols.key = _pick(names, ("bucket",)), _pick(names, ("key",))
            if not (cols.bucket and cols.key):
                raise ConfigError(
                    f"no column of object URIs in {where} (looked for {', '.join(URI_COLUMNS)}, or bucket "
                    f"and key); columns: {listed}. Set source.uri_column (--set source.uri_column=NAME)")
    for attr, name, key in (("id", cfg.id_column, "source.id_column"),
                            ("label", None if cfg.labels in ("none", "folder") else cfg.labels,
                             "source.labels")):
        if name:
            if name not in names:
                raise ConfigError(f"column '{name}' ({key}) not found in {where}; columns: {listed}. Pass an "
                                  f"existing column, or unset {key}")
            setattr(cols, attr, name)
    return cols


def _csv_batches(uri: str, names: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Batches of a CSV/TSV (gzip by suffix) with every column as strings; ``names``: a headerless file."""
    import pyarrow.csv as pacsv

    delimiter = "\t" if ".tsv" in uri.lower() else ","

    def open_reader(types: dict[str, pa.DataType] | None):
        f = storage.open_input(uri)
        stream = gzip.GzipFile(fileobj=f) if uri.lower().endswith(".gz") else f
        read = pacsv.ReadOptions(column_names=names, block_size=1 << 22)
        convert = pacsv.ConvertOptions(column_types=types or {}, strings_can_be_null=False)
        return f, pacsv.open_csv(stream, read_options=read, parse_options=pacsv.ParseOptions(
            delimiter=delimiter), convert_options=convert)

    try:
        f, reader = open_reader(None)
        columns = names or reader.schema.names
        f.close()
        f, reader = open_reader({c: pa.string() for c in columns})
    except pa.ArrowInvalid as e:
        raise ConfigError(f"cannot read the manifest '{uri}' as CSV: {str(e).splitlines()[0]}") from None
    with f:
        yield from reader


def _parquet_batches(uri: str) -> Iterator[pa.RecordBatch]:
    import pyarrow.parquet as pq

    with storage.open_input(uri) as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # noqa: BLE001 - reported with the file it concerns
            raise ConfigError(f"cannot read the manifest '{uri}' as Parquet: {type(e).__name__}: {e}") from e
        yield from pf.iter_batches(batch_size=_BATCH_ROWS)


def _sources(cfg: SourceConfig) -> Iterator[tuple[str, Iterator[pa.RecordBatch], bool]]:
    """(where, batches, url-encoded keys) for each data file of the manifest."""
    uri = cfg.uri
    if uri.lower().rstrip("/").endswith("manifest.json"):
        doc = _inventory(uri)
        fmt = str(doc["fileFormat"]).lower()
        bucket = str(doc["destinationBucket"]).split(":::")[-1]
        names = [c.strip() for c in str(doc.get("fileSchema", "")).split(",")] if fmt == "csv" else None
        if fmt not in ("csv", "parquet"):
            raise ConfigError(f"S3 Inventory format '{doc['fileFormat']}' of '{uri}' is not read here: "
                              "configure the inventory report as CSV or Parquet")
        for entry in doc["files"]:
            data = f"s3://{bucket}/{entry['key']}"
            batches = _csv_batches(data, names) if fmt == "csv" else _parquet_batches(data)
            yield data, batches, fmt == "csv"
    elif uri.lower().endswith(CSV_SUFFIXES):
        yield uri, _csv_batches(uri), False
    else:
        yield uri, _parquet_batches(uri), False


def _text(batch: pa.RecordBatch, name: str | None) -> list[str | None] | None:
    return None if name is None else as_text(batch.column(batch.schema.get_field_index(name)))


def list_manifest(cfg: SourceConfig, layout: Layout) -> tuple[list[Shard], int]:
    """(shards, skipped) of a manifest: its rows cut into shards as they stream by; rows that name no image
    (another extension, a delete marker, an older version, a repeated row) are skipped."""
    root = storage.join(layout.root, "") if layout.root else ""
    chunker = Chunker(cfg.files_per_shard, layout.depth, lambda ms: chunk_shard(ms, layout.root, "manifest"))
    shards, skipped, rows = [], 0, 0
    for where, batches, encoded in _sources(cfg):
        cols = None
        for batch in batches:
            if cols is None:
                cols = _columns(batch.schema.names, cfg, f"'{where}'")
            n = batch.num_rows
            rows += n
            uris = _text(batch, cols.uri)
            if uris is None:
                buckets, keys = _text(batch, cols.bucket), _text(batch, cols.key)
                uris = [f"s3://{b}/{unquote_plus(k) if encoded else k}" if b and k else None
                        for b, k in zip(buckets, keys, strict=True)]
            ids, labels = _text(batch, cols.id), _text(batch, cols.label)
            sizes, versions = _text(batch, cols.size), _text(batch, cols.version)
            latest, deleted = _text(batch, cols.latest), _text(batch, cols.delete_marker)
            for i in range(n):
                uri = uris[i]
                if (not uri or not uri.lower().endswith(IMAGE_EXTENSIONS)
                        or (latest and str(latest[i]).lower() == "false")
                        or (deleted and str(deleted[i]).lower() == "true")):
                    skipped += 1
                    continue
                if ids and ids[i]:
                    rel = ids[i]
                elif root and uri.startswith(root):
                    rel = uri[len(root):]
                else:
                    rel = uri
                label = labels[i] if labels else (folder_label(uri) if cfg.labels == "folder" else None)
                size = int(sizes[i]) if sizes and sizes[i] and str(sizes[i]).isdigit() else 0
                version = versions[i] if versions and versions[i] else ""
                shards += chunker.add(Member(rel, size, version, uri, label))
    shards += chunker.close()
    skipped += chunker.repeated
    if not shards:
        raise ConfigError(f"the manifest '{cfg.uri}' names no images ({', '.join(IMAGE_EXTENSIONS)}) among "
                          f"its {rows} rows: check --source and the URI column (source.uri_column)")
    return shards, skipped
