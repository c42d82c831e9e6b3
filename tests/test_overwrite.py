"""``--overwrite`` builds the new table as a generation beside the live one and switches when it is whole
(pipeline/output/generations.py): a snapshot reader sees the old table or the new one, never none; a kill
at any step leaves the old table readable and is repaired or resumed by the next run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.output import generations
from pipeline.output.ledger import Ledger
from pipeline.output.reader import read_embeddings, snapshot_files
from pipeline.output.spec import EmbeddingSpec
from pipeline.output.writer import ParquetSink
from pipeline.sources import Chunker, Member, chunk_shard

ROOT = Path(__file__).resolve().parents[1]
CUT = {"scheme": "content-defined-1", "depth": 1}
OLD = {"embeddings": EmbeddingSpec.parse({"dim": 4}).table_key()}
NEW = {"embeddings": EmbeddingSpec.parse({"dim": 4, "model": "other"}).table_key()}
RELS = [f"a/{i:02d}.jpg" for i in range(9)]


def _listing(rels: list[str]) -> list:
    chunker = Chunker(2, 1, lambda ms: chunk_shard(ms, "/src"))
    return [s for r in sorted(rels) for s in chunker.add(Member(r, 1, "v"))] + chunker.close()


def _write_shard(ledger: Ledger, shard, value: float) -> None:
    """What the read task and a write task do for one shard: stage its rows, record them, commit."""
    spec = {"dim": 4, "model": "other"} if ledger.pending else {"dim": 4}
    sink = ParquetSink(ledger.output_uri, spec=spec, staged=True, generation=ledger.generation)
    n = shard.count
    table = pa.table({
        "id": list(shard.rels), "source": list(shard.rels), "label": ["a"] * n,
        "embedding": pa.array([[value] * 4] * n, pa.list_(pa.float32(), 4)),
        "error_kind": pa.nulls(n, pa.string()), "error_message": pa.nulls(n, pa.string()),
        "shard": [shard.key] * n, "row": list(range(n)),
    })
    ledger.parts_written(sink.write(table).parts)
    ledger.shard_read(shard.key, shard.version, n, shard.first)


def _run(out, tables, run_id: str, *, overwrite: bool = False, stop_after: int | None = None,
         rels: list[str] = RELS, scope: str = "") -> dict:
    """A run at the ledger's level: plan, write every shard to run (or the first ``stop_after``, then
    stop as a kill would), finish."""
    shards = _listing(rels)
    work = Ledger(str(out), run_id).plan("/src", tables, shards, overwrite=overwrite, sharding=CUT,
                                         scope=scope)
    value = 2.0 if tables is NEW else 1.0
    for i, shard in enumerate(work.todo):
        if stop_after is not None and i == stop_after:
            return {**work.counts(), "ledger": work.ledger}
        _write_shard(work.ledger, shard, value)
    work.ledger.finish([s.key for s in work.todo], tables=list(tables))
    return {**work.counts(), "ledger": work.ledger}


def _snapshot(out) -> dict[str, float]:
    t = read_embeddings(str(out))
    return dict(zip(t["id"].to_pylist(), [e[0] for e in t["embedding"].to_pylist()], strict=True))


def _glob_ids(out) -> list[str]:
    """What a glob reader sees: every Parquet file under embeddings/ (local or S3)."""
    root = storage.join(str(out), "embeddings")
    files = [f.uri for f in storage.list_files(root) if f.rel.endswith(".parquet")]
    ids = []
    for uri in files:
        fs, path = storage.get_fs(uri)
        ids += pq.read_table(path, filesystem=fs, columns=["id"])["id"].to_pylist()
    return sorted(ids)


def _ledger_names(out) -> list[str]:
    """What _ledger/ holds (leases and empty folders aside)."""
    root = storage.join(str(out), "_ledger")
    return sorted({f.rel.split("/")[0] for f in storage.list_files(root) if not f.rel.startswith("lease")})


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """An output folder on local disk, or on the loopback S3 server."""
    return tmp_path / "out" if request.param == "local" else request.getfixturevalue("bucket") + "/out"


def test_an_overwrite_is_built_beside_the_live_table_and_switched_to_whole(where):
    out = where
    _run(out, OLD, "r1")
    assert _snapshot(out) == dict.fromkeys(RELS, 1.0)
    partial = _run(out, NEW, "r2", overwrite=True, stop_after=3)  # 3 shards of the new table committed
    assert partial["ledger"].pending and partial["done_before"] == 0
    assert _snapshot(out) == dict.fromkeys(RELS, 1.0)  # readers: the live table, whole
    shards = _listing(RELS)
    assert len(_glob_ids(out)) == len(RELS) + sum(s.count for s in shards[:3])  # the new files, beside it
    ledger = partial["ledger"]
    for shard in _listing(RELS)[3:]:
        _write_shard(ledger, shard, 2.0)
        assert _snapshot(out) == dict.fromkeys(RELS, 1.0)
    ledger.finish([s.key for s in _listing(RELS)], tables=["embeddings"])
    assert _snapshot(out) == dict.fromkeys(RELS, 2.0)
    assert _glob_ids(out) == RELS  # the old files are gone
    gen = ledger.generation
    assert all(f.endswith(f"-g{gen}.parquet") for f in snapshot_files(str(out)))
    assert _ledger_names(out) == [f"gen-{gen}", "output.json"]
    assert Ledger(str(out)).state()["generation"] == gen
    again = _run(out, NEW, "r3")  # the new generation is the output now: a rerun does nothing
    assert again["to_run"] == 0 and again["done_before"] == len(shards)
    third = _run(out, OLD, "r4", overwrite=True)
    assert _snapshot(out) == dict.fromkeys(RELS, 1.0) and _glob_ids(out) == RELS
    assert _ledger_names(out) == [f"gen-{third['ledger'].generation}", "output.json"]


def test_a_kill_right_after_the_switch_leaves_the_old_files_to_the_next_plan(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _run(out, OLD, "r1")
    real = generations.storage

    class Killed:  # generations' storage: its first removal, right after the switch, is the kill
        def __getattr__(self, name):
            return getattr(real, name)

        def remove(self, *a, **k):
            raise KeyboardInterrupt("SIGKILL")  # nothing after it runs

    monkeypatch.setattr(generations, "storage", Killed())
    with pytest.raises(KeyboardInterrupt):
        _run(out, NEW, "r2", overwrite=True)
    monkeypatch.setattr(generations, "storage", real)
    assert _snapshot(out) == dict.fromkeys(RELS, 2.0)  # switched: readers see the new table
    assert len(_glob_ids(out)) == 2 * len(RELS)  # the old files are still there
    c = _run(out, NEW, "r3")
    assert c["to_run"] == 0 and c["orphans_removed"] == len(_listing(RELS))  # one file per shard
    assert _glob_ids(out) == RELS and _snapshot(out) == dict.fromkeys(RELS, 2.0)
    assert _ledger_names(out) == [f"gen-{c['ledger'].generation}", "output.json"]


@pytest.mark.parametrize("rerun", ["overwrite again", "plain, new settings", "plain, old settings"])
def test_an_interrupted_overwrite_is_resumed_by_its_rerun_or_dropped_by_another_run(tmp_path, rerun):
    out = tmp_path / "out"
    _run(out, OLD, "r1")
    _run(out, NEW, "r2", overwrite=True, stop_after=3)  # killed: 3 shards of the new table committed
    assert _snapshot(out) == dict.fromkeys(RELS, 1.0)
    if rerun == "plain, old settings":  # the overwrite is given up: its files go
        c = _run(out, OLD, "r3")
        assert c["to_run"] == 0 and c["orphans_removed"] == 3
        assert _snapshot(out) == dict.fromkeys(RELS, 1.0)
    else:  # the same settings again, with --overwrite or without: the overwrite resumes
        c = _run(out, NEW, "r3", overwrite=rerun == "overwrite again")
        assert c["done_before"] == 3 and c["to_run"] == len(_listing(RELS)) - 3
        assert _snapshot(out) == dict.fromkeys(RELS, 2.0)
    assert _glob_ids(out) == RELS
    assert _ledger_names(out) == (["committed.parquet", "output.json"] if rerun == "plain, old settings"
                                  else [f"gen-{c['ledger'].generation}", "output.json"])


def test_a_damaged_output_is_rebuilt_by_an_overwrite(tmp_path):
    out = tmp_path / "out"
    _run(out, OLD, "r1")
    (out / "_ledger" / "output.json").write_text('{"source": "/sr')  # truncated
    _run(out, NEW, "r2", overwrite=True)
    assert _snapshot(out) == dict.fromkeys(RELS, 2.0) and _glob_ids(out) == RELS


def test_an_overwrite_killed_just_after_its_switch_is_not_redone_by_its_rerun(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _run(out, OLD, "r1")
    partial = _run(out, NEW, "r2", overwrite=True, stop_after=0)
    for shard in _listing(RELS):  # every shard committed; the switch comes next
        _write_shard(partial["ledger"], shard, 2.0)
    real = Ledger.write_state

    def write_then_die(self, state):
        real(self, state)
        if not self.pending:
            raise KeyboardInterrupt("SIGKILL")  # right after output.json names the new generation

    monkeypatch.setattr(Ledger, "write_state", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        partial["ledger"].finish([s.key for s in _listing(RELS)], tables=["embeddings"])
    monkeypatch.undo()
    again = _run(out, NEW, "r3", overwrite=True)  # the same command again: nothing to redo
    assert again["to_run"] == 0 and not again["ledger"].pending
    assert _glob_ids(out) == RELS and _snapshot(out) == dict.fromkeys(RELS, 2.0)
    assert _ledger_names(out) == [f"gen-{partial['ledger'].generation}", "output.json"]


def test_an_interrupted_overwrite_is_resumed_only_over_the_same_part_of_the_source(tmp_path):
    from pipeline.config import ConfigError

    out, rels = tmp_path / "out", [*RELS, *(f"b/{i}.jpg" for i in range(4))]
    _run(out, OLD, "r1", rels=rels)
    _run(out, NEW, "r2", overwrite=True, stop_after=1, rels=rels)  # the whole root, killed
    with pytest.raises(ConfigError, match="--overwrite"):  # one folder of it, the new settings: refused,
        _run(out, NEW, "r3", rels=rels[9:], scope="b/")  # never switched to with a/ unbuilt
    assert _snapshot(out) == dict.fromkeys(rels, 1.0)


def test_a_failed_read_of_the_live_ledger_stops_an_overwrite_before_it_removes_anything(tmp_path,
                                                                                        monkeypatch):
    out = tmp_path / "out"
    _run(out, OLD, "r1")
    real = Ledger.committed

    def throttled(self):
        if not self.pending:
            raise storage.StorageError("cannot access the ledger: SlowDown")  # S3 503, a timeout
        return real(self)

    monkeypatch.setattr(Ledger, "committed", throttled)
    with pytest.raises(storage.StorageError):
        _run(out, NEW, "r2", overwrite=True)
    monkeypatch.undo()
    assert _snapshot(out) == dict.fromkeys(RELS, 1.0) and _glob_ids(out) == RELS


def test_commands_reading_an_outputs_embeddings_folder_read_its_snapshot(tmp_path, monkeypatch):
    from pipeline.output import reader

    out = tmp_path / "out"
    _run(out, OLD, "r1")
    partial = _run(out, NEW, "r2", overwrite=True, stop_after=3)
    for uri in (out, out / "embeddings"):  # as index.json records an output's embeddings
        ids = [i for c in reader.EmbeddingReader(str(uri)).chunks() for i in c.ids]
        assert sorted(ids) == RELS
    real = reader.snapshot_files

    def switched_meanwhile(*a, **k):  # the overwrite switches between the reader's listing and snapshot
        monkeypatch.setattr(reader, "snapshot_files", real)
        for shard in _listing(RELS)[3:]:
            _write_shard(partial["ledger"], shard, 2.0)
        partial["ledger"].finish([s.key for s in _listing(RELS)], tables=["embeddings"])
        return real(*a, **k)

    monkeypatch.setattr(reader, "snapshot_files", switched_meanwhile)
    r = reader.EmbeddingReader(str(out))
    assert sorted(i for c in r.chunks() for i in c.ids) == RELS


def test_verify_repair_after_waiting_for_an_overwrite_keeps_its_table(tmp_path, monkeypatch):
    import contextlib

    from pipeline.commands import verify as verify_mod

    out = tmp_path / "out"
    _run(out, OLD, "r1")
    partial = _run(out, NEW, "r2", overwrite=True, stop_after=2)
    assert verify_mod.verify(str(out))["pending_files"] == 2
    real = verify_mod.hold

    @contextlib.contextmanager
    def waited(*a, **k):  # --wait-for-lock: the overwrite finishes while verify waits for the lease
        for shard in _listing(RELS)[2:]:
            _write_shard(partial["ledger"], shard, 2.0)
        partial["ledger"].finish([s.key for s in _listing(RELS)], tables=["embeddings"])
        with real(*a, **k) as lease:
            yield lease

    monkeypatch.setattr(verify_mod, "hold", waited)
    report = verify_mod.verify(str(out), repair=True)
    assert report["repaired"] == {"orphans_removed": 0, "shards_forgotten": 0}
    assert _snapshot(out) == dict.fromkeys(RELS, 2.0) and _glob_ids(out) == RELS


def test_a_first_run_with_overwrite_killed_is_resumed_by_a_plain_rerun(tmp_path):
    out = tmp_path / "out"
    _run(out, OLD, "r1", overwrite=True, stop_after=2)
    c = _run(out, OLD, "r2")
    assert c["done_before"] == 2 and _snapshot(out) == dict.fromkeys(RELS, 1.0) and _glob_ids(out) == RELS


def _table(out) -> frozenset:
    """What a snapshot reader sees: (id, embedding) pairs; empty when it finds no rows."""
    t = read_embeddings(str(out))
    if not t.num_rows:
        return frozenset()
    return frozenset(zip(t["id"].to_pylist(), (tuple(e) for e in t["embedding"].to_pylist()), strict=True))


def _overwrite_while_reading(ray_session, textures_dir, tmp_path, *, kill: bool) -> None:
    """`pipeline extract --overwrite` with a reader polling `read_embeddings` all along: every read is the
    old table or the new one, whole. With ``kill``, a first overwrite runs as a real process and is
    SIGKILLed mid-run, and the same command again resumes it."""
    from pipeline.commands.extract import extract
    from pipeline.commands.verify import verify
    from pipeline.config import ExtractConfig

    out, src = tmp_path / "out", tmp_path / "src"
    shutil.copytree(textures_dir / "brick", src / "brick")  # 8 images, a shard each
    cfg = ExtractConfig.model_validate({
        "source": {"uri": str(src), "labels": "folder", "files_per_shard": 1},
        "backbone": {"model": "tf_efficientnet_lite0", "weights": "packaged", "normalize": True},
        "output": {"uri": str(out), "rows_per_file": 1},
        "runtime": {"batch_size": 4, "progress": False}})
    _run(out, OLD, "r1")  # the live table: other rows of another spec
    old = _table(out)
    assert len(old) == len(RELS)
    reads: list[frozenset] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                reads.append(_table(out))
            except Exception as e:  # noqa: BLE001 - a read that fails is a read that saw no table
                reads.append(frozenset({("error", repr(e))}))
            time.sleep(0.05)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    at_kill = 0
    try:
        if kill:
            env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
            cmd = [sys.executable, "-m", "pipeline", "extract", "--source", str(src), "--output", str(out),
                   "--model", "tf_efficientnet_lite0", "--labels", "folder", "--batch-size", "4",
                   "--set", "source.files_per_shard=1", "--set", "output.rows_per_file=1",
                   "--set", "runtime.progress=false", "--overwrite", "--normalize"]
            proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and proc.poll() is None:
                pend = generations.pending(Ledger(str(out)))
                if pend and len(pend[0].committed()) >= 2:
                    break
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            at_kill = len(generations.pending(Ledger(str(out)))[0].committed())
            assert 2 <= at_kill < 8, f"the kill should land mid-run ({at_kill} of 8 shards)"
            time.sleep(3)  # Ray reaps the dead driver's workers
            assert _table(out) == old
        counts = extract(cfg, overwrite=True)["ledger"]  # with kill: the same command again, resuming
    finally:
        stop.set()
        thread.join(timeout=60)
    assert counts["done_before"] >= at_kill and counts["ran"] + counts["done_before"] == 8
    new = _table(out)
    assert len(new) == 8 and new != old
    odd = [r for r in reads if r not in (old, new)]
    assert len(reads) > 10 and not odd, (len(odd), len(reads), odd[:2])
    assert old in reads
    ids = sorted(pads.dataset(out / "embeddings").to_table(columns=["id"])["id"].to_pylist())
    assert len(ids) == len(set(ids)) == 8  # a glob reader too, once it is over
    assert verify(str(out))["ok"] and not generations.pending(Ledger(str(out)))


def test_readers_see_the_old_table_or_the_new_one_during_an_overwrite(ray_session, textures_dir, tmp_path):
    _overwrite_while_reading(ray_session, textures_dir, tmp_path, kill=False)


@pytest.mark.slow
def test_readers_see_the_old_table_or_the_new_one_through_a_killed_overwrite_and_its_rerun(
        ray_session, textures_dir, tmp_path):
    _overwrite_while_reading(ray_session, textures_dir, tmp_path, kill=True)
