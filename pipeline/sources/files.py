"""Loose image files: a chunk of files under a prefix (or the objects a manifest names), read with a few
fetches in flight (object storage is latency bound), in path order."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from pipeline import storage
from pipeline.config import IMAGE_EXTENSIONS, ConfigError, SourceConfig
from pipeline.sources.shards import RowBatcher, Shard, error_text, folder_label, too_large
from pipeline.storage import StorageError

EXTENSIONS = IMAGE_EXTENSIONS
_PREFETCH = 8  # loose files fetched concurrently within one shard (object storage is latency bound)



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
        return None, "too_large", f"file is {too_large(listed_size, max_bytes)}; not read"
    try:
        data = storage.read_bytes(uri)
    except (StorageError, OSError) as e:
        gone = isinstance(e, FileNotFoundError) or isinstance(e.__cause__, FileNotFoundError)
        return None, missing if gone else "read_error", error_text(e)
    if len(data) > max_bytes:
        return None, "too_large", f"file is {too_large(len(data), max_bytes)}"
    return data, None, None


def read_files(shard: Shard, cfg: SourceConfig, rows: RowBatcher) -> Iterator[pa.Table | None]:
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
            label = m.label if cfg.labels != "folder" else folder_label(m.uri)
        else:
            label = folder_label(m.rel) if cfg.labels == "folder" else None
        yield rows.add(m.rel, m.uri, label, data, kind, message)

