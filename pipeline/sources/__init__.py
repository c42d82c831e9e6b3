"""Sources: list the work units (shards) of a source on the driver, and read rows from one shard on a worker.

Four kinds of input, one module each: loose image files under a prefix (`files`, cut into chunks), a
manifest that names the objects (`manifest`: CSV or Parquet of URIs, S3 Inventory reports), WebDataset
tars (`webdataset`), Parquet files with image bytes (`parquet`). `FORMATS` is the one table that says how
each is found when listing a prefix, checked on the driver and read on a worker; what every format shares
(the row schema, `Shard`, `Layout`, chunking, the row batcher) is in `shards`, which imports no sibling.
Rows carry the encoded bytes (decoding happens in the Embedder) or an error kind; a bad file, member or cell
is a row with an error, never an exception that stops the read. Every read goes through ``storage``.

A new format: a module here with its ``EXTENSIONS`` (when a prefix is listed), a reader
``read_<format>(shard, cfg, rows)`` that adds rows to a `RowBatcher`, optionally a driver-side ``check``,
and one entry in `FORMATS`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa

from pipeline import storage
from pipeline.config import IMAGE_EXTENSIONS, ConfigError, SourceConfig
from pipeline.sources import files, manifest, parquet, webdataset
from pipeline.sources.fingerprint import content_versions
from pipeline.sources.parquet import resolve_image_column
from pipeline.sources.shards import (
    LOOSE_FORMATS,
    ROW_SCHEMA,
    SHARDING,
    Chunker,
    Layout,
    Member,
    RowBatcher,
    Shard,
    chunk_shard,
    file_shard,
    relative_to,
    rows_from_bytes,
)
from pipeline.storage import FileInfo

__all__ = ["FORMATS", "LOOSE_FORMATS", "ROW_SCHEMA", "SHARDING", "Chunker", "Layout", "Member", "Shard",
           "check_source", "chunk_shard", "detect_format", "layout_of", "list_shards", "read_shard",
           "resolve_image_column", "rows_from_bytes", "sample_shards"]


@dataclass(frozen=True)
class Format:
    """How one kind of source is found, checked on the driver and read on a worker."""

    extensions: tuple[str, ...]  # the files of this format when a prefix is listed (none: named by --format)
    read: Callable[[Shard, SourceConfig, RowBatcher], Iterator[pa.Table | None]]
    check: Callable[[SourceConfig, Shard], None] | None = None  # the first shard, before any work


FORMATS: dict[str, Format] = {
    "files": Format(files.EXTENSIONS, files.read_files),
    "webdataset": Format(webdataset.EXTENSIONS, webdataset.read_webdataset),
    "parquet": Format(parquet.EXTENSIONS, parquet.read_parquet, parquet.check),
    "manifest": Format((), files.read_files),  # the objects a manifest names are loose files
}
LISTED = tuple(k for k, f in FORMATS.items() if f.extensions)  # the formats a listed prefix may hold
# A source lists every name but hidden ones ('.'): '_MG_0002.jpg' and '_archive/' are a camera's and a
# person's names. Only the names other writers keep their markers and unfinished files under are left out.
WRITER_NAMES = frozenset({"_SUCCESS", "_metadata", "_common_metadata", "_temporary", "_delta_log",
                          "_spark_metadata"})

_FORMAT_FLAG = "pass --format files|webdataset|parquet|manifest (or set source.format)"


def _kind_of(rel: str) -> str | None:
    name = rel.lower()
    return next((k for k in LISTED if name.endswith(FORMATS[k].extensions)), None)


def _describe_counts(counts: dict[str, int]) -> str:
    names = {"files": "image files", "webdataset": "WebDataset .tar shards", "parquet": "Parquet files"}
    return ", ".join(f"{n} {names[k]}" for k, n in counts.items() if n)


def _format_from_counts(counts: dict[str, int], n_files: int) -> str:
    present = [k for k, n in counts.items() if n]
    if not present:
        raise ConfigError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}), WebDataset .tar or Parquet files among {n_files} "
            "files: check --source / --format"
        )
    if len(present) > 1:
        raise ConfigError(
            f"the source mixes formats ({_describe_counts(counts)}): {_FORMAT_FLAG} to choose one, or point "
            "--source at a prefix that holds only one kind"
        )
    return present[0]


def detect_format(files: list[FileInfo]) -> str:
    """files | webdataset | parquet from the file extensions; ConfigError when none or several are present."""
    counts = {k: 0 for k in LISTED}
    for f in files:
        kind = _kind_of(f.rel)
        if kind:
            counts[kind] += 1
    return _format_from_counts(counts, len(files))



def layout_of(cfg: SourceConfig, recorded_depth: int | None = None) -> Layout:
    """The layout of a run: root from source.root (default: the source itself, or the bucket of an S3
    Inventory report), the prefix it reads, and the folder depth shards may not span (source.split_depth,
    else the depth the output recorded, else the depth of the prefix)."""
    if manifest.is_manifest(cfg):
        root = cfg.root if cfg.root is not None else manifest.inventory_root(cfg.uri)
        depth = cfg.split_depth if cfg.split_depth is not None else (recorded_depth or 0)
        return Layout(root=root, prefix="", depth=depth)
    root = cfg.root if cfg.root is not None else cfg.uri
    rel = relative_to(cfg.uri, root)
    if rel is None:
        raise ConfigError(f"source.uri '{cfg.uri}' is not under source.root '{root}': set source.root "
                          "(--root) to a folder that holds the source, or drop it")
    prefix = rel.strip("/") + "/" if rel.strip("/") else ""
    levels = prefix.count("/")
    depth = cfg.split_depth if cfg.split_depth is not None else (
        recorded_depth if recorded_depth is not None else levels)
    if levels > depth:
        raise ConfigError(
            f"source.uri is {levels} folders below source.root, but this output's shards may span folders "
            f"below depth {depth} (source.split_depth): read a folder at most {depth} levels below the root, "
            "or pass --overwrite with --set source.split_depth=N to rebuild the output")
    return Layout(root=root, prefix=prefix, depth=depth)



def list_shards(cfg: SourceConfig, depth: int | None = None) -> tuple[list[Shard], int]:
    """(shards, skipped): the work units under cfg.uri (or named by a manifest), and how many listed files
    are not inputs. ``depth``: the folder depth the output recorded (see `layout_of`).

    Lists only; reads no image bytes unless ``source.fingerprint`` is ``content`` (then each input file is
    hashed as it is listed). A source may be a prefix, a single file, or a manifest. The listing streams:
    folders are listed in parallel and cut into shards as they arrive.
    """
    layout = layout_of(cfg, depth)
    if manifest.is_manifest(cfg):
        if cfg.fingerprint == "content":
            raise ConfigError("source.fingerprint=content hashes listed files; a manifest's checksum column "
                              "(sha256, md5, checksum, ...) is its content fingerprint: add one to the "
                              "manifest and drop source.fingerprint")
        return manifest.list_manifest(cfg, layout)
    if layout.prefix and not storage.isdir(cfg.uri):
        raise ConfigError(f"source '{cfg.uri}' is not a folder under source.root: point --source at a folder "
                          "(or drop source.root to read a single file)")
    counts = {k: 0 for k in LISTED}
    found: dict[str, list[Shard]] = {k: [] for k in LISTED}
    chunker = Chunker(cfg.files_per_shard, layout.depth, lambda ms: chunk_shard(ms, layout.root))
    n_files = 0
    files = storage.walk_files(cfg.uri, hidden=(".",))
    if cfg.fingerprint == "content":  # an edit that kept the size and the mtime still counts
        files = content_versions(files, lambda f: cfg.format in ("auto", _kind_of(f.rel)) and _kind_of(f.rel)
                                 is not None and not WRITER_NAMES.intersection(f.rel.split("/")))
    for f in files:
        if WRITER_NAMES.intersection(f.rel.split("/")):
            continue
        n_files += 1
        kind = _kind_of(f.rel)
        if kind is None:
            continue
        counts[kind] += 1
        if cfg.format not in ("auto", kind):
            continue
        rel = layout.prefix + f.rel
        if kind == "files":
            found[kind] += chunker.add(Member(rel, f.size, f.version, f.uri))
        else:
            found[kind].append(file_shard(kind, [FileInfo(f.uri, rel, f.size, f.version)]))
    found["files"] += chunker.close()
    if not n_files:
        if not storage.exists(cfg.uri):
            raise ConfigError(f"source '{cfg.uri}' does not exist: check --source")
        raise ConfigError(f"no images/shards found under {cfg.uri} (it is empty): check --source / --format")
    fmt = _format_from_counts(counts, n_files) if cfg.format == "auto" else cfg.format
    if not found[fmt]:
        found_text = _describe_counts(counts) or "none of them images or shards"
        raise ConfigError(
            f"no images/shards found under {cfg.uri} for format '{fmt}' ({n_files} files: {found_text}): "
            "check --source / --format"
        )
    return found[fmt], n_files - counts[fmt]


def sample_shards(shards: list[Shard], n: int, files_per_shard: int) -> list[Shard] | None:
    """At most n loose files, chosen by a hash of their path (deterministic, spread over all folders),
    regrouped into shards; None for shard formats (tar, Parquet), which the caller limits by rows."""
    if not shards or not shards[0].loose:
        return None
    if sum(s.count for s in shards) <= n:
        return shards
    members = [m for s in shards for m in s.members()]
    chosen = sorted(members, key=lambda m: hashlib.sha1(m.rel.encode("utf-8", "surrogatepass")).digest())[:n]
    chosen.sort(key=lambda m: m.rel)
    return [chunk_shard(chosen[i:i + files_per_shard], "", shards[0].format)
            for i in range(0, n, files_per_shard)]



def check_source(cfg: SourceConfig, shards: list[Shard]) -> None:
    """Cheap driver-side validation before any work; ConfigError naming the flag or key to set."""
    if not shards:
        return
    fmt = shards[0].format
    if fmt == "manifest":  # its columns were checked when it was read
        return
    if fmt != "parquet":
        for key, value in (("image_column", cfg.image_column), ("id_column", cfg.id_column)):
            if value:
                raise ConfigError(
                    f"source.{key}='{value}' only applies to Parquet sources, but this source is '{fmt}': "
                    f"remove source.{key} or {_FORMAT_FLAG}"
                )
    if fmt == "files" and cfg.labels not in ("none", "folder"):
        raise ConfigError(
            f"--labels {cfg.labels} names a Parquet column or WebDataset member; loose image files take "
            "--labels folder (the parent folder name) or --labels none"
        )
    check = FORMATS[fmt].check
    if check is not None:
        check(cfg, shards[0])


def read_shard(shard: Shard, cfg: SourceConfig, rows_per_batch: int = 64) -> Iterator[pa.Table]:
    """Rows of one shard as ROW_SCHEMA tables of at most rows_per_batch rows, streamed (bounded memory)."""
    if shard.format not in FORMATS:
        raise ConfigError(f"unknown shard format '{shard.format}': {_FORMAT_FLAG}")
    rows = RowBatcher(shard, rows_per_batch)
    for table in FORMATS[shard.format].read(shard, cfg, rows):
        if table is not None:
            yield table
    last = rows.flush()
    if last is not None:
        yield last
