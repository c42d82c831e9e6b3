"""WebDataset tar shards: samples are consecutive members sharing a key (``<key>.<ext>``); the best image
member and the label member (``.cls``/``.txt`` or --labels EXT) make one row, streamed from the tar."""

from __future__ import annotations

import re
import tarfile
import zlib
from collections.abc import Iterator

import pyarrow as pa

from pipeline import storage
from pipeline.config import SourceConfig
from pipeline.sources.shards import RowBatcher, Shard, error_text, too_large
from pipeline.storage import StorageError

EXTENSIONS = (".tar", ".tar.gz", ".tgz")
# WebDataset image members, in order of preference when a sample holds several.
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


_MAX_LABEL_BYTES = 1 << 20  # a label member larger than this is ignored



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


def read_webdataset(shard: Shard, cfg: SourceConfig, rows: RowBatcher) -> Iterator[pa.Table | None]:
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
        yield rows.add(f"{rel}/<unreadable>", uri, None, None, "read_error", error_text(e))
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
                            big = too_large(member.size, cfg.max_bytes)
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
                  f"corrupt or truncated tar after {rows.next_row} rows{what}: {error_text(e)}")


def _read_member(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tf.extractfile(member)
    if f is None:  # pragma: no cover - only regular files reach here
        return b""
    return f.read()

