"""The shard ledger without Ray: staged parts, commit when complete, idempotent recovery, loud failures."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from pipeline import storage
from pipeline.output import ledger as ledger_mod
from pipeline.output.ledger import Ledger, LedgerError, coverage, intervals
from pipeline.output.spec import EmbeddingSpec
from pipeline.output.writer import ParquetSink


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


# -- planning: compaction, scopes, removed inputs, the sharding scheme -------------------------------------

TABLES = {"embeddings": EmbeddingSpec.parse({"dim": 4}).table_key()}


def _listing(rels: list[str], max_files: int = 2) -> list:
    from pipeline.sources import Chunker, Member, chunk_shard

    chunker = Chunker(max_files, 1, lambda ms: chunk_shard(ms, "/src"))
    return [s for r in sorted(rels) for s in chunker.add(Member(r, 1, "v"))] + chunker.close()


def _run(out, shards, run_id: str, **plan_kw) -> dict:
    """What a run does to the ledger: plan, write and commit every shard to run, finish."""
    sharding = {"scheme": "content-defined-1", "depth": 1}
    led = Ledger(str(out), run_id)
    plan = led.plan("/src", TABLES, shards, overwrite=False, sharding=sharding, **plan_kw)
    sink = ParquetSink(str(out), spec={"dim": 4}, staged=True)
    for s in plan.todo:
        t = _rows(s.key, list(range(s.count)))
        t = t.set_column(0, "id", pa.array(list(s.rels)))
        _write(sink, led, t)
        led.shard_read(s.key, s.version, s.count, s.first)
    led.finish([s.key for s in plan.todo])
    return plan.counts()


def test_the_ledger_is_compacted_and_old_json_only_ledgers_still_read(tmp_path):
    out = tmp_path / "out"
    rels = [f"a/{i}.jpg" for i in range(9)]
    shards = _listing(rels)
    _run(out, shards, "r1")
    assert (out / "_ledger" / "committed.parquet").exists()
    assert not list((out / "_ledger" / "shards").glob("*.json"))  # folded
    committed = Ledger(str(out)).committed()
    assert sorted(committed) == sorted(s.key for s in shards)
    assert all(e["first"] == s.first for s in shards for e in [committed[s.key]])
    assert _visible(out) == sorted(rels)
    # an output from before compaction: JSON entries only
    (out / "_ledger" / "committed.parquet").unlink()
    for e in committed.values():
        Ledger(str(out))._write_json(Ledger(str(out))._shard_uri(e["key"]), e)
    assert _run(out, shards, "r2")["done_before"] == len(shards)
    assert (out / "_ledger" / "committed.parquet").exists() and Ledger(str(out)).committed() == committed


def test_a_run_changes_only_the_prefix_it_read(tmp_path):
    out = tmp_path / "out"
    night1 = _listing([f"2026-11-28/{i}.jpg" for i in range(5)])
    night2 = _listing([f"2026-11-29/{i}.jpg" for i in range(4)])
    _run(out, night1, "n1", scope="2026-11-28/")
    c = _run(out, night2, "n2", scope="2026-11-29/")
    assert c["done_before"] == 0 and c["removed_stale"] == 0 and c["to_run"] == len(night2)
    assert len(_visible(out)) == 9
    # the second night loses a file: only its prefix is touched
    c = _run(out, _listing([f"2026-11-29/{i}.jpg" for i in range(3)]), "n2b", scope="2026-11-29/")
    assert c["removed_stale"] >= 1
    assert _visible(out) == sorted([f"2026-11-28/{i}.jpg" for i in range(5)]
                                   + [f"2026-11-29/{i}.jpg" for i in range(3)])


def test_removed_inputs_are_kept_when_asked_and_never_embedded_again(tmp_path):
    out = tmp_path / "out"
    rels = [f"a/{i:02d}.jpg" for i in range(12)]
    _run(out, _listing(rels), "r1", on_removed="keep")
    left = {"a/03.jpg", "a/07.jpg", "a/08.jpg"}
    now = [r for r in rels if r not in left]
    c = _run(out, _listing(now), "r2", on_removed="keep")
    assert c["kept_removed"] >= 1
    assert _visible(out) == sorted(rels)  # every row once: the gone ones kept, the rest redone once
    gone = {k: e for k, e in Ledger(str(out)).committed().items() if e.get("gone")}
    assert {i for e in gone.values() for i in e["ids"]} == left
    assert all(e["gone"] == "r2" for e in gone.values())
    c = _run(out, _listing(now), "r3", on_removed="keep")
    assert c["to_run"] == 0 and _visible(out) == sorted(rels)  # nothing runs again
    # one gone image comes back: its kept row gives way to the new one
    c = _run(out, _listing([*now, "a/07.jpg"]), "r4", on_removed="keep")
    assert _visible(out) == sorted(rels)
    gone = {i for e in Ledger(str(out)).committed().values() if e.get("gone") for i in e["ids"]}
    assert gone == left - {"a/07.jpg"}
    # delete mirrors the source: the kept rows go
    _run(out, _listing(now), "r5", on_removed="delete")
    assert _visible(out) == sorted(now)
    assert not any(e.get("gone") for e in Ledger(str(out)).committed().values())


def test_an_output_of_the_old_sharding_is_refused_with_the_fix(tmp_path):
    from pipeline.config import ConfigError

    out = tmp_path / "out"
    shards = _listing([f"a/{i}.jpg" for i in range(4)])
    _run(out, shards, "r1")
    led = Ledger(str(out))
    state = led.state()
    led.write_state({k: v for k, v in state.items() if k != "sharding"})
    cut = {"scheme": "content-defined-1", "depth": 1}
    with pytest.raises(ConfigError, match="--overwrite"):
        led.plan("/src", TABLES, shards, overwrite=False, sharding=cut)
    led.write_state(state)
    with pytest.raises(ConfigError, match="split_depth"):
        Ledger(str(out)).plan("/src", TABLES, shards, overwrite=False,
                              sharding={"scheme": "content-defined-1", "depth": 2})
    plan = led.plan("/src", TABLES, shards, overwrite=True, sharding=cut)
    assert plan.done_before == 0 and len(plan.todo) == len(shards)


# -- the invariant: visible files = the committed shards' files, whatever a crash left ----------------------


class Killed(BaseException):
    """Stands for a SIGKILL at one exact step: nothing after it runs, storage stays as it is."""


def _kill_at(monkeypatch, name: str, nth: int) -> None:
    """The nth call of storage.<name> (as the ledger calls it) kills the process instead."""
    real, calls = getattr(storage, name), []

    def step(*a, **k):
        calls.append(a)
        if len(calls) == nth:
            raise Killed(name)
        return real(*a, **k)

    monkeypatch.setattr(ledger_mod.storage, name, step)


def _stage_in_two_files(out, led: Ledger, shard) -> None:
    sink = ParquetSink(str(out), spec={"dim": 4}, staged=True)
    half = shard.count // 2
    for rows in (list(range(half)), list(range(half, shard.count))):
        t = _rows(shard.key, rows).set_column(0, "id", pa.array([shard.rels[r] for r in rows]))
        _write(sink, led, t)


def _files(out) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for sub in ("embeddings", "errors") if (out / sub).exists()
                  for p in (out / sub).rglob("*.parquet"))


def _ledger_files(out) -> list[str]:
    return sorted(f for e in Ledger(str(out)).committed().values() for f in e["files"])


def test_a_commit_killed_between_its_moves_leaves_no_rows_once_its_folder_changes(tmp_path, monkeypatch):
    out = tmp_path / "out"
    rels = [f"a/{i}.jpg" for i in range(6)]
    small, shard = _listing(rels, max_files=6)  # a/0-1 and a/2-5
    assert shard.count == 4
    _run(out, [small], "r1")
    led = Ledger(str(out), "r1")
    _stage_in_two_files(out, led, shard)
    _kill_at(monkeypatch, "move", 2)
    with pytest.raises(Killed):
        led.shard_read(shard.key, shard.version, shard.count, shard.first)
    monkeypatch.undo()
    assert _visible(out) == ["a/0.jpg", "a/1.jpg", "a/2.jpg", "a/3.jpg"]  # a/2-3: of no committed shard
    # the folder gains a file before the next run: the shard has another key, the leftover cannot commit
    now = _listing([*rels, "a/6.jpg"], max_files=6)
    assert shard.key not in {s.key for s in now}
    c = _run(out, now, "r2")
    assert c["orphans_removed"] == 1 and c["recovered"] == 0
    assert _visible(out) == [*rels, "a/6.jpg"]  # each image once
    assert _files(out) == _ledger_files(out)


def test_a_commit_killed_before_its_entry_then_a_run_over_another_prefix(tmp_path, monkeypatch):
    out = tmp_path / "out"
    night1 = _listing([f"2026-11-28/{i}.jpg" for i in range(4)], max_files=4)
    led = Ledger(str(out), "n1")
    led.plan("/src", TABLES, night1, overwrite=False, scope="2026-11-28/",
             sharding={"scheme": "content-defined-1", "depth": 1})
    _stage_in_two_files(out, led, night1[0])
    _kill_at(monkeypatch, "write_json", 2)  # the total.json, then the shard's entry: killed at the entry
    with pytest.raises(Killed):
        led.shard_read(night1[0].key, night1[0].version, night1[0].count, night1[0].first)
    monkeypatch.undo()
    assert len(_visible(out)) == 4 and Ledger(str(out)).committed() == {}
    night2 = _listing([f"2026-11-29/{i}.jpg" for i in range(3)])
    c = _run(out, night2, "n2", scope="2026-11-29/")  # the next night lists another prefix
    assert c["orphans_removed"] == 2 and c["recovered"] == 0
    assert _visible(out) == [f"2026-11-29/{i}.jpg" for i in range(3)]
    root = _listing([f"2026-11-2{d}/{i}.jpg" for d, n in ((8, 4), (9, 3)) for i in range(n)])
    _run(out, root, "all")  # a run over the whole root embeds the first night's images, once
    assert _visible(out) == sorted(r for s in root for r in s.rels) and len(_visible(out)) == 7
    assert _files(out) == _ledger_files(out)


def test_keep_mode_killed_between_the_gone_entry_and_the_deletes(tmp_path, monkeypatch):
    out = tmp_path / "out"
    rels = [f"a/{i:02d}.jpg" for i in range(6)]
    _run(out, _listing(rels, max_files=6), "r1", on_removed="keep")
    now = rels[:3] + rels[4:]  # a/03 leaves the source; its shard's other rows run again in a new shard
    _kill_at(monkeypatch, "remove", 1)  # the first delete of the old file, after the entry marked it gone
    with pytest.raises(Killed):
        _run(out, _listing(now, max_files=6), "r2", on_removed="keep")
    monkeypatch.undo()
    c = _run(out, _listing(now, max_files=6), "r3", on_removed="keep")
    assert c["orphans_removed"] >= 1
    assert _visible(out) == sorted(rels)  # a/03 kept, every other image once
    assert _files(out) == _ledger_files(out)


def test_a_truncated_or_missing_file_runs_its_shard_again(tmp_path):
    out = tmp_path / "out"
    shards = _listing([f"a/{i}.jpg" for i in range(6)], max_files=3)
    _run(out, shards, "r1")
    first, second = (out / f for f in _ledger_files(out)[:2])
    first.write_bytes(first.read_bytes()[:100])  # truncated in place
    second.unlink()
    c = _run(out, shards, "r2")
    assert c["damaged"] == 2 and c["to_run"] == 2 and c["done_before"] == len(shards) - 2
    assert _visible(out) == [f"a/{i}.jpg" for i in range(6)]
    assert _files(out) == _ledger_files(out)


def test_the_end_of_a_run_checks_that_readers_see_exactly_the_ledgers_files(tmp_path):
    out = tmp_path / "out"
    shards = _listing([f"a/{i}.jpg" for i in range(4)])
    _run(out, shards, "r1")
    stray = out / "embeddings" / "another-writer.parquet"
    stray.write_bytes((out / _ledger_files(out)[0]).read_bytes())
    with pytest.raises(LedgerError, match="1 visible files belong to no committed shard"):
        Ledger(str(out), "r2").finish([], tables=["embeddings"])
    c = _run(out, shards, "r3")
    assert c["orphans_removed"] == 1 and not stray.exists()
    assert _visible(out) == [f"a/{i}.jpg" for i in range(4)]


@pytest.mark.parametrize("damage", ["empty committed.parquet", "truncated output.json", "empty shard entry"])
def test_a_damaged_ledger_file_is_named_with_the_fix(tmp_path, cli, textures_dir, damage):
    out = tmp_path / "out"
    shards = _listing([f"a/{i}.jpg" for i in range(4)])
    _run(out, shards, "r1")
    if damage == "empty committed.parquet":
        path = out / "_ledger" / "committed.parquet"
        path.write_bytes(b"")
    elif damage == "truncated output.json":
        path = out / "_ledger" / "output.json"
        path.write_bytes(path.read_bytes()[:20])
    else:
        path = out / "_ledger" / "shards" / "x.json"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"")
    with pytest.raises(LedgerError) as e:
        Ledger(str(out)).plan("/src", TABLES, shards, overwrite=False,
                              sharding={"scheme": "content-defined-1", "depth": 1})
    assert f"ledger file {path} is damaged" in str(e.value) and "--overwrite" in str(e.value)
    # the CLI: exit 1 (the run failed, the configuration is fine), one line naming the file
    r = cli("extract", "--source", textures_dir, "--output", out, "--model", "tf_efficientnet_lite0")
    assert r.returncode == 1 and f"{path} is damaged" in r.stderr and "--overwrite" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_the_snapshot_reader_sees_committed_shards_only(tmp_path, monkeypatch):
    import duckdb

    from pipeline import read_embeddings, snapshot_files

    out = tmp_path / "out"
    small, shard = _listing([f"a/{i}.jpg" for i in range(6)], max_files=6)
    sink = ParquetSink(str(out), spec={"dim": 4}, staged=True, partition="run_date=2026-12-01")
    led = Ledger(str(out), "r1")
    led.plan("/src", TABLES, [small, shard], overwrite=False,
             sharding={"scheme": "content-defined-1", "depth": 1})
    for s in (small, shard):
        half = s.count // 2
        for rows in (list(range(half)), list(range(half, s.count))):
            _write(sink, led, _rows(s.key, rows).set_column(0, "id", pa.array([s.rels[r] for r in rows])))
    led.shard_read(small.key, small.version, small.count, small.first)
    _kill_at(monkeypatch, "move", 2)  # the second shard's commit dies between its two moves
    with pytest.raises(Killed):
        led.shard_read(shard.key, shard.version, shard.count, shard.first)
    monkeypatch.undo()
    glob = pads.dataset(out / "embeddings", partitioning="hive").to_table()
    assert glob.num_rows == 4  # a reader globbing the folder sees half of the second shard
    table = read_embeddings(str(out))
    assert sorted(table.column("id").to_pylist()) == ["a/0.jpg", "a/1.jpg"]
    assert table.column("run_date").to_pylist() == ["2026-12-01"] * 2
    files = snapshot_files(str(out))
    assert len(files) == 2 and all(f.startswith(str(out / "embeddings" / "run_date=2026-12-01/a_0.jpg"))
                                   for f in files)  # the first shard's two files
    sql = duckdb.sql(f"SELECT count(*), min(run_date)::VARCHAR "
                     f"FROM read_parquet({files!r}, hive_partitioning = true)")
    assert sql.fetchall() == [(2, "2026-12-01")]
    with pytest.raises(ValueError, match="holds no ledger"):
        read_embeddings(str(tmp_path))


def test_nightly_predictions_follow_the_embeddings(tmp_path):
    """Earlier nights' prediction rows of images that were embedded again (changed) or left the source
    go; every embedded image keeps exactly one prediction row, under its embeddings' run date."""
    from pipeline.commands.nightly import reconcile_predictions
    from pipeline.output.layout import write_parquet

    out, pred = tmp_path / "out", tmp_path / "pred"
    sharding = {"scheme": "content-defined-1", "depth": 1}

    def night(day: str, rels: list[str]) -> None:
        shards = _listing(rels, max_files=3)
        led = Ledger(str(out), day)
        plan = led.plan("/src", TABLES, shards, overwrite=False, sharding=sharding)
        sink = ParquetSink(str(out), spec={"dim": 4}, staged=True, partition=f"run_date={day}")
        for s in plan.todo:
            _write(sink, led, _rows(s.key, list(range(s.count))).set_column(0, "id", pa.array(list(s.rels))))
            led.shard_read(s.key, s.version, s.count, s.first)
        led.finish([s.key for s in plan.todo], tables=["embeddings"])
        ids = sorted(r for s in plan.todo for r in s.rels)  # what `heads predict` wrote that night
        write_parquet(str(pred / "predictions" / f"run_date={day}" / "part-0.parquet"),
                      pa.table({"id": ids, "label": ["x"] * len(ids), "score": [0.5] * len(ids)}))

    first = [f"a/{i}.jpg" for i in range(8)]
    night("2026-12-01", first)
    night("2026-12-02", [*first[:5], "a/5b.jpg", *first[6:], "b/0.jpg"])  # a/5 replaced by a/5b, b/0 new
    before = pads.dataset(pred / "predictions", partitioning="hive").to_table()
    c = reconcile_predictions(str(out), str(pred))
    after = pads.dataset(pred / "predictions", partitioning="hive").to_table()
    emb = pads.dataset(out / "embeddings", partitioning="hive").to_table()

    def pairs(t):
        return sorted(zip(t.column("id").to_pylist(), map(str, t.column("run_date").to_pylist())))

    assert before.num_rows > emb.num_rows and c["rows_removed"] == before.num_rows - emb.num_rows
    assert pairs(after) == pairs(emb) and len(set(after.column("id").to_pylist())) == 9
    assert reconcile_predictions(str(out), str(pred))["rows_removed"] == 0


def test_verify_reports_what_breaks_the_invariant_and_repairs_it(tmp_path, cli):
    out = tmp_path / "out"
    shards = _listing([f"a/{i}.jpg" for i in range(6)], max_files=3)
    _run(out, shards, "r1")
    r = cli("verify", out)
    assert r.returncode == 0 and "ok: the visible files are exactly the committed shards' files" in r.stdout
    first = out / _ledger_files(out)[0]
    first.write_bytes(first.read_bytes()[:50])  # truncated
    (out / "embeddings" / "stray.parquet").write_bytes(b"PAR1")
    r = cli("verify", out, "--json")
    report = json.loads(r.stdout)
    assert r.returncode == 1 and report["orphan_files"] == ["embeddings/stray.parquet"]
    assert report["damaged_shards"] == 1 and first.name in json.dumps(report["damaged"])
    r = cli("verify", out, "--repair")
    assert r.returncode == 0 and "1 orphan files removed, 1 damaged shards forgotten" in r.stdout
    assert cli("verify", out).returncode == 0 and _files(out) == _ledger_files(out)
    c = _run(out, shards, "r2")  # the next run embeds the forgotten shard again
    assert c["to_run"] == 1 and _visible(out) == [f"a/{i}.jpg" for i in range(6)]
    r = cli("verify", tmp_path / "nothing")
    assert r.returncode == 2 and "holds no ledger" in r.stderr
