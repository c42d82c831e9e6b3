"""EmbeddingSpec: one type, stored in Parquet metadata, compared in one place."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from pipeline.output.spec import METADATA_KEY, EmbeddingSpec, dict_differences, read_spec


def _spec(**kw) -> EmbeddingSpec:
    base = {"model": "tf_efficientnet_lite0", "weights": {"source": "packaged", "sha256": "ab"},
            "layer": "final", "pool": "avg", "normalize": False, "dim": 1280, "dtype": "float32",
            "preprocessing": {"library": "timm", "input_size": [3, 224, 224]}, "versions": {"torch": "2"}}
    return EmbeddingSpec.parse({**base, **kw})


def test_round_trip_through_parquet_metadata_keeps_the_stored_form():
    spec = _spec()
    schema = pa.schema([("id", pa.string())], metadata={METADATA_KEY: spec.to_metadata()})
    assert EmbeddingSpec.from_schema(schema) == spec
    stored = json.loads(spec.to_metadata())
    assert stored == read_spec(schema) and "top_k" not in stored  # unset optional fields are left out
    assert set(stored) == {"model", "weights", "layer", "pool", "normalize", "dim", "dtype", "precision",
                           "preprocessing", "versions"}
    assert EmbeddingSpec.parse({"model": "m"}).precision == "fp32"  # files written before precision
    with pytest.raises(ValueError, match="not written by `pipeline extract`"):
        EmbeddingSpec.from_schema(pa.schema([("id", pa.string())]))


def test_older_and_newer_specs_read():
    old = {k: v for k, v in _spec().to_dict().items() if k != "normalize"}  # written before normalize
    assert EmbeddingSpec.parse(old).normalize is False
    newer = EmbeddingSpec.parse({**_spec().to_dict(), "precision": "bf16"})  # a field this version lacks
    assert json.loads(newer.to_metadata())["precision"] == "bf16"


def test_three_comparisons():
    a = _spec()
    assert a.feature_differences(_spec(versions={"torch": "3"}, dtype="float16")) == []
    assert a.feature_differences(_spec(dim=40)) == ["dim: head 1280, embeddings 40"]
    other_weights = _spec(weights={"source": "x", "sha256": "cd"})
    assert a.feature_differences(other_weights) == ["weights.sha256: head 'ab', embeddings 'cd'"]
    assert a.differing_fields(_spec(dtype="float16", versions={})) == ["dtype"]
    assert a.differing_fields(_spec(dtype="float16", versions={}), ignore=("versions", "dtype")) == []
    assert a.table_key() == _spec(versions={"torch": "9"}).table_key()
    moved = _spec(layer="blocks.4").table_key()
    assert dict_differences(a.table_key(), moved) == ["layer: final -> blocks.4"]
    assert a.features()["weights"] == {"source": "packaged", "sha256": "ab"}
