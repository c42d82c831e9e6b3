"""The embeddings tables read back (heads train and predict, indexes, neighbours, dedup): the Parquet files
of one extract output, checked to share one EmbeddingSpec, streamed with bounded memory; and (id, label)
tables joined on id."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.output.layout import EMBEDDINGS_DIR, LEDGER_DIR
from pipeline.output.spec import EmbeddingSpec

READ_ROWS = 65536  # rows per record batch read
# Spec fields that may change between nightly runs without changing the features.
_IGNORED_ACROSS_FILES = ("versions", "dtype")


def _is_dir(uri: str) -> bool:
    try:
        return storage.isdir(uri)
    except storage.StorageError:
        return False


def _resolve_embeddings(uri: str) -> str:
    """OUTPUT -> OUTPUT/embeddings when that folder exists; else the URI itself."""
    sub = storage.join(uri, EMBEDDINGS_DIR)
    return sub if _is_dir(sub) else uri


def _parquet_files(uri: str, what: str, fix: str) -> list[storage.FileInfo]:
    try:
        files = [f for f in storage.list_files(uri) if f.rel.endswith(".parquet")]
    except storage.StorageError as e:
        raise ValueError(f"no {what} found at '{uri}' ({e}): {fix}") from e
    if not files:
        raise ValueError(f"no {what} found at '{uri}' (no .parquet files): {fix}")
    return files


def _snapshot(table_uri: str, fix: str) -> list[storage.FileInfo] | None:
    """An output's embeddings folder (``OUTPUT/embeddings``): the files its ledger lists, whole shards of
    the live generation (during ``--overwrite`` too), each seen in a listing made after the snapshot was
    taken; None for a folder of no output."""
    from pipeline.output.ledger import STATE

    output = posixpath.dirname(table_uri.rstrip("/"))
    if posixpath.basename(table_uri.rstrip("/")) != EMBEDDINGS_DIR or not output or \
            not storage.exists(storage.join(output, LEDGER_DIR, STATE)):
        return None
    base = table_uri.rstrip("/") + "/"
    for _ in range(5):
        wanted = {u[len(base):] for u in snapshot_files(output) if u.startswith(base)}
        if not wanted:
            raise ValueError(f"no embeddings found at '{output}' (no committed rows yet): {fix}")
        found = [f for f in storage.list_files(table_uri) if f.rel in wanted]
        if len(found) == len(wanted):
            return found
    raise RuntimeError(f"'{output}': files its ledger lists kept vanishing (another run replacing them?); "
                       "rerun")


class LabelTable:
    """An (id, label) Parquet table held in memory and joined on id (heads' labels_from)."""

    def __init__(self, uri: str) -> None:
        files = _parquet_files(uri, "labels table", "pass a Parquet file or folder with columns id, label")
        fs, _ = storage.get_fs(files[0].uri)
        ds = pads.dataset([storage.get_fs(f.uri)[1] for f in files], filesystem=fs, format="parquet")
        missing = {"id", "label"} - set(ds.schema.names)
        if missing:
            raise ValueError(f"labels table '{uri}' lacks column(s) {sorted(missing)}: it needs columns id "
                             f"and label (has {ds.schema.names})")
        table = ds.to_table(columns=["id", "label"])
        self.ids = table.column("id").cast(pa.string()).combine_chunks()
        self.labels = table.column("label").cast(pa.string()).combine_chunks()
        if pc.count_distinct(self.ids).as_py() != len(self.ids):
            raise ValueError(f"labels table '{uri}' repeats some ids: give each id one label")

    def lookup(self, ids: pa.Array) -> pa.Array:
        """The label of each id (null where the table has none)."""
        return pc.take(self.labels, pc.index_in(ids, value_set=self.ids))


@dataclass
class EmbeddingChunk:
    """Rows of one record batch: ids, labels and embeddings."""

    ids: list[str]
    labels: pa.Array  # string, nulls for unlabelled rows
    x: np.ndarray  # (n, dim) float32


class EmbeddingReader:
    """The Parquet files of one extract output, checked to share one spec; streamed as chunks.

    Files are read with ``ParquetFile.iter_batches``, which decodes page by page: memory is bounded by the
    read batch, not by the row group (pyarrow.dataset decodes whole row groups).
    """

    def __init__(self, uri: str, labels: LabelTable | None = None) -> None:
        self.uri = _resolve_embeddings(uri)
        fix = ("pass the OUTPUT folder of `pipeline extract` (it holds embeddings/*.parquet) or that "
               "embeddings/ folder")
        self.files = _snapshot(self.uri, fix) or _parquet_files(self.uri, "embeddings", fix)
        self.fs, _ = storage.get_fs(self.files[0].uri)
        self.paths = [storage.get_fs(f.uri)[1] for f in self.files]
        self.schemas: list[pa.Schema] = []
        self.rows: list[int] = []
        specs = []
        for f, path in zip(self.files, self.paths):
            try:
                pf = pq.ParquetFile(path, filesystem=self.fs)
                self.schemas.append(pf.schema_arrow)
                self.rows.append(pf.metadata.num_rows)
                specs.append(EmbeddingSpec.from_schema(pf.schema_arrow))
            except ValueError as e:
                raise ValueError(f"'{f.uri}': {e}") from None
            except OSError as e:
                raise ValueError(f"'{f.uri}' is not a readable Parquet file ({e})") from None
        self.spec: EmbeddingSpec = specs[0]
        for f, s in zip(self.files[1:], specs[1:]):
            diff = self.spec.differing_fields(s, ignore=_IGNORED_ACROSS_FILES)
            if diff:
                raise ValueError(
                    f"embeddings files were made with different specs ({', '.join(diff)} differ): "
                    f"'{self.files[0].uri}' vs '{f.uri}'. Train one head per extract output, or move "
                    "the odd files out")
        self.dim = int(self.spec.dim or 0)
        for f, schema in zip(self.files, self.schemas):
            t = schema.field("embedding").type if "embedding" in schema.names else None
            if t is None or not pa.types.is_fixed_size_list(t) or t.list_size != self.dim:
                raise ValueError(f"'{f.uri}' has no embedding column of fixed_size_list[{self.dim}] (got {t})"
                                 ": it was not written by `pipeline extract`")
        self.labels = labels
        self.num_rows = sum(self.rows)

    def batches(self, index: int, columns: list[str], rows: int = READ_ROWS) -> Iterator[pa.RecordBatch]:
        """Record batches of one file."""
        cols = [c for c in columns if c in self.schemas[index].names]
        try:
            pf = pq.ParquetFile(self.paths[index], filesystem=self.fs, buffer_size=1 << 20)
            yield from pf.iter_batches(batch_size=rows, columns=cols, use_threads=False)
        except OSError as e:
            raise storage.explain(self.files[index].uri, e) from e

    def chunks(self, order: list[int] | None = None, rows: int = READ_ROWS) -> Iterator[EmbeddingChunk]:
        """Labelled-or-not rows with embeddings as float32 arrays, file by file."""
        for i in order if order is not None else range(len(self.files)):
            for rb in self.batches(i, ["id", "label", "embedding"], rows):
                if rb.num_rows == 0:
                    continue
                emb = rb.column("embedding")
                if emb.null_count:
                    rb = rb.filter(pc.is_valid(emb))
                    emb = rb.column("embedding")
                ids = rb.column("id").cast(pa.string())
                if self.labels is not None:
                    labels = self.labels.lookup(ids)
                elif "label" in rb.schema.names:
                    labels = rb.column("label").cast(pa.string())
                else:
                    labels = pa.nulls(rb.num_rows, pa.string())
                x = np.array(emb.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)  # writable
                yield EmbeddingChunk(ids.to_pylist(), labels, x.reshape(-1, self.dim))


def snapshot_files(output_uri: str, table: str = EMBEDDINGS_DIR) -> list[str]:
    """The URIs of the Parquet files of an output's table (``embeddings``, ``errors``, ``predictions``) that
    its ledger lists: the committed shards, whole, and nothing of a run in progress or of one that died
    mid-commit. For readers without this package: DuckDB's ``read_parquet(<this list>,
    hive_partitioning = true)``, ``pyarrow.dataset.dataset(<this list>, partitioning="hive",
    partition_base_dir=OUTPUT/<table>)``."""
    from pipeline.output.ledger import Ledger, LedgerError

    for _ in range(10):
        ledger = Ledger(output_uri)
        if ledger.state() is None:
            raise ValueError(f"'{output_uri}' holds no ledger (_ledger/output.json): pass the OUTPUT folder "
                             "of `pipeline extract` or `classify`")
        try:
            files = ledger.files()
        except (OSError, storage.StorageError, LedgerError):
            if Ledger(output_uri).generation == ledger.generation:
                raise
            continue  # --overwrite switched generations and removed the old one's ledger while it was read
        if Ledger(output_uri).generation == ledger.generation:  # not switched meanwhile
            return sorted(ledger.uri(f) for f in files if f.startswith(table + "/"))
    raise RuntimeError(f"'{output_uri}' changed generation 10 times while its ledger was read")


def read_embeddings(output_uri: str, table: str = EMBEDDINGS_DIR, columns: list[str] | None = None,
                    attempts: int = 3) -> pa.Table:
    """One consistent snapshot of an output's table: exactly the files its ledger lists (`snapshot_files`),
    with the ``run_date`` column of incremental runs. A run that replaces a shard while this reads (its
    old file gone between the ledger read and the file read) makes it read the ledger again."""
    base = storage.join(output_uri, table)
    for attempt in range(attempts):
        uris = snapshot_files(output_uri, table)
        if not uris:
            return pa.table({"id": pa.array([], pa.string())})
        fs, base_path = storage.get_fs(base)
        paths = [storage.get_fs(u)[1] for u in uris]
        try:
            ds = pads.dataset(paths, filesystem=fs, format="parquet", partitioning="hive",
                              partition_base_dir=base_path)
            return ds.to_table(columns=columns)
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")
