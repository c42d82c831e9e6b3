"""``on_removed: keep``: rows of images that left the source stay in the output, their shard's entry marked
gone. Called by `Ledger.plan` (``ledger`` is that Ledger); every step is one the next plan can redo.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from pipeline import storage
from pipeline.output.layout import ERRORS_DIR, parquet_bytes


def keep_removed(ledger: Any, stale: list[dict[str, Any]], gone: list[dict[str, Any]], todo: list[Any]
                  ) -> tuple[set[str], int]:
    """on_removed=keep: a stale shard's rows of images still listed (they run again, in another shard)
    are removed; the rows of images that left the source stay, and the entry is marked gone with their
    ids. A gone entry whose images come back loses their rows the same way. Returns (keys whose entry
    was removed, entries newly marked gone)."""
    ids = {e["key"]: _ids(ledger, e) for e in stale}
    ids.update({e["key"]: list(e.get("ids") or []) for e in gone})
    wanted = {i for v in ids.values() for i in v}
    present = {m.rel for s in todo for m in s.members() if m.rel in wanted} if wanted else set()
    removed: set[str] = set()
    kept = 0
    for entry in [*stale, *gone]:
        mine = ids[entry["key"]]
        stay = [i for i in mine if i not in present]
        if not stay:
            ledger.remove_shard(entry)
            removed.add(entry["key"])
        elif len(stay) < len(mine) or entry.get("gone") is None:
            kept += entry.get("gone") is None
            _keep_rows(ledger, entry, stay, mine)
    return removed, kept


def _ids(ledger: Any, entry: dict[str, Any]) -> list[str]:
    import pyarrow.parquet as pq

    out: list[str] = []
    for rel in entry["files"]:
        with storage.open_input(ledger.uri(rel)) as f:
            out += pq.read_table(f, columns=["id"])["id"].to_pylist()
    return out


def _keep_rows(ledger: Any, entry: dict[str, Any], stay: list[str], mine: list[str]) -> None:
    """Mark a committed shard gone, keeping the rows of ``stay``; when that is fewer than all its rows
    (``mine``), its files are rewritten to those rows (renamed ``...-keptN``). Order: new files, then the
    entry, then the old files are deleted; a crash in between leaves rows that the next plan, finding
    the entry unchanged, rewrites again under the same names."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    stamp = entry.get("gone") or ledger.run_id or datetime.now(timezone.utc).isoformat()
    if len(stay) == len(mine):
        ledger.write_entry({**entry, "ids": sorted(stay), "gone": stamp})
        return
    generation = int(entry.get("kept_generation", 0)) + 1
    keep = pa.array(stay, pa.string())
    files, sizes, embedded, failed, kinds = [], {}, 0, 0, {}
    for rel in entry["files"]:
        with storage.open_input(ledger.uri(rel)) as f:
            table = pq.read_table(f)
        table = table.filter(pc.is_in(table["id"], keep))
        if not table.num_rows:
            continue
        name = re.sub(r"(-kept\d+)?\.parquet$", f"-kept{generation}.parquet", rel)
        data = parquet_bytes(table)
        storage.write_bytes(ledger.uri(name), data)
        files.append(name)
        sizes[name] = len(data)
        if rel.startswith(ERRORS_DIR + "/"):
            failed += table.num_rows
            for k in table["error"].to_pylist():
                kinds[k] = kinds.get(k, 0) + 1
        else:
            embedded += table.num_rows
    new = {**entry, "files": files, "sizes": sizes, "embedded": embedded, "failed": failed,
           "error_kinds": kinds,
           "rows": embedded + failed, "ids": sorted(stay), "kept_generation": generation, "gone": stamp}
    ledger.write_entry(new)
    for rel in entry["files"]:
        if rel not in files:
            storage.remove(ledger.uri(rel))
