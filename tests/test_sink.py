import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.embed import output_schema
from pipeline.output.spec import read_spec
from pipeline.output.writer import ParquetSink, merge_error_rows, write_error_rows, write_run_record

SPEC = {"model": "m", "weights": {"source": "none", "sha256": "0" * 64}, "layer": "final", "pool": "none",
        "dim": 4, "preprocessing": {}, "dtype": "float32"}


def _rows(shards_rows, dim=4, bad=(), dtype="float32"):
    n = len(shards_rows)
    vals = np.arange(n * dim, dtype=dtype).reshape(n, dim)
    valid = np.array([i not in bad for i in range(n)])
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vals.reshape(-1)), dim, mask=pa.array(~valid))
    return pa.Table.from_arrays([
        pa.array([f"{s}/{r}" for s, r in shards_rows]),
        pa.array(["src"] * n),
        pa.array(["a"] * n),
        emb,
        pa.array([None if valid[i] else "truncated" for i in range(n)], pa.string()),
        pa.array([None if valid[i] else "image file is truncated" for i in range(n)], pa.string()),
        pa.array([s for s, _ in shards_rows]),
        pa.array([r for _, r in shards_rows], pa.int64()),
        pa.array([0.01] * n, pa.float32()),
        pa.array([0.02] * n, pa.float32()),
        pa.array([None] * n, pa.float32()),
    ], schema=output_schema(dim, dtype))


def test_writes_embeddings_and_errors_per_shard(tmp_path):
    sink = ParquetSink(str(tmp_path), SPEC)
    stats = sink.write(_rows([("s1", 3), ("s2", 0), ("s1", 2), ("s2", 1)], bad=(1,)))
    assert stats.embedded == 3 and stats.failed == 1 and stats.error_kinds == {"truncated": 1}
    at = stats.actor_time
    assert at["decode_s"] == pytest.approx(0.04) and at["forward_s"] == pytest.approx(0.08)
    assert at["gpu_util_rows"] == 0
    names = sorted(p.name for p in (tmp_path / "embeddings").iterdir())
    assert names == ["s1-000000002.parquet", "s2-000000000.parquet"]
    errs = pq.read_table(tmp_path / "errors" / "s2-000000000.parquet")
    assert errs.column_names == ["id", "source", "error", "message"]
    assert errs.column("id").to_pylist() == ["s2/0"] and errs.column("error").to_pylist() == ["truncated"]
    t = pq.read_table(tmp_path / "embeddings" / "s1-000000002.parquet")
    assert t.column_names == ["id", "source", "label", "embedding"]
    assert t.column("id").to_pylist() == ["s1/2", "s1/3"]  # sorted by row within the shard
    assert t.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    assert read_spec(t.schema)["dim"] == 4


def test_rewrite_of_the_same_rows_overwrites(tmp_path):
    sink = ParquetSink(str(tmp_path), SPEC)
    rows = _rows([("s1", 0), ("s1", 1)])
    sink.write(rows)
    sink.write(rows)  # a retried write task
    table = pads.dataset(tmp_path / "embeddings").to_table()
    assert table.num_rows == 2
    assert not [p for p in (tmp_path / "embeddings").iterdir() if p.name.startswith(".")]


def test_float16_output(tmp_path):
    sink = ParquetSink(str(tmp_path), {**SPEC, "dtype": "float16"})
    sink.write(_rows([("s1", 0)], dtype="float16"))
    t = pq.read_table(next((tmp_path / "embeddings").iterdir()))
    assert t.schema.field("embedding").type == pa.list_(pa.float16(), 4)
    np.testing.assert_allclose(t.column("embedding").to_pylist()[0], [0, 1, 2, 3])


def test_no_metadata_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not written by `pipeline extract`"):
        read_spec(pa.schema([("id", pa.string())]))


def test_run_record(tmp_path):
    uri = write_run_record(str(tmp_path), "r1", {"counts": {"inputs": 1}})
    assert uri.endswith("_runs/r1.json") and '"inputs": 1' in open(uri).read()


def test_error_rows_of_several_workers_fold_into_one_table(tmp_path):
    out = str(tmp_path)
    write_error_rows(out, "rank-0", {"a": ("s/a", "truncated", "cut"), "b": ("s/b", "missing", None)})
    write_error_rows(out, "rank-1", {"a": ("s/a", "truncated", "cut"), "c": ("s/c", "not_an_image", "x")})
    got = merge_error_rows(out, "rank-", "finetune")
    assert got == {"failed": 3, "error_kinds": {"truncated": 1, "missing": 1, "not_an_image": 1}}
    assert sorted(p.name for p in (tmp_path / "errors").iterdir()) == ["finetune.parquet"]
    t = pq.read_table(tmp_path / "errors" / "finetune.parquet")
    assert t.column("id").to_pylist() == ["a", "b", "c"]
    assert t.schema.names == ["id", "source", "error", "message"]
    write_error_rows(out, "rank-0", {"d": ("s/d", "missing", None)})  # a later run adds to the table
    assert merge_error_rows(out, "rank-", "finetune")["failed"] == 4
