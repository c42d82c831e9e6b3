"""`pipeline verify OUTPUT [--repair]`: check an output against its invariant, without running anything.

The visible Parquet files must be exactly the files of the committed shards, at the sizes they were written
(docs/operations.md, "The output as a system of record"). Every run repairs this at its start; `verify`
reports it at any time (for a reader that wants to know, or after a restore), and `--repair` makes the
same repair under the output's lease: files of no committed shard are removed, and committed shards with
missing or damaged files are forgotten, to be embedded again by the next run.
"""

from __future__ import annotations

from typing import Any

import pyarrow.compute as pc

from pipeline.commands.run import new_run_id
from pipeline.output import generations, planning
from pipeline.output.lease import Lease, LockPolicy, hold
from pipeline.output.ledger import Ledger

SHOWN = 10  # orphans and damaged shards listed in the report


def verify(output_uri: str, *, repair: bool = False, lock: LockPolicy | Lease | None = None
           ) -> dict[str, Any]:
    """The output's state against its invariant; with ``repair``, restored (under the lease). A damaged
    ledger file raises LedgerError naming it."""
    ledger = Ledger(output_uri)
    state = ledger.check_readable()
    if state is None:
        raise ValueError(f"'{output_uri}' holds no ledger (_ledger/output.json): pass the OUTPUT folder of "
                         "`pipeline extract` or `classify`")
    tables = sorted(state.get("tables") or {})
    table = ledger.index()
    pending = generations.pending_files(ledger)  # an --overwrite building the next generation
    orphans, bad = planning.differences(ledger, tables, table, also=pending)
    report: dict[str, Any] = {
        "output": output_uri, "tables": tables, "shards": table.num_rows,
        "rows": {"embedded": int(pc.sum(table["embedded"]).as_py() or 0),
                 "failed": int(pc.sum(table["failed"]).as_py() or 0)},
        "files": sum(len(files) for files in _files(table)),
        "orphans": len(orphans), "orphan_files": orphans[:SHOWN],
        "damaged_shards": len(bad), "damaged": dict(list(bad.items())[:SHOWN]),
        "staged_leftovers": len(ledger.leftover_keys()),
        "pending_files": len(pending),
        "ok": not orphans and not bad,
    }
    if repair and not (report["ok"] and not pending):
        with hold(output_uri, new_run_id(), "verify --repair", lock):
            # read again under the lease: a run that held it may have switched generations meanwhile
            ledger = Ledger(output_uri)
            tables = sorted((ledger.check_readable() or {}).get("tables") or {})
            generations.sweep(ledger, {ledger.generation})  # no run holds the lease: an overwrite given up
            table = ledger.index()
            removed, forgotten = planning.reconcile(ledger, tables, table)
            ledger.fold(drop=forgotten)
        report["repaired"] = {"orphans_removed": len(removed), "shards_forgotten": len(forgotten)}
    return report


def _files(table: Any) -> list[list[str]]:
    import json

    return [json.loads(e)["files"] for e in table["entry"].to_pylist()]


def format_verify(r: dict[str, Any]) -> str:
    lines = [f"{r['output']}: {r['shards']} committed shards, {r['rows']['embedded']} rows, "
             f"{r['rows']['failed']} errors in {r['files']} files ({', '.join(r['tables'])})"]
    if r["ok"]:
        lines.append("  ok: the visible files are exactly the committed shards' files")
    for rel in r["orphan_files"]:
        lines.append(f"  orphan:  {rel} (no committed shard lists it)")
    if r["orphans"] > len(r["orphan_files"]):
        lines.append(f"  ... {r['orphans'] - len(r['orphan_files'])} more orphans")
    for key, files in r["damaged"].items():
        lines.append(f"  damaged: shard {key}: {', '.join(files)} missing or not the size it was written at")
    if r["damaged_shards"] > len(r["damaged"]):
        lines.append(f"  ... {r['damaged_shards'] - len(r['damaged'])} more damaged shards")
    if r.get("pending_files"):
        lines.append(f"  pending: {r['pending_files']} files of an --overwrite in progress or interrupted "
                     "(readers see the live generation; rerunning the overwrite resumes it, --repair "
                     "removes it)")
    if r["staged_leftovers"]:
        lines.append(f"  staged:  {r['staged_leftovers']} shards of an interrupted run (the next run "
                     "finishes or drops them)")
    if "repaired" in r:
        rep = r["repaired"]
        lines.append(f"  repaired: {rep['orphans_removed']} orphan files removed, {rep['shards_forgotten']} "
                     "damaged shards forgotten: rerun the command that wrote the output to embed them again")
    elif not r["ok"]:
        lines.append("  pass --repair to remove the orphans and forget the damaged shards (the next run of "
                     "the command that wrote the output embeds them again)")
    return "\n".join(lines)
