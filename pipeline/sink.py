"""The Parquet tables of an output, written and read: ``OUTPUT/embeddings/``, ``OUTPUT/errors/``,
``OUTPUT/predictions/``, run records; plain Arrow types, the EmbeddingSpec in the schema metadata.

Ray-free. Writing: ``ParquetSink.write(table)`` takes Embedder output rows and writes one file per (input
shard, first row) with a deterministic name, so a retried write task overwrites instead of duplicating, and
returns a typed ``WriteStats``. Each file is written whole (temporary name + rename locally; one PUT on
object storage). Staged (the extract and classify runs), files go under ``_staging/`` and the shard ledger
(ledger.py) makes them visible a whole shard at a time. Reading: ``EmbeddingReader`` streams the
embeddings tables back (heads train and predict, indexes), checked to share one spec.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.ledger import STAGING_DIR, intervals
from pipeline.spec import METADATA_KEY, EmbeddingSpec

EMBEDDINGS_DIR = "embeddings"
ERRORS_DIR = "errors"
PREDICTIONS_DIR = "predictions"
RUNS_DIR = "_runs"


ERRORS_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    ("source", pa.string()),
    ("error", pa.string()),
    ("message", pa.string()),
])


def _to_bytes(table: pa.Table) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue().to_pybytes()


@dataclass(frozen=True)
class Output:
    """One Parquet table the sink writes: ``OUTPUT/<subdir>/``, its columns (output name -> row column)
    and the spec stored in its schema metadata."""

    subdir: str
    columns: dict[str, str]
    spec: EmbeddingSpec


EMBEDDING_COLUMNS = {"id": "id", "source": "source", "label": "label", "embedding": "embedding"}


@dataclass
class WriteStats:
    """What writes did: row counts, files, error kinds, the actors' time for these rows, and per shard the
    part the ledger records (rows as intervals, counts, (written, final) file paths)."""

    embedded: int = 0
    failed: int = 0
    files: list[str] = field(default_factory=list)
    error_kinds: dict[str, int] = field(default_factory=dict)
    actor_time: dict[str, float] = field(default_factory=dict)
    parts: list[dict[str, Any]] = field(default_factory=list)

    def __add__(self, other: WriteStats) -> WriteStats:
        kinds = dict(self.error_kinds)
        for k, v in other.error_kinds.items():
            kinds[k] = kinds.get(k, 0) + v
        at = {k: self.actor_time.get(k, 0) + other.actor_time.get(k, 0)
              for k in set(self.actor_time) | set(other.actor_time)}
        return WriteStats(self.embedded + other.embedded, self.failed + other.failed,
                          self.files + other.files, kinds, at, self.parts + other.parts)

    def without_parts(self) -> WriteStats:
        """The same counts without the per-shard parts (which only the ledger needs)."""
        return replace(self, parts=[])

    @classmethod
    def total(cls, stats: Iterable[WriteStats]) -> WriteStats:
        out = cls()
        for s in stats:
            out = out + s
        return out


class ParquetSink:
    """Writes Embedder output rows under an output URI: good rows to each Output, failed rows to errors/.

    The default writes the embeddings contract (``embeddings/``: id, source, label, embedding).
    """

    def __init__(self, output_uri: str, spec: EmbeddingSpec | dict[str, Any] | None = None,
                 outputs: list[Output] | None = None, *, staged: bool = False,
                 partition: str | None = None) -> None:
        self.output_uri = output_uri
        if outputs is None:
            if spec is None:
                raise TypeError("ParquetSink needs a spec or a list of outputs")
            outputs = [Output(EMBEDDINGS_DIR, EMBEDDING_COLUMNS, EmbeddingSpec.parse(spec))]
        self.outputs = outputs
        self.staged = staged  # write under _staging/ and report parts for the ledger to commit
        self.partition = partition  # e.g. "run_date=2026-11-28": a Hive-style folder under each table

    def _name(self, shard: str, first_row: int) -> str:
        return f"{shard}-{first_row:09d}.parquet"

    def _place(self, subdir: str, name: str) -> tuple[str, str]:
        """(where the file is written, where it ends up), relative to the output URI."""
        final = "/".join(p for p in (subdir, self.partition, name) if p)
        return (f"{STAGING_DIR}/{final}" if self.staged else final), final

    def _table(self, rows: pa.Table, out: Output) -> pa.Table:
        cols = [rows.column(src) for src in out.columns.values()]
        fields = []
        for name, col in zip(out.columns, cols):
            fields.append(pa.field(name, col.type, nullable=name not in ("id", "embedding")))
        meta = {METADATA_KEY: out.spec.to_metadata()}
        return pa.Table.from_arrays(cols, schema=pa.schema(fields, metadata=meta))

    def write(self, table: pa.Table) -> WriteStats:
        """Write one batch of rows; returns counts, the files written and, per shard, the part the
        ledger needs (rows as intervals, counts, (written, final) file paths relative to the output)."""
        stats = WriteStats()
        if table.num_rows == 0:
            return stats
        table = table.sort_by([("shard", "ascending"), ("row", "ascending")])
        kinds: Counter[str] = Counter()
        for shard in pc.unique(table.column("shard")).to_pylist():
            part = table.filter(pc.equal(table.column("shard"), shard))
            rows = part.column("row").to_pylist()
            failed_mask = pc.is_valid(part.column("error_kind"))
            good = part.filter(pc.invert(failed_mask))
            bad = part.filter(failed_mask)
            name = self._name(shard, rows[0])
            placed: list[list[str]] = []
            if good.num_rows:
                for out in self.outputs:
                    written, final = self._place(out.subdir, name)
                    storage.write_bytes(storage.join(self.output_uri, written),
                                        _to_bytes(self._table(good, out)))
                    placed.append([written, final])
            part_kinds = Counter(bad.column("error_kind").to_pylist())
            if bad.num_rows:
                errs = pa.Table.from_arrays(
                    [bad.column("id"), bad.column("source"), bad.column("error_kind"),
                     bad.column("error_message")],
                    schema=ERRORS_SCHEMA,
                )
                written, final = self._place(ERRORS_DIR, name)
                storage.write_bytes(storage.join(self.output_uri, written), _to_bytes(errs))
                placed.append([written, final])
                kinds.update(part_kinds)
            stats.files += [storage.join(self.output_uri, w) for w, _ in placed]
            stats.embedded += good.num_rows
            stats.failed += bad.num_rows
            stats.parts.append({
                "shard": shard, "first": rows[0], "rows": intervals(rows), "embedded": good.num_rows,
                "failed": bad.num_rows, "error_kinds": dict(part_kinds), "files": placed,
            })
        stats.error_kinds = dict(kinds)
        stats.actor_time = _actor_time(table)
        return stats


def _actor_time(table: pa.Table) -> dict[str, float]:
    """Seconds the actors spent decoding and in the model for these rows, and GPU utilization samples."""
    out = {"decode_s": 0.0, "forward_s": 0.0, "gpu_util_sum": 0.0, "gpu_util_rows": 0}
    for col in ("decode_s", "forward_s"):
        if col in table.column_names:
            out[col] = float(pc.sum(table.column(col)).as_py() or 0.0)
    if "gpu_util" in table.column_names:
        util = table.column("gpu_util")
        out["gpu_util_rows"] = table.num_rows - util.null_count
        out["gpu_util_sum"] = float(pc.sum(util).as_py() or 0.0)
    return out


ErrorRows = dict[str, tuple[str | None, str, str | None]]  # id -> (source, kind, message)


def write_error_rows(output_uri: str, name: str, errors: ErrorRows) -> str:
    """``OUTPUT/errors/<name>.parquet`` from {id: (source, kind, message)} (replaced when it exists)."""
    ids = sorted(errors)
    table = pa.Table.from_arrays(
        [pa.array(ids, pa.string()), *(pa.array([errors[i][j] for i in ids], pa.string()) for j in range(3))],
        schema=ERRORS_SCHEMA)
    uri = storage.join(output_uri, ERRORS_DIR, f"{name}.parquet")
    storage.write_bytes(uri, _to_bytes(table))
    return uri


def merge_error_rows(output_uri: str, parts_prefix: str, name: str) -> dict[str, Any]:
    """Fold ``errors/<parts_prefix>*.parquet`` (written by several workers, possibly about the same ids)
    into ``errors/<name>.parquet``, one row per id; returns {"failed": rows, "error_kinds": counts}."""
    root = storage.join(output_uri, ERRORS_DIR)
    files = [f for f in storage.list_files(root) if f.rel.endswith(".parquet")] \
        if storage.exists(root) else []
    parts = [f for f in files if f.rel.startswith(parts_prefix)]
    errors: ErrorRows = {}
    for f in [*[f for f in files if f.rel == f"{name}.parquet"], *parts]:
        t = pq.read_table(storage.open_input(f.uri))
        for row in t.to_pylist():
            errors[row["id"]] = (row["source"], row["error"], row["message"])
    if parts or errors:
        write_error_rows(output_uri, name, errors)
    for f in parts:
        storage.remove(f.uri)
    return {"failed": len(errors), "error_kinds": dict(Counter(e[1] for e in errors.values()))}


def write_run_record(output_uri: str, run_id: str, record: dict[str, Any]) -> str:
    """Write ``OUTPUT/_runs/<run_id>.json``; returns its URI."""
    uri = storage.join(output_uri, RUNS_DIR, f"{run_id}.json")
    storage.write_bytes(uri, json.dumps(record, indent=2, sort_keys=False, default=str).encode())
    return uri


# --------------------------------------------------------------------------------------------------
# Reading the embeddings tables back (heads train and predict)

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
        self.files = _parquet_files(
            self.uri, "embeddings",
            "pass the OUTPUT folder of `pipeline extract` (it holds embeddings/*.parquet) or that "
            "embeddings/ folder")
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
