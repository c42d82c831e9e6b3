"""The shard ledger without Ray: staged parts, commit when complete, idempotent recovery, loud failures."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from pipeline import ledger as ledger_mod
from pipeline import storage
from pipeline.ledger import Ledger, LedgerError, coverage, intervals
from pipeline.sink import ParquetSink


def _rows(shard: str, rows: list[int], bad: tuple[int, ...] = ()) -> pa.Table:
    n = len(rows)
    return pa.table({
        "id": [f"{shard}/{r}" for r in rows],
        "source": [f"src/{shard}/{r}" for r in rows],
        "label": ["a"] * n,
        "embedding": pa.array([[float(r)] * 4 for r in rows], pa.list_(pa.float32(), 4)),
        "error_kind": ["truncated" if r in bad else None for r in rows],
        "error_message": ["cut short" if r in bad else None for r in rows],
        "shard": [shard] * n,
        "row": rows,
    })


def _write(sink: ParquetSink, led: Ledger, table: pa.Table) -> None:
    for part in sink.write(table).parts:
        led.record_part(part)


def _visible(out) -> list[str]:
    if not (out / "embeddings").exists():
        return []
    return sorted(pads.dataset(out / "embeddings").to_table().column("id").to_pylist())


def test_intervals_and_coverage():
    assert intervals([0, 1, 2, 5, 6, 9]) == [[0, 3], [5, 7], [9, 10]]
    assert coverage([[[0, 3]], [[3, 5]]], 5) == "complete"
    assert coverage([[[0, 3]], [[4, 5]]], 5) == "incomplete"
    assert coverage([[[0, 3]]], 5) == "incomplete"
    assert coverage([[[0, 3]], [[2, 5]]], 5) == "overlap"
    assert coverage([], 0) == "complete"


def test_a_shard_becomes_visible_only_when_all_its_rows_are_written(tmp_path):
    out = tmp_path / "out"
    sink = ParquetSink(str(out), spec={"dim": 4}, staged=True)
    led = Ledger(str(out), "run1")
    _write(sink, led, _rows("s1", [0, 1, 2]))
    led.record_total("s1", "v1", 6)
    assert led.try_commit("s1") is None  # rows 3..5 are missing
    assert _visible(out) == []  # staged rows are hidden from readers ('_staging' starts with '_')
    _write(sink, led, _rows("s1", [3, 4, 5], bad=(4,)))
    entry = led.try_commit("s1")
    assert entry["rows"] == 6 and entry["embedded"] == 5 and entry["failed"] == 1
    assert entry["error_kinds"] == {"truncated": 1} and entry["version"] == "v1"
    assert _visible(out) == ["s1/0", "s1/1", "s1/2", "s1/3", "s1/5"]
    assert pads.dataset(out / "errors").to_table().column("id").to_pylist() == ["s1/4"]
    assert led.committed()["s1"]["files"] == entry["files"]
    assert led.leftover_keys() == [] and not list((out / "_staging").rglob("*.parquet"))
    assert led.try_commit("s1") is None  # nothing left to commit; the entry stays
    assert led.entry("s1") == entry


def test_an_older_versions_leftovers_are_not_committed(tmp_path):
    out = tmp_path / "out"
    sink = ParquetSink(str(out), spec={"dim": 4}, staged=True)
    led = Ledger(str(out))
    _write(sink, led, _rows("s1", [0, 1]))
    led.record_total("s1", "old", 2)
    assert led.try_commit("s1", version="new") is None
    assert led.leftover_keys() == ["s1"]
    led.clear_staging()
    assert led.leftover_keys() == [] and _visible(out) == []


def test_a_commit_that_fails_midway_marks_nothing_and_the_next_attempt_finishes_it(tmp_path, monkeypatch):
    """Output storage failing at commit time: the error surfaces, the ledger does not mark the shard; once
    storage is back, the same commit completes (moves are idempotent)."""
    out = tmp_path / "out"
    sink = ParquetSink(str(out), spec={"dim": 4}, staged=True)
    led = Ledger(str(out))
    _write(sink, led, _rows("s1", [0, 1]))
    _write(sink, led, _rows("s1", [2, 3]))
    led.record_total("s1", "v1", 4)

    real_move, calls = storage.move, []

    def flaky_move(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise storage.StorageError("simulated: the output bucket is unreachable")
        real_move(src, dst)

    monkeypatch.setattr(ledger_mod.storage, "move", flaky_move)
    with pytest.raises(storage.StorageError, match="unreachable"):
        led.try_commit("s1")
    assert led.entry("s1") is None and led.committed() == {}
    assert _visible(out) == ["s1/0", "s1/1"]  # the window an interrupted commit leaves ...
    monkeypatch.setattr(ledger_mod.storage, "move", real_move)
    entry = led.try_commit("s1")  # ... which the next attempt closes
    assert entry["embedded"] == 4 and _visible(out) == ["s1/0", "s1/1", "s1/2", "s1/3"]


def test_overlapping_parts_are_refused(tmp_path):
    out = tmp_path / "out"
    sink = ParquetSink(str(out), spec={"dim": 4}, staged=True)
    led = Ledger(str(out))
    _write(sink, led, _rows("s1", [0, 1, 2]))
    _write(sink, led, _rows("s1", [1, 2, 3]))
    led.record_total("s1", "v1", 4)
    with pytest.raises(LedgerError, match="overlap"):
        led.try_commit("s1")
    assert _visible(out) == []


def test_partition_and_removal_of_a_committed_shard(tmp_path):
    out = tmp_path / "out"
    sink = ParquetSink(str(out), spec={"dim": 4}, staged=True, partition="run_date=2026-11-28")
    led = Ledger(str(out))
    _write(sink, led, _rows("s1", [0, 1]))
    led.record_total("s1", "v1", 2)
    entry = led.try_commit("s1")
    assert all(f.startswith("embeddings/run_date=2026-11-28/") for f in entry["files"])
    t = pads.dataset(out / "embeddings", partitioning="hive").to_table()
    assert t.column("run_date").to_pylist() == ["2026-11-28"] * 2
    led.remove_shard(entry)
    assert led.committed() == {} and not list((out / "embeddings").rglob("*.parquet"))


def test_ledger_on_s3(bucket):
    out = f"{bucket}/out"
    sink = ParquetSink(out, spec={"dim": 4}, staged=True)
    led = Ledger(out)
    _write(sink, led, _rows("s1", [0, 1, 2]))
    led.record_total("s1", "v1", 3)
    entry = led.try_commit("s1")
    assert entry["embedded"] == 3
    assert [f.rel for f in storage.list_files(storage.join(out, "embeddings"))] == ["s1-000000000.parquet"]
    assert not storage.exists(storage.join(out, "_staging", "embeddings", "s1-000000000.parquet"))
