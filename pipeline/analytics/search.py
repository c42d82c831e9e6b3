"""Batch k-nearest-neighbour search: ``Searcher``, a Ray-free callable class that holds an index
(read into memory, or memory-mapped when it is large: store.load_index) and maps query rows to neighbour
rows; ``ImageSearcher`` puts the
Embedder in front of it (images -> the index's backbone, weights, layer and preprocessing -> neighbours);
``NeighborsWriter`` writes the rows: ``OUTPUT/neighbors/*.parquet`` (query_id, rank, id, score) and failed
queries to ``OUTPUT/errors/``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.analytics import index as ix
from pipeline.analytics import store
from pipeline.output.layout import write_parquet
from pipeline.output.spec import EmbeddingSpec

NEIGHBORS_DIR = "neighbors"
NEIGHBORS_SCHEMA = pa.schema([pa.field("query_id", pa.string(), nullable=False), ("rank", pa.int32()),
                              ("id", pa.string()), ("score", pa.float32())])
# What the stage emits: neighbour rows, and one row per failed query (rank null, error set).
STAGE_SCHEMA = pa.schema([*NEIGHBORS_SCHEMA, ("source", pa.string()), ("error_kind", pa.string()),
                          ("error_message", pa.string())])


def _column(batch: pa.Table, name: str) -> pa.Array | None:
    if name not in batch.column_names:
        return None
    col = batch.column(name)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def embedding_matrix(col: pa.Array, dim: int, what: str) -> np.ndarray:
    """A fixed_size_list (or Ray tensor) column as an (n, dim) float32 matrix; ValueError on another dim."""
    if isinstance(col.type, pa.ExtensionType):
        col = col.storage
    width = col.type.list_size if pa.types.is_fixed_size_list(col.type) else None
    x = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    width = width or (x.size // max(len(col), 1))
    if width != dim:
        raise ValueError(f"{what} have {width} dimensions, the index {dim}: query with embeddings of the "
                         "index's spec, or build an index from these embeddings")
    return x.reshape(len(col), dim)


class Searcher:
    """Query rows (``id``, ``embedding``; optional ``source``, ``error_kind``, ``error_message``) -> the k
    nearest rows of the index: query_id, rank (0 = nearest), id, score. A query whose own id is in the
    index is left out of its own results when ``exclude_self``; with ``keep_ids`` only rows with those ids
    are queries. ``threads``: faiss's threads for a batch (default: OpenMP's)."""

    def __init__(self, index_uri: str, k: int = 10, *, exclude_self: bool = False, mmap: bool | str = "auto",
                 keep_ids: list[str] | None = None, threads: int | None = None) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k} (-k)")
        # faiss searches a batch on this many threads (Ray sets OpenMP's to the actor's CPUs). OpenMP's thread
        # count belongs to the calling thread, and Ray may run calls on another thread than __init__'s: it
        # is set again in each call (without that, the actor searched on one thread: 0.47x faiss's speed).
        self.threads = int(threads) if threads else None
        self.meta = store.read_meta(index_uri)
        self.params = ix.IndexParams.from_dict(self.meta["params"])
        self.spec = EmbeddingSpec.parse(self.meta["spec"])
        self.index = store.load_index(index_uri, self.meta, mmap=mmap)
        self.ids = store.id_lookup(store.read_ids(index_uri, self.meta), int(self.meta["next_label"]))
        self.k = k
        self.exclude_self = exclude_self
        self.keep_ids = pa.array(sorted(set(keep_ids)), pa.string()) if keep_ids is not None else None

    def _search(self, ids: list[str], x: np.ndarray) -> tuple[np.ndarray, pa.Array]:
        """(scores (n, k), neighbour ids as one flat array of n * k, null where missing)."""
        extra = 1 if self.exclude_self else 0
        scores, labels = ix.search(self.index, self.params, ix.prepare(x, self.params.metric), self.k + extra)
        found = pc.take(self.ids, pa.array(np.maximum(labels, 0).reshape(-1)))
        found = pc.if_else(pa.array((labels >= 0).reshape(-1)), found, pa.nulls(labels.size, pa.string()))
        if not extra:
            return scores, found
        width = self.k + 1
        names = np.asarray(found.to_pylist(), dtype=object).reshape(-1, width)
        keep = np.zeros(names.shape, dtype=bool)
        for r, own in enumerate(ids):
            row = (names[r] != own)
            row[np.cumsum(row) > self.k] = False
            keep[r] = row
        scores = scores[keep].reshape(-1, self.k)
        return scores, pa.array(names[keep].tolist(), pa.string())

    def __call__(self, batch: pa.Table | pa.RecordBatch) -> pa.Table:
        if self.threads:
            ix.faiss_module().omp_set_num_threads(self.threads)
        if isinstance(batch, pa.RecordBatch):
            batch = pa.Table.from_batches([batch])
        if self.keep_ids is not None:  # queries named by id: only those rows of the table
            batch = batch.filter(pc.is_in(_column(batch, "id").cast(pa.string()), value_set=self.keep_ids))
        kinds = _column(batch, "error_kind")
        emb = _column(batch, "embedding")
        ok = pc.is_valid(emb) if kinds is None else pc.and_(pc.is_valid(emb), pc.is_null(kinds))
        ok_np = np.asarray(ok.to_numpy(zero_copy_only=False), dtype=bool)
        good = batch.filter(ok)
        parts = []
        if good.num_rows:
            gid = _column(good, "id").cast(pa.string())
            x = embedding_matrix(_column(good, "embedding"), self.params.dim, "the query embeddings")
            scores, found = self._search(gid.to_pylist() if self.exclude_self else [], x)
            k = scores.shape[1]
            parts.append(pa.Table.from_arrays([
                pc.take(gid, pa.array(np.repeat(np.arange(good.num_rows), k))),
                pa.array(np.tile(np.arange(k, dtype=np.int32), good.num_rows)),
                found, pa.array(scores.reshape(-1), pa.float32()),
                pa.nulls(len(found), pa.string()),
                pa.nulls(len(found), pa.string()), pa.nulls(len(found), pa.string())], schema=STAGE_SCHEMA))
        if not ok_np.all():
            bad = batch.filter(pc.invert(ok))
            m = bad.num_rows
            src = _column(bad, "source")
            kind = _column(bad, "error_kind")
            msg = _column(bad, "error_message")
            parts.append(pa.Table.from_arrays([
                _column(bad, "id").cast(pa.string()), pa.nulls(m, pa.int32()), pa.nulls(m, pa.string()),
                pa.nulls(m, pa.float32()),
                src.cast(pa.string()) if src is not None else pa.nulls(m, pa.string()),
                kind.fill_null("no_embedding") if kind is not None else pa.array(["no_embedding"] * m),
                msg.cast(pa.string()) if msg is not None else pa.nulls(m, pa.string())], schema=STAGE_SCHEMA))
        return pa.concat_tables(parts) if parts else STAGE_SCHEMA.empty_table()


class ImageSearcher:
    """Encoded images -> the Embedder (the index's backbone, weights, layer, pooling, preprocessing) -> the
    Searcher. Bad images come out as failed queries."""

    def __init__(self, spec: Any, index_uri: str, k: int = 10) -> None:
        from pipeline.embed import Embedder

        self.embedder = Embedder(spec)  # spec: the index's EmbedderSpec, with the planned runtime
        self.searcher = Searcher(index_uri, k)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.searcher(self.embedder(batch))


class NeighborsWriter:
    """Stage rows -> ``OUTPUT/neighbors/<name>.parquet`` and ``OUTPUT/errors/<name>.parquet``."""

    def __init__(self, output_uri: str) -> None:
        self.output_uri = output_uri

    def write_block(self, block: pa.Table, name: str) -> dict[str, Any]:
        """Write one block of stage rows; its counts: rows, queries (answered), failed, error_kinds."""
        out: dict[str, Any] = {"rows": 0, "queries": 0, "failed": 0, "error_kinds": {}}
        if block.num_rows == 0:
            return out
        out["rows"], out["failed"], out["error_kinds"] = self.write(block, name)
        good = block.filter(pc.is_null(block.column("error_kind")))
        out["queries"] = pc.count_distinct(good.column("query_id")).as_py() if good.num_rows else 0
        return out

    def write(self, table: pa.Table, name: str) -> tuple[int, int, dict[str, int]]:
        """(neighbour rows, failed queries, error kinds) written from one block."""
        from pipeline.output.layout import ERRORS_DIR
        from pipeline.output.writer import ERRORS_SCHEMA

        failed_mask = pc.is_valid(table.column("error_kind"))
        good = table.filter(pc.invert(failed_mask))
        bad = table.filter(failed_mask)
        if good.num_rows:
            out = pa.Table.from_arrays([good.column(c) for c in NEIGHBORS_SCHEMA.names],
                                       schema=NEIGHBORS_SCHEMA)
            write_parquet(storage.join(self.output_uri, NEIGHBORS_DIR, f"{name}.parquet"), out)
        kinds: dict[str, int] = {}
        if bad.num_rows:
            errs = pa.Table.from_arrays([bad.column(c) for c in ("query_id", "source", "error_kind",
                                                                  "error_message")], schema=ERRORS_SCHEMA)
            write_parquet(storage.join(self.output_uri, ERRORS_DIR, f"{name}.parquet"), errs)
            for k in bad.column("error_kind").to_pylist():
                kinds[k] = kinds.get(k, 0) + 1
        return good.num_rows, bad.num_rows, kinds


def add_counts(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Sum ``write_block`` counts into ``total`` (returned)."""
    for key in ("rows", "queries", "failed"):
        total[key] = total.get(key, 0) + part[key]
    kinds = total.setdefault("error_kinds", {})
    for k, v in part["error_kinds"].items():
        kinds[k] = kinds.get(k, 0) + v
    return total


def search_locally(files: list[str], stage_kwargs: dict[str, Any], output_uri: str, batch_size: int,
                   threads: int, progress: bool = True) -> dict[str, Any]:
    """The Searcher over embeddings files in this process (no Ray): what ``pipeline neighbors`` does for a
    query table small enough that starting Ray and an actor would cost more than the search."""
    import sys
    import time

    searcher = Searcher(**stage_kwargs, threads=threads)
    writer = NeighborsWriter(output_uri)
    total: dict[str, Any] = {"rows": 0, "queries": 0, "failed": 0, "error_kinds": {}}
    t0 = time.perf_counter()
    for i, uri in enumerate(files):
        fs, path = storage.get_fs(uri)
        table = pq.read_table(path, filesystem=fs, columns=["id", "embedding"])
        for j, batch in enumerate(table.to_batches(batch_size)):
            add_counts(total, writer.write_block(searcher(batch), f"part-{i:05d}-{j:04d}"))
        if progress:
            print(f"\rsearching: {i + 1}/{len(files)} files, {total['queries']} queries "
                  f"({time.perf_counter() - t0:.0f}s)", end="\n" if i + 1 == len(files) else "",
                  file=sys.stderr, flush=True)
    return total


