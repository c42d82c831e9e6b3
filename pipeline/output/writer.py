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

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.output.layout import EMBEDDINGS_DIR, ERRORS_DIR, RUNS_DIR, STAGING_DIR, parquet_bytes
from pipeline.output.ledger import intervals
from pipeline.output.spec import METADATA_KEY, EmbeddingSpec

ERRORS_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    ("source", pa.string()),
    ("error", pa.string()),
    ("message", pa.string()),
])


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
                 partition: str | None = None, generation: str = "") -> None:
        self.output_uri = output_uri
        if outputs is None:
            if spec is None:
                raise TypeError("ParquetSink needs a spec or a list of outputs")
            outputs = [Output(EMBEDDINGS_DIR, EMBEDDING_COLUMNS, EmbeddingSpec.parse(spec))]
        self.outputs = outputs
        self.staged = staged  # write under _staging/ and report parts for the ledger to commit
        self.partition = partition  # e.g. "run_date=2026-11-28": a Hive-style folder under each table
        self.generation = generation  # the ledger generation of the files (pipeline/output/generations.py)

    def _name(self, shard: str, first_row: int) -> str:
        return f"{shard}-{first_row:09d}{'-g' + self.generation if self.generation else ''}.parquet"

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
        ledger needs (rows as intervals, counts, (written, final, bytes) per file, paths relative to the
        output)."""
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
                    data = parquet_bytes(self._table(good, out))
                    storage.write_bytes(storage.join(self.output_uri, written), data)
                    placed.append([written, final, len(data)])
            part_kinds = Counter(bad.column("error_kind").to_pylist())
            if bad.num_rows:
                errs = pa.Table.from_arrays(
                    [bad.column("id"), bad.column("source"), bad.column("error_kind"),
                     bad.column("error_message")],
                    schema=ERRORS_SCHEMA,
                )
                written, final = self._place(ERRORS_DIR, name)
                data = parquet_bytes(errs)
                storage.write_bytes(storage.join(self.output_uri, written), data)
                placed.append([written, final, len(data)])
                kinds.update(part_kinds)
            stats.files += [storage.join(self.output_uri, w) for w, *_ in placed]
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
    storage.write_bytes(uri, parquet_bytes(table))
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
    storage.write_json(uri, record, indent=2, sort_keys=False, default=str)
    return uri
