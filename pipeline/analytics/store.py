"""An index folder in storage, and the per-file work of building one (Ray-free; run as one Ray task per
embeddings file by ``pipeline/ray/analytics.py``).

``INDEX/index.faiss`` (the faiss index), ``INDEX/ids.parquet`` (label int64, id string, file string: which
row each label is) and ``INDEX/index.json`` (the embedding spec, the files it holds with their versions and
label ranges, parameters, counts, timings, recall). They are written in that order, so index.json, written
last, only ever names a complete index. One writer at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.analytics import index as ix
from pipeline.analytics.vectors import read_vectors
from pipeline.output.layout import write_parquet

INDEX_FILE = "index.faiss"  # the names of index folders written before their objects were named by generation
IDS_FILE = "ids.parquet"
QUERIES_FILE = "recall_queries.parquet"  # held-out queries (label, vector) for recall@10
META_FILE = "index.json"
IDS_SCHEMA = pa.schema([pa.field("label", pa.int64(), nullable=False), ("id", pa.string()),
                        ("file", pa.string())])


# --------------------------------------------------------------------------------------------------
# Per-file work (a Ray task each)


@dataclass
class Sample:
    """Rows drawn from one file: their labels and prepared vectors."""

    labels: np.ndarray
    x: np.ndarray


def _draw(n: int, count: int, seed: int, salt: str) -> np.ndarray:
    """``count`` of ``n`` row positions, sorted, the same for the same (seed, file)."""
    if count >= n:
        return np.arange(n)
    digest = int.from_bytes(hashlib.sha256(salt.encode()).digest()[:8], "little")
    return np.sort(np.random.default_rng([seed, digest]).choice(n, count, replace=False))


def sample_file(uri: str, rel: str, dim: int, metric: str, first_label: int, count: int, seed: int) -> Sample:
    """``count`` vectors of one file (seeded by the file's name), prepared for the index."""
    v = read_vectors(uri, dim)
    pick = _draw(len(v.rows), count, seed, rel)
    return Sample(first_label + v.rows[pick], ix.prepare(v.x[pick], metric))


@dataclass
class FilePart:
    """One file encoded for the index: its labels and ids, the serialized part, and optionally the exact
    nearest neighbours of the held-out queries among its rows and a sample of new queries."""

    rel: str
    labels: np.ndarray
    ids: list[str]
    part: bytes
    truth: ix.TopK | None = None
    sample: Sample | None = None
    seconds: float = 0.0  # the task's time
    truth_s: float = 0.0  # of which finding the exact neighbours (recall measurement, not building)


def encode_file(uri: str, rel: str, dim: int, params: dict[str, Any], first_label: int, count: int, *,
                template: bytes, queries: np.ndarray | None = None, k: int = ix.RECALL_K + 1,
                sample_count: int = 0, seed: int = 0) -> FilePart:
    """Encode one embeddings file of ``count`` rows into an index part: labels ``first_label`` + row number.
    With ``queries``, also their exact k nearest among its rows; with ``sample_count``, a sample of its rows
    as new held-out queries."""
    t0 = time.perf_counter()
    p = ix.IndexParams.from_dict(params)
    v = read_vectors(uri, dim)
    x = ix.prepare(v.x, p.metric)
    labels = first_label + v.rows
    part = ix.encode_part(template, p, x, labels, first_label, count)
    t1 = time.perf_counter()
    truth = ix.exact_topk(queries, x, labels, k) if queries is not None else None
    truth_s = time.perf_counter() - t1
    sample = None
    if sample_count:
        pick = _draw(len(labels), sample_count, seed, rel)
        sample = Sample(labels[pick], x[pick])
    return FilePart(rel, labels, v.ids, part, truth, sample, time.perf_counter() - t0, truth_s)


def truth_file(uri: str, dim: int, metric: str, first_label: int, queries: np.ndarray,
               k: int = ix.RECALL_K + 1) -> ix.TopK:
    """The exact k nearest of each query among one file's rows."""
    v = read_vectors(uri, dim)
    return ix.exact_topk(queries, ix.prepare(v.x, metric), first_label + v.rows, k)


# --------------------------------------------------------------------------------------------------
# The index folder


def read_meta(index_uri: str) -> dict[str, Any]:
    """index.json of an index folder; ValueError naming `index build` when there is none."""
    uri = storage.join(index_uri, META_FILE)
    if not storage.exists(uri):
        raise ValueError(f"no index at '{index_uri}' (no {META_FILE}): build one with `pipeline index build "
                         f"--embeddings URI --output {index_uri}`")
    return json.loads(storage.read_bytes(uri))


def ids_table(labels: list[np.ndarray], ids: list[list[str]], files: list[str]) -> pa.Table:
    """The id map rows of some files' parts."""
    n = [len(x) for x in labels]
    return pa.Table.from_arrays(
        [pa.array(np.concatenate(labels) if labels else np.zeros(0, np.int64), pa.int64()),
         pa.array([i for part in ids for i in part], pa.string()),
         pa.array([f for f, c in zip(files, n) for _ in range(c)], pa.string())], schema=IDS_SCHEMA)


def objects(meta: dict[str, Any] | None) -> dict[str, str]:
    """The files of an index's generation as index.json names them: ``index`` (faiss), ``ids`` (label ->
    id), ``queries`` (held-out recall queries); the fixed names for folders written before."""
    named = (meta or {}).get("objects")
    return dict(named) if named else {"index": INDEX_FILE, "ids": IDS_FILE, "queries": QUERIES_FILE}


def read_ids(index_uri: str, meta: dict[str, Any] | None = None) -> pa.Table:
    meta = read_meta(index_uri) if meta is None else meta
    return pq.read_table(storage.open_input(storage.join(index_uri, objects(meta)["ids"])))


def write_index(index_uri: str, index: Any, ids: pa.Table, meta: dict[str, Any], queries: pa.Table | None,
                previous: dict[str, str] | None = None, carry: tuple[str, ...] = ()) -> None:
    """The generation's files under names of their own (``index-<generation>.faiss``, ...), then index.json
    naming them: the commit, after which ``previous`` (the objects of the generation it replaces) are
    deleted, but for the kinds in ``carry``, which the new generation keeps as they are. A run killed
    before the commit leaves the previous generation whole and readable."""
    gen = int(meta.get("generation", 1))
    names = {"index": f"index-{gen:06d}.faiss", "ids": f"ids-{gen:06d}.parquet",
             **{k: v for k, v in (previous or {}).items() if k in carry}}
    storage.write_bytes(storage.join(index_uri, names["index"]), ix.serialize(index))
    write_parquet(storage.join(index_uri, names["ids"]), ids.sort_by("label"))
    if queries is not None:
        names["queries"] = f"queries-{gen:06d}.parquet"
        write_parquet(storage.join(index_uri, names["queries"]), queries)
    meta["objects"] = names
    storage.write_json(storage.join(index_uri, META_FILE), meta, indent=2, default=str)
    for name in set((previous or {}).values()) - set(names.values()):
        storage.remove(storage.join(index_uri, name))


def index_size(index_uri: str, meta: dict[str, Any] | None = None) -> int:
    """Bytes of the index's faiss file."""
    meta = read_meta(index_uri) if meta is None else meta
    uri = storage.join(index_uri, objects(meta)["index"])
    fs, path = storage.get_fs(uri)
    try:
        return int(fs.size(path))
    except Exception as e:  # noqa: BLE001
        raise storage.explain(uri, e) from e


def _cache_dir() -> Path:
    root = os.environ.get("PIPELINE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pipeline")
    return Path(root) / "indexes"


def local_index_path(index_uri: str, meta: dict[str, Any]) -> str:
    """A local path of index.faiss: the file itself when local, else a copy in the cache (one per index and
    generation), so that faiss can memory-map it."""
    uri = storage.join(index_uri, objects(meta)["index"])
    if storage.protocol_of(uri) == "file":
        return storage.get_fs(uri)[1]
    stamp = f"{index_uri}|{meta.get('generation')}|{meta.get('updated_at')}"
    key = hashlib.sha256(stamp.encode()).hexdigest()
    path = _cache_dir() / f"{key[:24]}.faiss"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        fs, src = storage.get_fs(uri)
        try:
            fs.get_file(src, str(tmp))
        except Exception as e:  # noqa: BLE001
            raise storage.explain(uri, e) from e
        os.replace(tmp, path)
    return str(path)


MMAP_ABOVE_MEMORY_SHARE = 1 / 8  # indexes larger than this share of the machine's memory are memory-mapped


def physical_memory() -> int:
    """Bytes of physical memory on this machine (0 when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def fits_in_memory(nbytes: int) -> bool:
    """Whether an index of ``nbytes`` is read into memory rather than memory-mapped (at most
    MMAP_ABOVE_MEMORY_SHARE of this machine's memory; True where the memory is unknown)."""
    return nbytes <= MMAP_ABOVE_MEMORY_SHARE * (physical_memory() or float("inf"))


def load_index(index_uri: str, meta: dict[str, Any], *, mmap: bool | str = "auto") -> Any:
    """The faiss index with its tuned search settings; memory-mapped where faiss allows (inverted lists, flat
    codes) or read into memory. ``mmap`` auto: read into memory when the index file is at most
    MMAP_ABOVE_MEMORY_SHARE of the machine's memory (searching from memory is faster: 1M x 256 IVF-PQ,
    50,000 queries in batches of 8,192 on 2 cores, 12,300 queries/s against 8,900 memory-mapped), mapped
    above that."""
    faiss = ix.faiss_module()
    path = local_index_path(index_uri, meta)
    if mmap == "auto":
        mmap = not fits_in_memory(os.path.getsize(path))
    index = None
    if mmap:
        try:
            index = faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:
            index = None
    if index is None:
        index = faiss.read_index(path)
    ix.configure(index, ix.IndexParams.from_dict(meta["params"]))
    return index


def load_for_update(index_uri: str, meta: dict[str, Any]) -> Any:
    """The index read whole into memory (to add to it)."""
    return ix.deserialize(storage.read_bytes(storage.join(index_uri, objects(meta)["index"])))


def id_lookup(ids: pa.Table, size: int) -> pa.Array:
    """A string array indexed by label (null where no live row has that label)."""
    out = np.full(size, None, dtype=object)
    lab = ids.column("label").to_numpy()
    out[lab] = np.asarray(ids.column("id").to_pylist(), dtype=object)
    return pa.array(out, pa.string())
