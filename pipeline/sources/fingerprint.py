"""``source.fingerprint: content``: a listed file's version is a hash of its bytes, not its size and mtime
(ETag on object storage). rsync's quick check (size + mtime) misses an in-place edit that kept both (``cp
-p``, ``rsync -a``, a restore; BMP and TIFF sizes depend only on the dimensions); ``--checksum`` reads every
byte. So does this, once per listing, ``threads`` files at a time."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from pipeline import storage
from pipeline.storage import FileInfo

CHUNK = 1 << 20


def content_version(f: FileInfo) -> FileInfo:
    """``f`` with its version replaced by ``sha1:<hex>`` of its bytes (read in 1 MiB pieces); ``f`` as listed
    when it cannot be read (the read task then reports its error row)."""
    h = hashlib.sha1()
    try:
        with storage.open_input(f.uri) as stream:
            while block := stream.read(CHUNK):
                h.update(block)
    except (OSError, ValueError):
        return f
    return FileInfo(f.uri, f.rel, f.size, "sha1:" + h.hexdigest())


def content_versions(files: Iterable[FileInfo], want: Callable[[FileInfo], bool], threads: int = 16,
                     batch: int = 256) -> Iterator[FileInfo]:
    """The files in their order, those ``want`` picks hashed by `content_version` (``batch`` in flight)."""
    def one(f: FileInfo) -> FileInfo:
        return content_version(f) if want(f) else f

    with ThreadPoolExecutor(threads) as pool:
        pending: list[FileInfo] = []
        for f in files:
            pending.append(f)
            if len(pending) >= batch:
                yield from pool.map(one, pending)
                pending = []
        yield from pool.map(one, pending)
