"""One storage layer: every read and write of the project goes through here.

URIs: local paths, ``file://``, ``s3://`` (s3fs; endpoint and credentials from the standard AWS environment
variables), and any other fsspec protocol that is installed (``gs://`` with gcsfs, ``memory://``...).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import re
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec


class StorageError(ValueError):
    """A URI that cannot be reached, read or written; the message names the fix."""


class StorageFault(OSError):
    """A fault of the machine, not of the input: the disk is full, a quota is exceeded, an I/O error. Not
    a ValueError, so the CLI reports it as a failed run (exit 1) to rerun once it is fixed."""


# errno values that mean the machine failed the write, whatever the URI or the configuration
_FAULTS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
           errno.EIO: "input/output error", errno.EFBIG: "file too large for the file system"}


@dataclass(frozen=True)
class FileInfo:
    """One file found under a prefix."""

    uri: str  # full URI, usable with read_bytes()
    rel: str  # path relative to the listed root, '/'-separated
    size: int
    version: str  # etag or mtime: changes when the object changes


def _s3_options() -> dict[str, Any]:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    # Throttling (503 SlowDown) and dropped connections are retried with backoff, as object storage
    # under load needs.
    opts: dict[str, Any] = {"use_listings_cache": False,
                            "config_kwargs": {"retries": {"max_attempts": 10, "mode": "standard"}}}
    client_kwargs: dict[str, Any] = {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    return opts


_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@\s?#'\"]*@)?"
                  r"(?P<rest>[^\s?#'\"]*)(?P<query>\?[^\s#'\"]*)?")


def _redact_match(m: re.Match) -> str:
    user = "<redacted>@" if m["user"] else ""
    return m["scheme"] + user + m["rest"] + ("?<redacted>" if m["query"] else "")


def redact(value: Any) -> Any:
    """``value`` with the secrets a URI can carry taken out of every URI in it: the userinfo
    (``user:password@``) and the query string (a presigned URL's ``X-Amz-Signature=...``). Strings are
    searched (an error message may quote a URI); dicts, lists and tuples are walked; the rest is returned
    as it is. Everything the project records or prints goes through it."""
    if isinstance(value, str):
        return _URL.sub(_redact_match, value) if "://" in value else value
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def is_utf8(text: str | None) -> bool:
    if text is None:
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable_name(text: str | None) -> str | None:
    """A file name as valid UTF-8: the raw bytes a name that is not UTF-8 carries (as surrogate escapes)
    shown as \\xNN."""
    if text is None or is_utf8(text):
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def protocol_of(uri: str) -> str:
    """'s3', 'file', 'gs', ... for a URI; a plain path is 'file'."""
    if "://" not in uri:
        return "file"
    return uri.split("://", 1)[0].lower()


def get_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and path inside it for a URI."""
    proto = protocol_of(uri)
    if proto == "file":
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))
    if proto in ("s3", "s3a"):
        try:
            import s3fs
        except ImportError as e:  # pragma: no cover - s3fs is a dependency
            raise StorageError("s3:// needs s3fs: pip install s3fs") from e
        fs = s3fs.S3FileSystem(**_s3_options())
        return fs, uri.split("://", 1)[1].rstrip("/")
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:
        raise StorageError(
            f"cannot open '{uri}': unknown or uninstalled storage protocol '{proto}'. Use a local path, "
            f"file://, s3://, or install the fsspec backend for '{proto}' ({e})"
        ) from e
    return fs, path.rstrip("/")


def _to_uri(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    proto = protocol_of(like)
    if proto == "file":
        return path
    return f"{like.split('://', 1)[0]}://{path}"


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI (or local path)."""
    if protocol_of(uri) == "file" and "://" not in uri:
        return os.path.join(uri, *parts)
    return posixpath.join(uri.rstrip("/"), *parts)


def explain(uri: str, err: BaseException) -> StorageError | StorageFault:
    """Turn a filesystem/botocore error into a StorageError that names the fix, or a StorageFault when
    the machine failed (disk full, quota, I/O error)."""
    if isinstance(err, (StorageError, StorageFault)):
        return err
    if isinstance(err, OSError) and err.errno in _FAULTS:
        return StorageFault(err.errno, f"storage fault at '{uri}': {_FAULTS[err.errno]}; fix it (free space, "
                            "raise the quota, check the disk) and rerun the same command: it resumes")
    name = type(err).__name__
    text = str(err)
    if "NoCredentials" in name or "Unable to locate credentials" in text:
        return StorageError(
            f"no AWS credentials for '{uri}': set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE, "
            "or run where an instance profile applies); set AWS_ENDPOINT_URL for a non-AWS S3 server"
        )
    if isinstance(err, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return StorageError(f"access denied to '{uri}': check the credentials' permissions for it ({name})")
    if isinstance(err, FileNotFoundError) or "NoSuchBucket" in text:
        return StorageError(f"'{uri}' does not exist: check the path or bucket name")
    if "Could not connect" in text or "ConnectionRefused" in name or "EndpointConnectionError" in name:
        return StorageError(
            f"cannot reach the storage for '{uri}' ({text.splitlines()[0] if text else name}): check "
            "AWS_ENDPOINT_URL and the network"
        )
    return StorageError(f"cannot access '{uri}': {name}: {text.splitlines()[0] if text else ''}")


def exists(uri: str) -> bool:
    fs, path = get_fs(uri)
    try:
        return bool(fs.exists(path))
    except Exception as e:  # noqa: BLE001 - translated into a StorageError with the fix
        raise explain(uri, e) from e


def isdir(uri: str) -> bool:
    fs, path = get_fs(uri)
    try:
        return bool(fs.isdir(path))
    except Exception as e:  # noqa: BLE001
        raise explain(uri, e) from e


def _version(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "mtime", "LastModified", "created"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return ""


HIDDEN = (".", "_")  # the names Parquet readers skip: an output's own files (_ledger/, _runs/...)


def list_files(uri: str, hidden: tuple[str, ...] = HIDDEN) -> list[FileInfo]:
    """Every file under a prefix (recursively), sorted by relative path; a file URI lists itself.

    Files and folders whose name starts with one of ``hidden`` are skipped ('.' and '_' by default, as
    Parquet readers do).
    """
    fs, root = get_fs(uri)
    try:
        fs.invalidate_cache(root)  # other processes may have written since this one last listed
        if fs.isfile(root):
            info = fs.info(root)
            return [FileInfo(uri, posixpath.basename(root), int(info.get("size") or 0), _version(info))]
        found = fs.find(root, detail=True, withdirs=False)
    except Exception as e:  # noqa: BLE001
        raise explain(uri, e) from e
    out = []
    prefix = root.rstrip("/") + "/"
    for path, info in found.items():
        if info.get("type") == "directory" or not path.startswith(prefix):
            continue
        rel = path[len(prefix):].replace(os.sep, "/")
        if any(part.startswith(hidden) for part in rel.split("/")):
            continue
        out.append(FileInfo(_to_uri(fs, path, uri), rel, int(info.get("size") or 0), _version(info)))
    out.sort(key=lambda f: f.rel)
    return out


def _entries(fs: fsspec.AbstractFileSystem, path: str,
             hidden: tuple[str, ...] = HIDDEN) -> list[tuple[str, str, bool, dict[str, Any]]]:
    """One folder's visible entries (sort key, path, is_dir, info), in the order of their full paths."""
    try:
        found = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    out = []
    for info in found:
        name = str(info["name"]).rstrip("/")
        base = name.rsplit("/", 1)[-1]
        if name == path.rstrip("/") or base.startswith(hidden):
            continue
        is_dir = info.get("type") == "directory"
        out.append((base + "/" if is_dir else base, name, is_dir, info))
    out.sort(key=lambda e: e[0])
    return out


def walk_files(uri: str, threads: int = 16, ahead: int = 8,
               hidden: tuple[str, ...] = HIDDEN) -> Iterator[FileInfo]:
    """Every file under a prefix, as `list_files` finds them (sorted by relative path, hidden names
    skipped), streamed: each folder is listed once, up to ``ahead`` sibling folders in parallel ahead of the
    one being read, so only the folders in flight are held in memory; a file URI yields itself."""
    fs, root = get_fs(uri)
    try:
        fs.invalidate_cache(root)
        if fs.isfile(root):
            info = fs.info(root)
            yield FileInfo(uri, posixpath.basename(root), int(info.get("size") or 0), _version(info))
            return
        prefix = root.rstrip("/") + "/"
        with ThreadPoolExecutor(threads) as pool:
            yield from _walk(fs, pool, _entries(fs, root, hidden), prefix, uri, ahead, hidden)
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001
        raise explain(uri, e) from e


def _walk(fs: fsspec.AbstractFileSystem, pool: ThreadPoolExecutor, entries: list[Any], prefix: str,
          like: str, ahead: int, hidden: tuple[str, ...]) -> Iterator[FileInfo]:
    dirs = [e[1] for e in entries if e[2]]
    pending: dict[str, Future] = {}
    submitted = 0
    for _, path, is_dir, info in entries:
        if not is_dir:
            if path.startswith(prefix):
                yield FileInfo(_to_uri(fs, path, like), path[len(prefix):].replace(os.sep, "/"),
                               int(info.get("size") or 0), _version(info))
            continue
        while submitted < len(dirs) and len(pending) < ahead:
            pending[dirs[submitted]] = pool.submit(_entries, fs, dirs[submitted], hidden)
            submitted += 1
        sub = pending.pop(path).result()
        yield from _walk(fs, pool, sub, prefix, like, ahead, hidden)


def read_bytes(uri: str) -> bytes:
    fs, path = get_fs(uri)
    try:
        return fs.cat_file(path)
    except Exception as e:  # noqa: BLE001
        raise explain(uri, e) from e


def open_input(uri: str, mode: str = "rb"):
    """A readable file object (streaming for object storage)."""
    fs, path = get_fs(uri)
    try:
        return fs.open(path, mode)
    except Exception as e:  # noqa: BLE001
        raise explain(uri, e) from e


def write_json(uri: str, obj: Any, **dumps: Any) -> None:
    """``obj`` as JSON (``dumps``: json.dumps options), secrets taken out of its URIs (`redact`)."""
    write_bytes(uri, json.dumps(redact(obj), **dumps).encode())


def makedirs(uri: str) -> None:
    fs, path = get_fs(uri)
    if protocol_of(uri) == "file":
        os.makedirs(path, exist_ok=True)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object atomically: readers see the old object or the complete new one.

    Local files are written under a hidden temporary name and renamed; an object-store PUT is already
    all-or-nothing.
    """
    fs, path = get_fs(uri)
    try:
        if protocol_of(uri) == "file":
            _write_local(path, data, os.replace)
        else:
            fs.pipe_file(path, data)
    except Exception as e:  # noqa: BLE001
        raise explain(uri, e) from e


def _write_local(path: str, data: bytes, place: Any) -> None:
    """Write ``data`` to a hidden temporary file beside ``path``, then put it there with ``place``
    (``os.replace``: over any file; ``os.link``: FileExistsError where one is). The temporary file never
    stays, whether the write succeeds or fails."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        place(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # gone already after os.replace


def create_exclusive(uri: str, data: bytes) -> bool:
    """Write a whole object only where none exists; returns False when one does. Atomic on local disks (a
    hidden temporary file hard-linked into place) and on S3 (a conditional PUT, ``If-None-Match: *``);
    elsewhere, and on an S3 server that does not implement conditional writes, an existence check then a
    write."""
    fs, path = get_fs(uri)
    try:
        if protocol_of(uri) == "file":
            _write_local(path, data, os.link)
        elif protocol_of(uri) in ("s3", "s3a"):
            try:
                fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                raise
            except Exception as e:  # noqa: BLE001 - an S3 server without conditional writes
                if "NotImplemented" not in f"{type(e).__name__} {e}" and "501" not in str(e):
                    raise
                if fs.exists(path):
                    return False
                fs.pipe_file(path, data)
        else:
            if fs.exists(path):
                return False
            fs.pipe_file(path, data)
    except FileExistsError:
        return False
    except Exception as e:  # noqa: BLE001
        raise explain(uri, e) from e
    return True


def move(src: str, dst: str) -> None:
    """Move one file (a rename locally; copy then delete on object storage). Idempotent: when src is gone
    and dst exists, the move already happened."""
    fs, src_path = get_fs(src)
    _, dst_path = get_fs(dst)
    try:
        if protocol_of(src) == "file":
            os.makedirs(os.path.dirname(dst_path), exist_ok=True)
            os.replace(src_path, dst_path)
        else:
            fs.copy(src_path, dst_path)
            fs.rm_file(src_path)
    except FileNotFoundError:
        fs.invalidate_cache(dst_path)
        if not fs.exists(dst_path):
            raise explain(src, FileNotFoundError(src)) from None
    except Exception as e:  # noqa: BLE001
        raise explain(src, e) from e


def remove(uri: str) -> None:
    """Delete one file; a missing file is not an error."""
    fs, path = get_fs(uri)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        return
    except Exception as e:  # noqa: BLE001
        raise explain(uri, e) from e


def copy_tree(src: str, dst: str) -> int:
    """Copy every file under ``src`` (hidden ones included) to the same relative paths under ``dst``;
    returns how many. For small trees (the demo's outputs): each file passes through memory."""
    fs, root = get_fs(src)
    prefix = root.rstrip("/") + "/"
    try:
        fs.invalidate_cache(root)
        paths = [p for p in fs.find(root) if p.startswith(prefix)]
    except Exception as e:  # noqa: BLE001
        raise explain(src, e) from e
    for path in paths:
        write_bytes(join(dst, path[len(prefix):].replace(os.sep, "/")), fs.cat_file(path))
    return len(paths)


def check_writable(uri: str) -> None:
    """Fail early, with the fix, when an output URI cannot be written."""
    probe = join(uri, f"_probe-{uuid.uuid4().hex}")
    write_bytes(probe, b"")
    fs, path = get_fs(probe)
    try:
        fs.rm_file(path)
    except Exception as e:  # noqa: BLE001
        raise explain(uri, e) from e


def remove_tree(uri: str) -> None:
    """Delete a directory/prefix and everything under it."""
    fs, path = get_fs(uri)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        return
    except Exception as e:  # noqa: BLE001
        raise explain(uri, e) from e
