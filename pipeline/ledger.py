"""The shard ledger: which input shards an output already holds, committed one shard at a time.

Ray-free. Layout under an output URI:

    _ledger/output.json             what the output holds: source URI and the spec of each table
    _ledger/shards/<key>.json       one per committed shard: version, row counts, the files that hold its rows
    _ledger/parts/<key>/total.json  written by the read task once it has read the whole shard: row count
    _ledger/parts/<key>/<row>.json  written by a write task: the rows (intervals) a staged file holds
    _staging/<table>/...            files written but not yet visible

Rows are written under ``_staging/`` (readers skip names starting with '_'). A shard is committed when its
parts cover rows ``0..total-1`` exactly: its files are moved into place, then ``shards/<key>.json`` is
written, then its parts are dropped. Any process may commit (a write task, the read task, the driver at the
end of a run); every step is idempotent, so a commit interrupted anywhere is finished by the next attempt.
A shard without a ledger entry has no visible rows except in the window of an interrupted commit, which
the next run completes before it starts work.

The protocol has exactly four steps, each a method here: ``plan`` (the driver, before a run: what is done,
what to redo, what to refuse), ``shard_read`` (the read task, when it has read a whole shard),
``parts_written`` (a write task, after its staged files are written) and ``finish`` (the driver, after the
run: every shard it ran must be committed).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.spec import dict_differences

LEDGER_DIR = "_ledger"
STAGING_DIR = "_staging"
_TOTAL = "total.json"


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


def clear_or_refuse(output_uri: str, tables: list[str], overwrite: bool, what: str = "") -> None:
    """Existing files under the output's tables are removed with ``overwrite`` and refused without it."""
    existing = [f for sub in tables if storage.exists(storage.join(output_uri, sub))
                for f in storage.list_files(storage.join(output_uri, sub))]
    if not existing:
        return
    if not overwrite:
        raise ConfigError(
            f"output '{output_uri}' already holds {len(existing)} files under {', '.join(tables)}{what}: "
            "pass --overwrite to replace them, or choose a new --output")
    for sub in tables:
        storage.remove_tree(storage.join(output_uri, sub))


@dataclass
class Plan:
    """What a run has to do at an output: the shards to run and the counts the run record reports."""

    todo: list[Any]  # the listed shards (sources.Shard) that are not committed
    listed: int
    done_before: int
    recovered: int  # shards of an interrupted run committed from their staged parts
    removed_stale: int  # committed shards that changed or left the source, their rows removed
    rows_before: dict[str, int]  # rows (embedded, failed) the output held before this run

    def counts(self) -> dict[str, Any]:
        return {"listed": self.listed, "to_run": len(self.todo), "done_before": self.done_before,
                "recovered": self.recovered, "removed_stale": self.removed_stale}


class LedgerError(RuntimeError):
    """The ledger and the files disagree in a way a rerun cannot repair by itself."""


class Ledger:
    """The ledger of one output URI."""

    def __init__(self, output_uri: str, run_id: str = "") -> None:
        self.output_uri = output_uri
        self.run_id = run_id

    # -- paths ---------------------------------------------------------------------------------------

    def uri(self, *parts: str) -> str:
        return storage.join(self.output_uri, *parts)

    def _shard_uri(self, key: str) -> str:
        return self.uri(LEDGER_DIR, "shards", f"{key}.json")

    def _parts_uri(self, key: str) -> str:
        return self.uri(LEDGER_DIR, "parts", key)

    def _read_json(self, uri: str) -> Any:
        return json.loads(storage.read_bytes(uri))

    def _write_json(self, uri: str, obj: Any) -> None:
        storage.write_bytes(uri, json.dumps(obj, indent=1, sort_keys=True).encode())

    # -- what the output holds -----------------------------------------------------------------------

    def state(self) -> dict[str, Any] | None:
        uri = self.uri(LEDGER_DIR, "output.json")
        return self._read_json(uri) if storage.exists(uri) else None

    def write_state(self, state: dict[str, Any]) -> None:
        self._write_json(self.uri(LEDGER_DIR, "output.json"), state)

    def committed(self, threads: int = 16) -> dict[str, dict[str, Any]]:
        """Every committed shard's entry, by key."""
        root = self.uri(LEDGER_DIR, "shards")
        if not storage.exists(root):
            return {}
        files = [f for f in storage.list_files(root) if f.rel.endswith(".json")]
        with ThreadPoolExecutor(max(1, min(threads, len(files)))) as pool:
            entries = list(pool.map(lambda f: self._read_json(f.uri), files))
        return {e["key"]: e for e in entries}

    def entry(self, key: str) -> dict[str, Any] | None:
        uri = self._shard_uri(key)
        return self._read_json(uri) if storage.exists(uri) else None

    # -- step 1, the driver: plan a run -----------------------------------------------------------------

    def plan(self, source_uri: str, tables: dict[str, dict[str, Any]], shards: list[Any], *,
             overwrite: bool) -> Plan:
        """Decide what a run has to do here. ``tables``: subdir -> the spec its rows are made with
        (without library versions).

        A rerun resumes: committed shards whose version is unchanged are skipped, and leftovers of an
        interrupted run are committed when complete or dropped. Shards that changed or left the source lose
        their old rows. An output made from another source or with another spec is refused unless
        ``overwrite``, which clears it first.
        """
        from pipeline.sink import ERRORS_DIR

        storage.check_writable(self.output_uri)
        want = {"source": source_uri, "tables": tables}
        state = self.state()
        subdirs = [*tables, ERRORS_DIR]
        if overwrite:
            self.clear()
            clear_or_refuse(self.output_uri, subdirs, overwrite=True)
        elif state is None:
            clear_or_refuse(self.output_uri, subdirs, overwrite=False,
                            what=" that no run of this tool recorded")
        elif state != want:
            diff = dict_differences(state, want)
            raise ConfigError(
                f"output '{self.output_uri}' holds rows made differently ({'; '.join(diff[:3])}"
                f"{'; ...' if len(diff) > 3 else ''}): pass --overwrite to replace them, or choose a new "
                "--output")
        self.write_state(want)

        listed = {s.key: s for s in shards}
        committed = {} if overwrite else self.committed()
        recovered = 0
        for key in self.leftover_keys():
            if key in listed and key not in committed:
                entry = self.try_commit(key, version=listed[key].version)
                if entry:
                    committed[key] = entry
                    recovered += 1
        self.clear_staging()
        stale = [e for k, e in committed.items() if k not in listed or e["version"] != listed[k].version]
        for entry in stale:
            self.remove_shard(entry)
            del committed[entry["key"]]
        done = list(committed.values())
        return Plan(todo=[s for s in shards if s.key not in committed], listed=len(shards),
                    done_before=len(done), recovered=recovered, removed_stale=len(stale),
                    rows_before={"embedded": sum(e["embedded"] for e in done),
                                 "failed": sum(e["failed"] for e in done)})

    # -- steps 2 and 3, in Ray tasks: record work and commit what is complete ----------------------------

    def shard_read(self, key: str, version: str, rows: int) -> None:
        """The read task has read the whole shard: its row count is final; commit if all rows are in."""
        self.record_total(key, version, rows)
        self.try_commit(key, version)

    def parts_written(self, parts: list[dict[str, Any]]) -> None:
        """A write task has written these staged parts (ParquetSink.write): record them, commit the shards
        they complete."""
        for part in parts:
            self.record_part(part)
        for key in {p["shard"] for p in parts}:
            self.try_commit(key)

    # -- step 4, the driver: check the run ------------------------------------------------------------

    def finish(self, keys: list[str]) -> None:
        """Commit what is complete of the shards a run ran; RuntimeError naming the rerun for the rest."""
        unfinished = [k for k in keys if self.entry(k) is None and self.try_commit(k) is None]
        if unfinished:
            raise RuntimeError(
                f"{len(unfinished)} of {len(keys)} shards did not commit (first: {unfinished[0]}); "
                "rerun the same command to finish them")

    # -- recording work ------------------------------------------------------------------------------

    def record_total(self, key: str, version: str, rows: int) -> None:
        """Called by the read task after it has read the whole shard."""
        self._write_json(storage.join(self._parts_uri(key), _TOTAL), {"version": version, "rows": rows})

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
        files = []
        for p in sorted(parts, key=lambda p: p["first"]):
            for staged, final in p["files"]:
                storage.move(self.uri(staged), self.uri(final))
                files.append(final)
        kinds: dict[str, int] = {}
        for p in parts:
            for k, v in p["error_kinds"].items():
                kinds[k] = kinds.get(k, 0) + v
        entry = {
            "key": key,
            "version": total["version"],
            "rows": total["rows"],
            "embedded": sum(p["embedded"] for p in parts),
            "failed": sum(p["failed"] for p in parts),
            "error_kinds": kinds,
            "files": files,
            "run_id": self.run_id,
            "committed_at": datetime.now(timezone.utc).isoformat(),
        }
        self._write_json(self._shard_uri(key), entry)
        storage.remove_tree(self._parts_uri(key))
        return entry

    # -- cleaning up ---------------------------------------------------------------------------------

    def leftover_keys(self) -> list[str]:
        """Shards with staged parts from an earlier, interrupted run."""
        root = self.uri(LEDGER_DIR, "parts")
        if not storage.exists(root):
            return []
        return sorted({f.rel.split("/", 1)[0] for f in storage.list_files(root)})

    def clear_staging(self) -> None:
        """Drop every uncommitted part and staged file (only the driver, before a run starts)."""
        storage.remove_tree(self.uri(LEDGER_DIR, "parts"))
        storage.remove_tree(self.uri(STAGING_DIR))

    def remove_shard(self, entry: dict[str, Any]) -> None:
        """Remove a committed shard's rows and its entry (the shard changed or left the source)."""
        for rel in entry["files"]:
            storage.remove(self.uri(rel))
        storage.remove(self._shard_uri(entry["key"]))

    def clear(self) -> None:
        storage.remove_tree(self.uri(LEDGER_DIR))
        storage.remove_tree(self.uri(STAGING_DIR))
