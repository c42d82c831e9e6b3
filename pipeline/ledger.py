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
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from pipeline import storage

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
