"""An output's folders, and the one way a Parquet table is written to storage.

``OUTPUT/embeddings/``, ``OUTPUT/errors/``, ``OUTPUT/predictions/`` hold the tables readers see;
``OUTPUT/_runs/`` the run records; ``OUTPUT/_ledger/`` which shards the output holds and ``OUTPUT/_staging/``
the files of shards not yet committed (both written only by `pipeline.output.ledger`).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage

EMBEDDINGS_DIR = "embeddings"
ERRORS_DIR = "errors"
PREDICTIONS_DIR = "predictions"
RUNS_DIR = "_runs"
LEDGER_DIR = "_ledger"
STAGING_DIR = "_staging"


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as one zstd-compressed Parquet file."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue().to_pybytes()


def write_parquet(uri: str, table: pa.Table) -> str:
    """Write a table as one Parquet file, whole (see `storage.write_bytes`); returns the URI."""
    storage.write_bytes(uri, parquet_bytes(table))
    return uri


class LedgerError(RuntimeError):
    """The ledger and the files disagree in a way a rerun cannot repair by itself."""
