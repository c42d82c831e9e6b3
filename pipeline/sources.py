"""Sources: list the work units (shards) of a source on the driver, and read rows from one shard on a worker.

Four kinds of input: loose image files under a prefix (cut into chunks), a manifest that names the objects
(CSV or Parquet of URIs, S3 Inventory reports), WebDataset tars, Parquet files with image bytes. Rows carry
the encoded bytes (decoding happens in the Embedder) or an error kind; a bad file, member or cell is a row
with an error, never an exception that stops the read. Every read goes through ``storage``.

Loose files are cut into shards by their paths, not their positions (content-defined chunking, `Chunker`):
adding or removing one file changes the one shard that holds it (two when it ends a shard), so an
incremental run redoes what changed and nothing else. Ids are relative to the source root (`Layout`), so
runs over different prefixes of one root (one per night) accumulate into one output.

This module holds what the driver plans with: the row schema (`ROW_SCHEMA`, `rows_from_bytes`), `Shard`,
`Layout`, format detection, listing (streamed: the driver keeps shards, not files) and sampling shards, the
Parquet column checks (`check_source`), and `read_shard`, which a worker calls: it hands the shard to the
reader of its format in `pipeline.readers`. Manifests are parsed in `pipeline.manifests`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

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
# How loose files are cut into shards; recorded with an output, which refuses shards cut another way.
SHARDING = "content-defined-1"

_FORMAT_FLAG = "pass --format files|webdataset|parquet|manifest (or set source.format)"


class Member(NamedTuple):
    """One loose file (or manifest row) of a chunk."""

    rel: str  # relative to the source root, '/'-separated: the row's id
    size: int  # bytes, as listed (0 when unknown)
    version: str  # etag or mtime ('' when unknown)
    uri: str | None = None  # None: the root joined with rel
    label: str | None = None  # a manifest's label column


class Shard:
    """One work unit: a chunk of loose image files (listed, or rows of a manifest), or one WebDataset or
    Parquet file.

    A chunk's members are held packed (zlib-compressed JSON, a few bytes per file) so that the driver holds
    shards, not files; ``uris``, ``rels``, ``sizes`` and ``labels`` unpack them where a reader needs them.
    """

    __slots__ = ("key", "format", "size", "version", "count", "first", "_base", "_packed")

    def __init__(self, key: str, format: str, uris: Iterable[str] = (), rels: Iterable[str] = (),
                 size: int = 0, version: str = "", sizes: Iterable[int] = (), *,
                 members: list[Member] | None = None, base: str = "") -> None:
        self.key = key  # stable, unique, filesystem-safe; names the output files of this unit
        self.format = format  # files | manifest | webdataset | parquet
        self.size = size  # total bytes
        self.version = version  # changes when any member file changes
        if members is None:
            uris, rels = list(uris), list(rels)
            sizes = list(sizes) or [0] * len(uris)
            members = [Member(r, s, "", u) for u, r, s in zip(uris, rels, sizes, strict=True)]
        prefix = storage.join(base, "") if base else None
        rows = [[m.rel, m.size, None if prefix and m.uri == prefix + m.rel else m.uri, m.label]
                for m in members]
        self.count = len(rows)
        self.first = rows[0][0] if rows else ""
        self._base = prefix or ""
        self._packed = zlib.compress(json.dumps(rows, separators=(",", ":")).encode("utf-8"), 1)

    def __getstate__(self) -> tuple[Any, ...]:
        return tuple(getattr(self, s) for s in self.__slots__)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        for name, value in zip(self.__slots__, state, strict=True):
            object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return f"Shard({self.key!r}, {self.format!r}, {self.count} members, {self.size} bytes)"

    def members(self) -> list[Member]:
        rows = json.loads(zlib.decompress(self._packed))
        return [Member(rel, size, "", uri if uri is not None else self._base + rel, label)
                for rel, size, uri, label in rows]

    @property
    def uris(self) -> tuple[str, ...]:
        return tuple(m.uri for m in self.members())

    @property
    def rels(self) -> tuple[str, ...]:
        return tuple(m.rel for m in self.members())

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(m.size for m in self.members())

    @property
    def labels(self) -> tuple[str | None, ...]:
        return tuple(m.label for m in self.members())


# --------------------------------------------------------------------------------------------------
# Where a run's inputs sit in the output's source


@dataclass(frozen=True)
class Layout:
    """Where a run's inputs sit: ids are relative to ``root``; the run reads ``prefix`` (relative to the
    root: '' for all of it, else a folder path ending in '/'); loose-file shards never span two folders
    ``depth`` levels below the root, so a run over one such folder makes the shards a run over the whole
    root would make there, and its changes (new, changed, removed shards) stay inside it."""

    root: str  # '' for a manifest whose ids are full URIs
    prefix: str
    depth: int


def _path_of(uri: str) -> str:
    if storage.protocol_of(uri) == "file":
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return os.path.abspath(os.path.expanduser(path))
    return uri.rstrip("/")


def relative_to(uri: str, root: str) -> str | None:
    """uri's path below root ('' when equal), None when uri is not under root."""
    if storage.protocol_of(uri) != storage.protocol_of(root):
        return None
    path, base = _path_of(uri), _path_of(root)
    if path == base:
        return ""
    base = base.rstrip("/") + "/"
    return path[len(base):] if path.startswith(base) else None


def layout_of(cfg: SourceConfig, recorded_depth: int | None = None) -> Layout:
    """The layout of a run: root from source.root (default: the source itself, or the bucket of an S3
    Inventory report), the prefix it reads, and the folder depth shards may not span (source.split_depth,
    else the depth the output recorded, else the depth of the prefix)."""
    from pipeline.manifests import inventory_root, is_manifest

    if is_manifest(cfg):
        root = cfg.root if cfg.root is not None else inventory_root(cfg.uri)
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


# --------------------------------------------------------------------------------------------------
# Content-defined chunking of loose files

_SPACE = 1 << 64
_LEVEL_GROWTH = 1.25  # each level of splitting a too-long run cuts at 1.25x as many paths


def _path_hash(rel: str) -> int:
    digest = hashlib.blake2b(rel.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _folder_group(rel: str, depth: int) -> tuple[str, ...]:
    return tuple(rel.split("/")[:-1][:depth]) if depth else ()


def _split(seg: list[tuple[int, Member]], threshold: int, max_files: int,
           out: list[list[tuple[int, Member]]]) -> None:
    """A run longer than max_files is cut after each path whose hash is below a higher threshold, level by
    level, until every piece fits: which pieces form depends on the paths in the run only."""
    if len(seg) <= max_files:
        out.append(seg)
        return
    t = min(int(threshold * _LEVEL_GROWTH) + 1, _SPACE)
    start = 0
    for i, (h, _) in enumerate(seg):
        if h < t:
            _split(seg[start:i + 1], t, max_files, out)
            start = i + 1
    if start < len(seg):
        _split(seg[start:], t, max_files, out)


class Chunker:
    """Cuts members, arriving in path order, into shards of at most ``max_files``.

    A shard ends after a path whose hash falls in 1/(2 x max_files) of the hash space, or at a change of the
    folders ``depth`` levels below the root; a run longer than max_files between two such cuts is split by
    the same rule at growing thresholds. Boundaries depend on the paths alone, so adding a file changes only
    the shard it joins (about max_files / 2.3 files on average), and removing one the shard it leaves (and
    the next when it ended a shard). Consecutive repeats of a path (a manifest listing an object twice) are
    dropped and counted in ``repeated``.
    """

    def __init__(self, max_files: int, depth: int, make: Callable[[list[Member]], Shard]) -> None:
        self.max_files = max_files
        self.depth = depth
        self.make = make
        self.threshold = _SPACE // (2 * max_files)
        self.repeated = 0
        self._seg: list[tuple[int, Member]] = []
        self._group: tuple[str, ...] | None = None
        self._last: str | None = None

    def add(self, member: Member) -> list[Shard]:
        """Add the next member; returns the shards it completes."""
        if member.rel == self._last:
            self.repeated += 1
            return []
        self._last = member.rel
        out: list[Shard] = []
        group = _folder_group(member.rel, self.depth)
        if self._seg and group != self._group:
            out = self._cut()
        self._group = group
        h = _path_hash(member.rel)
        self._seg.append((h, member))
        if h < self.threshold:
            out += self._cut()
        return out

    def close(self) -> list[Shard]:
        return self._cut()

    def _cut(self) -> list[Shard]:
        seg, self._seg = self._seg, []
        if not seg:
            return []
        pieces: list[list[tuple[int, Member]]] = []
        _split(seg, self.threshold, self.max_files, pieces)
        return [self.make([m for _, m in p]) for p in pieces]


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
    counts = {k: 0 for k in FORMATS}
    for f in files:
        kind = _kind_of(f.rel)
        if kind:
            counts[kind] += 1
    return _format_from_counts(counts, len(files))


def _sanitize(text: str, limit: int = 80) -> str:
    """Filesystem-safe [A-Za-z0-9._-], not hidden (no leading '.' or '_'), at most `limit` characters."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:limit].lstrip("._-")
    return safe or "shard"


def _short_hash(*parts: str) -> str:
    return hashlib.sha1("\n".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:10]


def _version_of(members: Iterable[Member]) -> str:
    text = "\n".join(f"{m.rel}\t{m.size}\t{m.version}" for m in members)
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def chunk_shard(members: list[Member], base: str, fmt: str = "files") -> Shard:
    """The shard of one chunk of loose files (``fmt`` files or manifest): key from the first path and a hash
    of all paths (the same for a listing and a manifest of the same objects), version from sizes and
    etags."""
    rels = [m.rel for m in members]
    return Shard(key=f"{_sanitize(rels[0])}-{_short_hash('files', *rels)}", format=fmt,
                 size=sum(m.size for m in members), version=_version_of(members), members=members, base=base)


def _make_shard(fmt: str, members: list[FileInfo]) -> Shard:
    """The shard of listed files, as they are (one WebDataset or Parquet file, or a sample's files)."""
    rels = tuple(f.rel for f in members)
    return Shard(key=f"{_sanitize(rels[0])}-{_short_hash(fmt, *rels)}", format=fmt,
                 size=sum(f.size for f in members),
                 version=_version_of(Member(f.rel, f.size, f.version) for f in members),
                 members=[Member(f.rel, f.size, f.version, f.uri) for f in members])


def list_shards(cfg: SourceConfig, depth: int | None = None) -> tuple[list[Shard], int]:
    """(shards, skipped): the work units under cfg.uri (or named by a manifest), and how many listed files
    are not inputs. ``depth``: the folder depth the output recorded (see `layout_of`).

    Lists only; never reads image bytes. A source may be a prefix, a single file, or a manifest. The listing
    streams: folders are listed in parallel and cut into shards as they arrive.
    """
    from pipeline.manifests import is_manifest, list_manifest

    layout = layout_of(cfg, depth)
    if is_manifest(cfg):
        return list_manifest(cfg, layout)
    if layout.prefix and not storage.isdir(cfg.uri):
        raise ConfigError(f"source '{cfg.uri}' is not a folder under source.root: point --source at a folder "
                          "(or drop source.root to read a single file)")
    counts = {k: 0 for k in FORMATS}
    found: dict[str, list[Shard]] = {k: [] for k in FORMATS}
    chunker = Chunker(cfg.files_per_shard, layout.depth, lambda ms: chunk_shard(ms, layout.root))
    n_files = 0
    for f in storage.walk_files(cfg.uri):
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
            found[kind].append(_make_shard(kind, [FileInfo(f.uri, rel, f.size, f.version)]))
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
    if not shards or shards[0].format not in ("files", "manifest"):
        return None
    if sum(s.count for s in shards) <= n:
        return shards
    members = [m for s in shards for m in s.members()]
    chosen = sorted(members, key=lambda m: hashlib.sha1(m.rel.encode("utf-8")).hexdigest())[:n]
    chosen.sort(key=lambda m: m.rel)
    return [chunk_shard(chosen[i:i + files_per_shard], "", shards[0].format)
            for i in range(0, n, files_per_shard)]


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
    if fmt == "manifest":  # its columns were checked when it was read
        return
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
    if shard.format in ("files", "manifest"):
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
