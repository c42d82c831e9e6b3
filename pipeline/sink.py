"""Parquet output: ``OUTPUT/embeddings/`` and ``OUTPUT/errors/``, plain Arrow types, schema metadata.

Ray-free: ``ParquetSink.write(table)`` takes Embedder output rows and writes one file per (input shard, first
row) with a deterministic name, so a retried write task overwrites instead of duplicating. Each file is
written whole (temporary name + rename locally; one PUT on object storage). Staged (the extract and
classify runs), files go under ``_staging/`` and the shard ledger (ledger.py) makes them visible a whole
shard at a time.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.ledger import STAGING_DIR, intervals

EMBEDDINGS_DIR = "embeddings"
ERRORS_DIR = "errors"
PREDICTIONS_DIR = "predictions"
RUNS_DIR = "_runs"
METADATA_KEY = b"pipeline"


ERRORS_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    ("source", pa.string()),
    ("error", pa.string()),
    ("message", pa.string()),
])


def read_spec(schema: pa.Schema) -> dict[str, Any]:
    """The embedding spec stored in a Parquet schema's metadata."""
    meta = schema.metadata or {}
    if METADATA_KEY not in meta:
        raise ValueError(
            "this Parquet file has no 'pipeline' metadata: it was not written by `pipeline extract`"
        )
    return json.loads(meta[METADATA_KEY])


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
    spec: dict[str, Any]


EMBEDDING_COLUMNS = {"id": "id", "source": "source", "label": "label", "embedding": "embedding"}


class ParquetSink:
    """Writes Embedder output rows under an output URI: good rows to each Output, failed rows to errors/.

    The default writes the embeddings contract (``embeddings/``: id, source, label, embedding).
    """

    def __init__(self, output_uri: str, spec: dict[str, Any] | None = None,
                 outputs: list[Output] | None = None, *, staged: bool = False,
                 partition: str | None = None) -> None:
        self.output_uri = output_uri
        if outputs is None:
            if spec is None:
                raise TypeError("ParquetSink needs a spec or a list of outputs")
            outputs = [Output(EMBEDDINGS_DIR, EMBEDDING_COLUMNS, spec)]
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
        meta = {METADATA_KEY: json.dumps(out.spec, sort_keys=True).encode()}
        return pa.Table.from_arrays(cols, schema=pa.schema(fields, metadata=meta))

    def write(self, table: pa.Table) -> dict[str, Any]:
        """Write one batch of rows; returns counts, the files written and, per shard, the part the
        ledger needs (rows as intervals, counts, (written, final) file paths relative to the output)."""
        stats: dict[str, Any] = {"embedded": 0, "failed": 0, "files": [], "error_kinds": {}, "parts": []}
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
            stats["files"] += [storage.join(self.output_uri, w) for w, _ in placed]
            stats["embedded"] += good.num_rows
            stats["failed"] += bad.num_rows
            stats["parts"].append({
                "shard": shard, "first": rows[0], "rows": intervals(rows), "embedded": good.num_rows,
                "failed": bad.num_rows, "error_kinds": dict(part_kinds), "files": placed,
            })
        stats["error_kinds"] = dict(kinds)
        stats["actor_time"] = _actor_time(table)
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


def merge_actor_time(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in set(a) | set(b)}


def write_run_record(output_uri: str, run_id: str, record: dict[str, Any]) -> str:
    """Write ``OUTPUT/_runs/<run_id>.json``; returns its URI."""
    uri = storage.join(output_uri, RUNS_DIR, f"{run_id}.json")
    storage.write_bytes(uri, json.dumps(record, indent=2, sort_keys=False, default=str).encode())
    return uri
