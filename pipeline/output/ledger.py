"""The shard ledger: which input shards an output already holds, committed one shard at a time.

Ray-free. Layout under an output URI:

    _ledger/output.json             what the output holds: source root, the spec of each table, how loose
                                    files are cut into shards (scheme and folder depth)
    _ledger/committed.parquet       the committed shards, compacted: one row per shard (key, version, first
                                    path, row counts, gone, and the whole entry as JSON)
    _ledger/shards/<key>.json       one per shard committed since the last compaction: version, row counts,
                                    the files that hold its rows, its first path
    _ledger/parts/<key>/total.json  written by the read task once it has read the whole shard: row count
    _ledger/parts/<key>/<row>.json  written by a write task: the rows (intervals) a staged file holds
    _staging/<table>/...            files written but not yet visible

An output that ``--overwrite`` rebuilt keeps these (all but output.json) under ``_ledger/gen-<tag>/``, and
output.json names the live generation (``"generation": "<tag>"``). ``--overwrite`` builds the new generation
beside the live one, its files named ``...-g<tag>.parquet`` and its state in ``gen-<tag>/pending.json``, and
switches by rewriting output.json once every shard is committed (`switch`); then the old generation's files
and ledger are removed. A snapshot reader (pipeline/output/reader.py) sees the old table or the new one.

Rows are written under ``_staging/`` (readers skip names starting with '_'). A shard is committed when its
parts cover rows ``0..total-1`` exactly: its files are moved into place, then ``shards/<key>.json`` is
written, then its parts are dropped. Any process may commit (a write task, the read task, the driver at the
end of a run); every step is idempotent, so a commit interrupted anywhere is finished by the next attempt.
A shard without a ledger entry has no visible rows except in the window of an interrupted commit, which
the next run completes before it starts work.

The committed entries are what ``committed.parquet`` holds with the ``shards/*.json`` written since folded
over it (a JSON entry wins). The driver folds them at the end of each run and after planning, so starting a
run reads one Parquet file and the few JSON entries of an interrupted run, not one object per shard. Outputs
written before compaction existed hold JSON entries only; they are read as they are and folded by the next
run.

The protocol has exactly four steps, each a method here: ``plan`` (the driver, before a run: what is done,
what to redo, what to refuse, what to remove or keep of what left the source), ``shard_read`` (the read
task, when it has read a whole shard), ``parts_written`` (a write task, after its staged files are written)
and ``finish`` (the driver, after the run: every shard it ran must be committed; then the ledger is folded).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from pipeline import storage
from pipeline.output import generations, planning
from pipeline.output.generations import GEN_PREFIX, PENDING
from pipeline.output.layout import LEDGER_DIR, STAGING_DIR, LedgerError, write_parquet
from pipeline.output.planning import Work, clear_or_refuse  # noqa: F401 - the ledger's API

COMPACT = "committed.parquet"
STATE = "output.json"
_TOTAL = "total.json"
_COMPACT_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False), pa.field("version", pa.string()),
    pa.field("first", pa.string()), pa.field("embedded", pa.int64()), pa.field("failed", pa.int64()),
    pa.field("gone", pa.string()), pa.field("entry", pa.string(), nullable=False),
])


def _entries_table(entries: list[dict[str, Any]]) -> pa.Table:
    return pa.table({
        "key": [e["key"] for e in entries], "version": [e.get("version") for e in entries],
        "first": [e.get("first") for e in entries], "embedded": [e.get("embedded", 0) for e in entries],
        "failed": [e.get("failed", 0) for e in entries], "gone": [e.get("gone") for e in entries],
        "entry": [json.dumps(e, sort_keys=True) for e in entries],
    }, schema=_COMPACT_SCHEMA)


def intervals(rows: list[int]) -> list[list[int]]:
    """Sorted row numbers -> half-open runs [[start, end), ...]."""
    out: list[list[int]] = []
    for r in rows:
        if out and r == out[-1][1]:
            out[-1][1] = r + 1
        else:
            out.append([r, r + 1])
    return out


def coverage(parts: list[list[list[int]]], total: int) -> str:
    """'complete', 'incomplete' or 'overlap' for the row intervals of a shard's parts."""
    runs = sorted(iv for p in parts for iv in p)
    pos = 0
    for start, end in runs:
        if start < pos:
            return "overlap"
        if start > pos:
            return "incomplete"
        pos = end
    return "complete" if pos == total else "incomplete"


class Ledger:
    """The ledger of one output URI: its live generation, or with ``pending`` one that ``--overwrite``
    builds. ``generation`` None: the live one, read from output.json when first needed (the driver and
    readers); Ray tasks are given it."""

    def __init__(self, output_uri: str, run_id: str = "", generation: str | None = None,
                 pending: bool = False) -> None:
        self.output_uri = output_uri
        self.run_id = run_id
        self._generation = generation
        self.pending = pending

    def __repr__(self) -> str:
        return f"Ledger({self.output_uri!r}, generation={self._generation!r}, pending={self.pending})"

    @property
    def generation(self) -> str:
        if self._generation is None:
            self._generation = str((self.live_state() or {}).get("generation") or "")
        return self._generation

    def with_run(self, run_id: str) -> Ledger:
        """This ledger as the run ``run_id`` commits to it."""
        return Ledger(self.output_uri, run_id, self.generation, self.pending)

    def at(self, generation: str | None, pending: bool = False) -> Ledger:
        """The ledger of another generation of this output (None: the live one)."""
        return Ledger(self.output_uri, self.run_id, generation, pending)

    # -- paths ---------------------------------------------------------------------------------------

    def uri(self, *parts: str) -> str:
        return storage.join(self.output_uri, *parts)

    def dir(self, *parts: str) -> str:
        """A path in this generation's ledger folder."""
        gen = self.generation
        return self.uri(LEDGER_DIR, *([GEN_PREFIX + gen] if gen else []), *parts)

    def _shard_uri(self, key: str) -> str:
        return self.dir("shards", f"{key}.json")

    def _parts_uri(self, key: str) -> str:
        return self.dir("parts", key)

    def write_entry(self, entry: dict[str, Any]) -> None:
        """Replace a committed shard's entry (on_removed=keep marks it gone)."""
        self._write_json(self._shard_uri(entry["key"]), entry)

    def _read_json(self, uri: str) -> Any:
        return json.loads(storage.read_bytes(uri))

    def _write_json(self, uri: str, obj: Any) -> None:
        storage.write_json(uri, obj, indent=1, sort_keys=True)

    # -- what the output holds -----------------------------------------------------------------------

    def _damaged(self, uri: str, err: BaseException) -> LedgerError:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return LedgerError(
            f"the output's ledger file {uri} is damaged ({first}): restore it from a backup or an object "
            "version if you have one; otherwise pass --overwrite to rebuild the output (every image is "
            "embedded again)")

    def _parsed(self, uri: str, read: Any, errors: tuple[type[BaseException], ...] = (ValueError,)) -> Any:
        """``read()``; a ledger file that does not parse (``errors``) is a LedgerError naming it and the fix,
        while storage errors and faults pass as they are."""
        try:
            return read()
        except (storage.StorageError, storage.StorageFault):
            raise
        except errors as e:
            raise self._damaged(uri, e) from None

    def _object(self, uri: str, *keys: str) -> dict[str, Any]:
        """A JSON object holding ``keys``, else ValueError."""
        obj = self._read_json(uri)
        if not isinstance(obj, dict) or any(k not in obj for k in keys):
            raise ValueError(f"not a JSON object with {', '.join(keys)}" if keys else "not a JSON object")
        return obj

    def live_state(self) -> dict[str, Any] | None:
        """output.json: what the output holds, and its live generation."""
        uri = self.uri(LEDGER_DIR, STATE)
        if not storage.exists(uri):
            return None
        return self._parsed(uri, lambda: self._object(uri))

    def _state_uri(self) -> str:
        return self.dir(PENDING) if self.pending else self.uri(LEDGER_DIR, STATE)

    def state(self) -> dict[str, Any] | None:
        """What this generation holds (output.json, or a pending generation's pending.json)."""
        if not self.pending:
            return self.live_state()
        uri = self._state_uri()
        return self._parsed(uri, lambda: self._object(uri)) if storage.exists(uri) else None

    def write_state(self, state: dict[str, Any]) -> None:
        gen = {"generation": self.generation} if self.generation and not self.pending else {}
        self._write_json(self._state_uri(), {**state, **gen})

    def _loose(self, threads: int = 16) -> dict[str, dict[str, Any]]:
        """The JSON entries written since the last fold, by key."""
        root = self.dir("shards")
        if not storage.exists(root):
            return {}
        files = [f for f in storage.list_files(root) if f.rel.endswith(".json")]
        if not files:
            return {}
        with ThreadPoolExecutor(max(1, min(threads, len(files)))) as pool:
            entries = list(pool.map(
                lambda f: self._parsed(f.uri, lambda: self._object(f.uri, "key", "files")), files))
        return {e["key"]: e for e in entries}

    def _compact(self) -> pa.Table:
        import pyarrow.parquet as pq

        uri = self.dir(COMPACT)
        if not storage.exists(uri):
            return _COMPACT_SCHEMA.empty_table()
        def read() -> pa.Table:
            with storage.open_input(uri) as f:
                return pq.read_table(f).cast(_COMPACT_SCHEMA)

        return self._parsed(uri, read, (pa.ArrowException, ValueError, KeyError))

    def check_readable(self) -> dict[str, Any] | None:
        """LedgerError naming the file and the fix when a ledger file is damaged; cheap (the compacted
        table's footer, the few loose entries), so that a run can refuse before it builds anything.
        Returns the output's state (`state`)."""
        import pyarrow.parquet as pq

        state = self.state()
        uri = self.dir(COMPACT)
        if storage.exists(uri):
            def footer() -> Any:
                with storage.open_input(uri) as f:
                    return pq.read_metadata(f)

            self._parsed(uri, footer, (pa.ArrowException, ValueError, OSError))
        self._loose()
        return state

    def index(self, loose: dict[str, dict[str, Any]] | None = None) -> pa.Table:
        """Every committed shard, one row each (the compacted table's columns): the compacted table with
        the JSON entries committed since folded over it."""
        import pyarrow.compute as pc

        table = self._compact()
        loose = self._loose() if loose is None else loose
        if loose:
            extra = _entries_table(list(loose.values()))
            table = pa.concat_tables([table.filter(pc.invert(pc.is_in(table["key"], extra["key"]))), extra])
        return table

    def committed(self) -> dict[str, dict[str, Any]]:
        """Every committed shard's entry, by key."""
        t = self.index()
        return {k: json.loads(e) for k, e in zip(t["key"].to_pylist(), t["entry"].to_pylist(), strict=True)}

    def files(self) -> set[str]:
        """The files every committed shard lists (paths relative to the output)."""
        return {f for e in self.committed().values() for f in e["files"]}

    def entry(self, key: str) -> dict[str, Any] | None:
        uri = self._shard_uri(key)
        if storage.exists(uri):
            return self._read_json(uri)
        import pyarrow.compute as pc

        rows = self._compact().filter(pc.equal(pc.field("key"), key))
        return json.loads(rows["entry"][0].as_py()) if rows.num_rows else None

    def fold(self, drop: set[str] | frozenset[str] = frozenset()) -> pa.Table:
        """Write the committed entries (less ``drop``) into ``committed.parquet``, then delete the JSON
        entries folded into it; only the driver calls it, when no task can commit. Returns the table
        written."""
        import pyarrow.compute as pc

        loose = self._loose()
        table = self.index(loose)
        if drop:
            table = table.filter(pc.invert(pc.is_in(table["key"], pa.array(sorted(drop), pa.string()))))
        if loose or drop or not storage.exists(self.dir(COMPACT)):
            write_parquet(self.dir(COMPACT), table.sort_by("key"))
            for key in loose:
                storage.remove(self._shard_uri(key))
        return table

    # -- step 1, the driver: plan a run (pipeline/output/planning.py) ------------------------------------

    def plan(self, source_uri: str, tables: dict[str, dict[str, Any]], shards: list[Any], *,
             overwrite: bool, scope: str = "", on_removed: str = "delete",
             sharding: dict[str, Any] | None = None) -> Work:
        """What a run has to do here (`pipeline.output.planning.plan`)."""
        return planning.plan(self, source_uri, tables, shards, overwrite=overwrite, scope=scope,
                             on_removed=on_removed, sharding=sharding)

    # -- steps 2 and 3, in Ray tasks: record work and commit what is complete ----------------------------

    def shard_read(self, key: str, version: str, rows: int, first: str | None = None) -> None:
        """The read task has read the whole shard: its row count is final; commit if all rows are in.
        ``first``: the shard's first path, which places it under a prefix of the source root."""
        self.record_total(key, version, rows, first)
        self.try_commit(key, version)

    def parts_written(self, parts: list[dict[str, Any]]) -> None:
        """A write task has written these staged parts (ParquetSink.write): record them, commit the shards
        they complete."""
        for part in parts:
            self.record_part(part)
        for key in {p["shard"] for p in parts}:
            self.try_commit(key)

    # -- step 4, the driver: check the run ------------------------------------------------------------

    def finish(self, keys: list[str], tables: list[str] | None = None) -> None:
        """Commit what is complete of the shards a run ran, then fold the ledger; RuntimeError naming the
        rerun for the rest. With ``tables``, then checks the invariant: the visible files are exactly the
        committed shards' (LedgerError otherwise: the next run repairs it)."""
        loose = self._loose()
        unfinished = [k for k in keys if k not in loose and self.try_commit(k) is None]
        table = self.fold()
        if unfinished:
            raise RuntimeError(
                f"{len(unfinished)} of {len(keys)} shards did not commit (first: {unfinished[0]}); "
                "rerun the same command to finish them"
                + (" (the output stays as it was until they are)" if self.pending else ""))
        if self.pending:  # an overwrite: switch readers to the new generation, remove the old one
            old_state = generations.switch(self)
            self.pending = False
            old_tables = list(old_state.get("tables") or {})
            planning.reconcile(self, list(dict.fromkeys([*(tables or []), *old_tables])), self.index())
        if tables is not None:
            orphans, bad = planning.differences(self, tables, table)
            if orphans or bad:
                first = orphans[0] if orphans else next(iter(bad.values()))[0]
                raise LedgerError(
                    f"after the run, {len(orphans)} visible files belong to no committed shard and "
                    f"{len(bad)} committed shards miss files or hold damaged ones (first: {first}); was "
                    "another process writing the output? Rerun the same command: it removes the first and "
                    "runs the second again")

    # -- recording work ------------------------------------------------------------------------------

    def record_total(self, key: str, version: str, rows: int, first: str | None = None) -> None:
        """Called by the read task after it has read the whole shard."""
        first = storage.printable_name(first)  # the ledger's Parquet holds UTF-8 only
        total = {"version": version, "rows": rows, **({"first": first} if first is not None else {})}
        self._write_json(storage.join(self._parts_uri(key), _TOTAL), total)

    def record_part(self, part: dict[str, Any]) -> None:
        """Called by a write task after its staged files are written (see ParquetSink.write)."""
        name = f"{part['first']:09d}.json"
        self._write_json(storage.join(self._parts_uri(part["shard"]), name), part)

    # -- committing ----------------------------------------------------------------------------------

    def _parts(self, key: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        root = self._parts_uri(key)
        if not storage.exists(root):
            return None, []
        total, parts = None, []
        for f in storage.list_files(root):
            obj = self._read_json(f.uri)
            if f.rel == _TOTAL:
                total = obj
            else:
                parts.append(obj)
        return total, parts

    def try_commit(self, key: str, version: str | None = None) -> dict[str, Any] | None:
        """Commit the shard if all its rows are staged; returns its ledger entry, or None when it is not
        complete (or another process committed it meanwhile). ``version`` guards against leftovers of an
        older version of the shard."""
        try:
            total, parts = self._parts(key)
        except storage.StorageError:
            done = self.entry(key)  # the parts vanished: a concurrent commit finished first
            return done if done and (version is None or done["version"] == version) else None
        if total is None or (version is not None and total["version"] != version):
            return None
        state = coverage([p["rows"] for p in parts], total["rows"])
        if state != "complete":
            if state == "overlap":
                raise LedgerError(f"shard {key}: staged parts overlap; rerun to redo the shard")
            return None
        files, sizes = [], {}
        for p in sorted(parts, key=lambda p: p["first"]):
            for staged, final, *size in p["files"]:
                storage.move(self.uri(staged), self.uri(final))
                files.append(final)
                if size:
                    sizes[final] = size[0]
        kinds: dict[str, int] = {}
        for p in parts:
            for k, v in p["error_kinds"].items():
                kinds[k] = kinds.get(k, 0) + v
        entry = {
            "key": key,
            "version": total["version"],
            **({"first": total["first"]} if "first" in total else {}),
            "rows": total["rows"],
            "embedded": sum(p["embedded"] for p in parts),
            "failed": sum(p["failed"] for p in parts),
            "error_kinds": kinds,
            "files": files,
            **({"sizes": sizes} if sizes else {}),
            "run_id": self.run_id,
            "committed_at": datetime.now(timezone.utc).isoformat(),
        }
        self._write_json(self._shard_uri(key), entry)
        storage.remove_tree(self._parts_uri(key))
        return entry

    # -- cleaning up ---------------------------------------------------------------------------------

    def leftover_keys(self) -> list[str]:
        """Shards with staged parts from an earlier, interrupted run."""
        root = self.dir("parts")
        if not storage.exists(root):
            return []
        return sorted({f.rel.split("/", 1)[0] for f in storage.list_files(root)})

    def clear_staging(self) -> None:
        """Drop every uncommitted part and staged file (only the driver, before a run starts)."""
        storage.remove_tree(self.dir("parts"))
        storage.remove_tree(self.uri(STAGING_DIR))

    def remove_shard(self, entry: dict[str, Any]) -> None:
        """Remove a committed shard's rows and its JSON entry (the shard changed or left the source); the
        caller folds the ledger without it."""
        for rel in entry["files"]:
            storage.remove(self.uri(rel))
        storage.remove(self._shard_uri(entry["key"]))
