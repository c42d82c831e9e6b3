"""The shard and the row: what every format lists and reads, and nothing format-specific.

A `Shard` is one work unit (a chunk of loose files or manifest rows, or one WebDataset or Parquet file);
`Member` one loose file of a chunk. Loose files are cut into shards by their paths, not their positions
(content-defined chunking, `Chunker`): adding or removing one file changes the one shard that holds it (two
when it ends a shard), so an incremental run redoes what changed and nothing else. Ids are relative to the
source root (`Layout`), so runs over different prefixes of one root (one per night) accumulate into one
output. Readers emit rows of ``ROW_SCHEMA`` through a `RowBatcher`; a bad file, member or cell is a row with
an error kind, never an exception that stops the read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import pyarrow as pa

from pipeline import storage
from pipeline.storage import FileInfo, is_utf8, printable_name

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


# How loose files are cut into shards; recorded with an output, which refuses shards cut another way.
SHARDING = "content-defined-1"



# Shards of loose files (listed, or the rows of a manifest): counted by files, cut into chunks.
LOOSE_FORMATS = ("files", "manifest")


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

    @property
    def loose(self) -> bool:
        """A chunk of loose files (listed, or a manifest's rows), counted by files."""
        return self.format in LOOSE_FORMATS

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


def sanitize(text: str, limit: int = 80) -> str:
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
    return Shard(key=f"{sanitize(rels[0])}-{_short_hash('files', *rels)}", format=fmt,
                 size=sum(m.size for m in members), version=_version_of(members), members=members, base=base)


def file_shard(fmt: str, members: list[FileInfo]) -> Shard:
    """The shard of listed files, as they are (one WebDataset or Parquet file, or a sample's files)."""
    rels = tuple(f.rel for f in members)
    return Shard(key=f"{sanitize(rels[0])}-{_short_hash(fmt, *rels)}", format=fmt,
                 size=sum(f.size for f in members),
                 version=_version_of(Member(f.rel, f.size, f.version) for f in members),
                 members=[Member(f.rel, f.size, f.version, f.uri) for f in members])



# --------------------------------------------------------------------------------------------------
# Rows: what every reader emits

_MAX_BATCH_BYTES = 64 << 20  # a batch is also cut when its encoded bytes reach this



class RowBatcher:
    """Accumulates rows of one shard; emits ROW_SCHEMA tables of at most `limit` rows (or ~64 MiB)."""

    def __init__(self, shard: Shard, limit: int) -> None:
        self.shard = shard
        self.limit = max(1, int(limit))
        self.next_row = 0
        self._cols: dict[str, list[Any]] = {n: [] for n in ROW_SCHEMA.names}
        self._bytes = 0

    def add(self, id_: str, source: str, label: str | None = None, data: bytes | None = None,
            kind: str | None = None, message: str | None = None) -> pa.Table | None:
        """Add one row; returns a full batch when one is ready. A name that is not valid UTF-8 (a file
        system's raw bytes) cannot be an id: it becomes an ``unsafe_name`` error row under a printable
        form of the name, and its bytes are not kept."""
        if not (is_utf8(id_) and is_utf8(source)):
            id_, source = printable_name(id_), printable_name(source)
            data, label, kind = None, None, "unsafe_name"
            message = "file name is not valid UTF-8 (shown with \\x escapes); rename it to read it"
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


def error_text(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def too_large(size: int, max_bytes: int) -> str:
    return f"{size} bytes, above the limit of {max_bytes} (source.max_bytes)"


def folder_label(path: str) -> str | None:
    """The parent folder's name of a relative path or a URI (ImageFolder labels); None at the top."""
    parts = path.split("://", 1)[-1].split("/")
    return parts[-2] if len(parts) > 1 and parts[-2] else None


def as_text(col: pa.ChunkedArray | pa.Array) -> list[str | None]:
    """A column of strings, integers, booleans or dictionary-encoded text as Python strings."""
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = col.cast(pa.string())
    return col.to_pylist()

