"""Embedding vectors as the analytics read them: one Parquet file of an embeddings table -> ids and a float32
matrix, L2 normalization, and clustered synthetic tables (tests and benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.output.layout import write_parquet
from pipeline.output.spec import METADATA_KEY, EmbeddingSpec


@dataclass
class FileVectors:
    """The rows of one embeddings file that have an embedding: ids, sources, row numbers, vectors."""

    ids: list[str]
    sources: list[str | None]
    rows: np.ndarray  # int64 row number of each vector in the file
    x: np.ndarray  # (n, dim) float32, C-contiguous


def read_vectors(uri: str, dim: int, *, sources: bool = False) -> FileVectors:
    """Every row of one embeddings Parquet file with a non-null embedding of ``dim`` values."""
    fs, path = storage.get_fs(uri)
    cols = ["id", "embedding"] + (["source"] if sources else [])
    try:
        table = pq.read_table(path, filesystem=fs, columns=cols)
    except OSError as e:
        raise storage.explain(uri, e) from e
    emb = table.column("embedding").combine_chunks()
    t = emb.type
    if not pa.types.is_fixed_size_list(t) or t.list_size != dim:
        raise ValueError(f"'{uri}' has embeddings of type {t}, not fixed_size_list[{dim}]: the index and "
                         "these embeddings have different dimensions; build the index from this table")
    rows = np.arange(table.num_rows, dtype=np.int64)
    if emb.null_count:
        valid = pc.is_valid(emb)
        rows = rows[np.asarray(valid.to_numpy(zero_copy_only=False), dtype=bool)]
        table = table.filter(valid)
        emb = table.column("embedding").combine_chunks()
    x = np.ascontiguousarray(np.asarray(emb.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
                             .reshape(-1, dim))
    src = table.column("source").to_pylist() if sources and "source" in table.column_names \
        else [None] * table.num_rows
    return FileVectors(table.column("id").cast(pa.string()).to_pylist(), src, rows, x)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero); float32, C-contiguous, a copy."""
    x = np.array(x, dtype=np.float32, order="C")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def clustered_vectors(n: int, dim: int, *, clusters: int = 500, latent: int = 32, spread: float = 0.35,
                      noise: float = 0.05, seed: int = 0) -> np.ndarray:
    """Synthetic embeddings with the structure of real ones: ``clusters`` centres in a ``latent``-dimensional
    space, points spread around them, mapped to ``dim`` dimensions by a fixed random projection, plus a little
    isotropic noise. Same seed, same vectors, whatever ``n``: the first rows of a larger draw are not the rows
    of a smaller one, but every draw comes from the same distribution."""
    rng = np.random.default_rng(seed)
    proj = rng.standard_normal((latent, dim)).astype(np.float32) / np.sqrt(latent)
    centres = rng.standard_normal((clusters, latent)).astype(np.float32)
    rng = np.random.default_rng([seed, n])
    z = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, latent)).astype(np.float32)
    return np.ascontiguousarray(z @ proj + noise * rng.standard_normal((n, dim)).astype(np.float32))


def synthetic_spec(dim: int, model: str = "synthetic") -> EmbeddingSpec:
    """A spec for synthetic tables (no model behind them)."""
    return EmbeddingSpec(model=model, weights={"source": "synthetic", "sha256": "0" * 64}, layer="final",
                         pool="avg", dim=dim, dtype="float32")


def write_embeddings(uri: str, x: np.ndarray, ids: list[str] | None = None,
                     spec: EmbeddingSpec | None = None, id_prefix: str = "v") -> str:
    """One embeddings Parquet file (the extract contract: id, source, label, embedding + spec metadata)."""
    n, dim = x.shape
    ids = ids if ids is not None else [f"{id_prefix}{i:08d}" for i in range(n)]
    spec = spec or synthetic_spec(dim)
    schema = pa.schema([pa.field("id", pa.string(), nullable=False), ("source", pa.string()),
                        ("label", pa.string()),
                        pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False)],
                       metadata={METADATA_KEY: spec.to_metadata()})
    values = pa.array(np.ascontiguousarray(x, dtype=np.float32).reshape(-1))
    table = pa.Table.from_arrays([pa.array(ids, pa.string()), pa.nulls(n, pa.string()),
                                  pa.nulls(n, pa.string()), pa.FixedSizeListArray.from_arrays(values, dim)],
                                 schema=schema)
    return write_parquet(uri, table)
