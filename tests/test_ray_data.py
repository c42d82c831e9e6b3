"""The Ray layer's Datasource and Datasink called directly (no cluster): one read task per shard that tells
the ledger when the shard was read whole, and a datasink that commits staged parts and sums typed stats."""

from __future__ import annotations

from types import SimpleNamespace

import pyarrow as pa
import pyarrow.dataset as pads

from pipeline.config import SourceConfig
from pipeline.output.ledger import Ledger
from pipeline.output.spec import EmbeddingSpec
from pipeline.output.writer import ParquetSink, WriteStats
from pipeline.ray.data import ParquetDatasink, ShardDatasource
from pipeline.sources import list_shards

SPEC = EmbeddingSpec(model="m", layer="final", pool="avg", dim=2, dtype="float32")


def _embedded(read: pa.Table, bad: set[str] = frozenset()) -> pa.Table:
    """What the Embedder would make of the read rows: a 2-d embedding, an error for the ids in ``bad``."""
    n = read.num_rows
    ids = read.column("id").to_pylist()
    return pa.table({
        "id": ids, "source": read.column("source"), "label": read.column("label"),
        "embedding": pa.array([[1.0, 2.0]] * n, pa.list_(pa.float32(), 2)),
        "error_kind": ["truncated" if i in bad else None for i in ids],
        "error_message": ["cut" if i in bad else None for i in ids],
        "shard": read.column("shard"), "row": read.column("row"),
        "decode_s": pa.array([0.5] * n, pa.float32()), "forward_s": pa.array([1.0] * n, pa.float32()),
        "gpu_util": pa.nulls(n, pa.float32()),
    })


def test_one_read_task_per_shard_and_a_datasink_that_commits_whole_shards(textures_dir, tmp_path):
    source = SourceConfig(uri=str(textures_dir), labels="folder", files_per_shard=5)
    shards, _ = list_shards(source)
    out = str(tmp_path / "out")
    ledger = Ledger(out)
    plan = ledger.plan(source.uri, {"embeddings": SPEC.table_key()}, shards, overwrite=False)
    assert plan.listed == len(shards) >= 5 and len(plan.todo) == len(shards)
    assert all(s.count <= 5 for s in shards) and sum(s.count for s in shards) == 24

    datasource = ShardDatasource(plan.todo, source, ledger=plan.ledger)
    tasks = datasource.get_read_tasks(parallelism=1)
    assert len(tasks) == len(shards)
    assert datasource.estimate_inmemory_data_size() == sum(s.size for s in shards)
    sink = ParquetSink(out, SPEC, staged=True)
    datasink = ParquetDatasink(sink, rows_per_write=4)
    bad = {"brick/000.jpg"}
    results = []
    for task in tasks:
        blocks = [_embedded(b, bad) for b in task()]  # the read task records the shard's row count
        results.append(datasink.write(blocks, ctx=None))
    assert all(isinstance(r, WriteStats) and r.parts == [] for r in results)  # parts stay with the ledger
    datasink.on_write_complete(SimpleNamespace(write_returns=results))
    total = datasink.result
    assert (total.embedded, total.failed, total.error_kinds) == (23, 1, {"truncated": 1})
    assert total.actor_time["decode_s"] == 12.0 and total.actor_time["forward_s"] == 24.0
    ledger.finish([s.key for s in shards])  # every shard committed by the tasks themselves
    assert sorted(ledger.committed()) == sorted(s.key for s in shards)
    ids = pads.dataset(f"{out}/embeddings").to_table().column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 23


def test_write_stats_add_up():
    a = WriteStats(2, 1, ["f1"], {"x": 1}, {"decode_s": 1.0})
    b = WriteStats(3, 0, ["f2"], {"x": 2, "y": 1}, {"decode_s": 2.0, "forward_s": 1.0})
    t = WriteStats.total([a, b, WriteStats()])
    assert (t.embedded, t.failed, t.files, t.error_kinds) == (5, 1, ["f1", "f2"], {"x": 3, "y": 1})
    assert t.actor_time == {"decode_s": 3.0, "forward_s": 1.0}
