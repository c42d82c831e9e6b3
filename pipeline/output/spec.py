"""EmbeddingSpec: what a table of embeddings is, the contract between extract, heads, finetune and indexes.

Built once from a Backbone (``Backbone.spec``), stored as JSON in each Parquet file's schema metadata
(key ``pipeline``), read back with ``EmbeddingSpec.from_schema``, and compared here only. Two specs
describe interchangeable features when they agree on ``FEATURE_FIELDS`` (``feature_differences``: heads,
finetune, indexes); rows of one output table also share the rest (``table_key``: the ledger), except the
library ``versions``; files read as one table may differ in ``versions`` and ``dtype``
(``differing_fields``: the reader).
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline import storage

METADATA_KEY = b"pipeline"
# What a head trained on embeddings depends on: embeddings differing in any of these are other features.
FEATURE_FIELDS = ("model", "weights.sha256", "layer", "pool", "dim", "normalize")
# Fields that may change between runs into one output without changing the rows (library upgrades).
RUN_FIELDS = ("versions",)


class WeightsRef(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    source: str | None = None
    sha256: str | None = None

    @field_validator("source")
    @classmethod
    def _no_secrets(cls, v: str | None) -> str | None:
        return storage.redact(v)  # a presigned URL's signature must not travel with every file


class EmbeddingSpec(BaseModel):
    """The model, weights, cut, pooling, preprocessing and value type of a table of embeddings."""

    # extra="allow": fields written by a newer version survive a round trip
    model_config = ConfigDict(extra="allow", frozen=True)

    model: str | None = None
    weights: WeightsRef = WeightsRef()
    layer: str | None = None
    pool: str | None = None
    normalize: bool = False  # older files omit it; the extractor's default is off
    dim: int | None = None
    dtype: str | None = None
    precision: str = "fp32"  # the forward's arithmetic: fp32 | bf16 | fp16 (autocast); older files: fp32
    preprocessing: dict[str, Any] | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    top_k: int | None = None  # classify: the classes kept per image

    # -- building and storing ------------------------------------------------------------------------

    @classmethod
    def parse(cls, data: EmbeddingSpec | dict[str, Any] | str | bytes | None) -> EmbeddingSpec:
        if isinstance(data, EmbeddingSpec):
            return data
        if isinstance(data, (str, bytes)):
            data = json.loads(data)
        return cls.model_validate(data or {})

    @classmethod
    def from_schema(cls, schema: pa.Schema) -> EmbeddingSpec:
        """The spec stored in a Parquet schema's metadata; ValueError when there is none."""
        meta = schema.metadata or {}
        if METADATA_KEY not in meta:
            raise ValueError(
                "this Parquet file has no 'pipeline' metadata: it was not written by `pipeline extract`")
        return cls.parse(meta[METADATA_KEY])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, unset optional fields left out (the stored form)."""
        return self.model_dump(mode="json", exclude_none=True)

    def table_key(self) -> dict[str, Any]:
        """What every row of one output table shares (the stored form without RUN_FIELDS): the ledger
        refuses to mix rows whose keys differ."""
        return {k: v for k, v in self.to_dict().items() if k not in RUN_FIELDS}

    def to_metadata(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True).encode()

    # -- comparing -----------------------------------------------------------------------------------

    def get(self, dotted: str) -> Any:
        node: Any = self.to_dict()
        for key in dotted.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        if dotted == "normalize" and node is None:
            return False
        return node

    def feature_differences(self, other: EmbeddingSpec | dict[str, Any], mine: str = "head",
                            theirs: str = "embeddings") -> list[str]:
        """'field: <mine> X, <theirs> Y' for each of FEATURE_FIELDS that differs (empty: a head trained on
        one applies to the other)."""
        other = EmbeddingSpec.parse(other)
        return [f"{f}: {mine} {self.get(f)!r}, {theirs} {other.get(f)!r}" for f in FEATURE_FIELDS
                if self.get(f) != other.get(f)]

    def differing_fields(self, other: EmbeddingSpec | dict[str, Any],
                         ignore: tuple[str, ...] = RUN_FIELDS) -> list[str]:
        """The top-level fields that differ, but ``ignore``."""
        a, b = self.to_dict(), EmbeddingSpec.parse(other).to_dict()
        return sorted(k for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k))

    def features(self) -> dict[str, Any]:
        """The part a head records: what it was trained on (FEATURE_FIELDS plus the weights' source and
        the preprocessing, for the user's reference)."""
        return {
            "model": self.model,
            "weights": {"source": self.weights.source, "sha256": self.weights.sha256},
            "layer": self.layer, "pool": self.pool, "dim": self.dim, "normalize": self.normalize,
            "preprocessing": self.preprocessing,
        }


def dict_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """'key: old -> new' for every (nested) key whose value differs."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += dict_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a} -> {b}")
    return out


def read_spec(schema: pa.Schema) -> dict[str, Any]:
    """The stored spec of a Parquet schema as a plain dict (for callers that index it)."""
    return EmbeddingSpec.from_schema(schema).to_dict()


def package_version(name: str) -> str:
    """An installed distribution's version from its metadata (no import); 'unknown' when not installed."""
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
