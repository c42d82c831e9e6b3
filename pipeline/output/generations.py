"""``--overwrite`` without a moment where the output is empty: the new table is built as a generation
beside the live one and switched to when every shard is committed (docs/operations.md, "The output as a
system of record").

A generation is a ledger folder, ``_ledger/gen-<tag>/`` (an output never overwritten keeps its ledger in
``_ledger/`` itself, generation ""), and the table files its shards list, named ``...-g<tag>.parquet`` so
that they never collide with the live generation's. ``_ledger/output.json`` names the live generation; a
pending one holds its state in ``gen-<tag>/pending.json``. The switch is the one write of output.json;
what follows it (removing the old generation's files and ledger) is repeated by the next plan if a crash
cuts it short, since those files then belong to no committed shard. An interrupted overwrite is resumed
by the next run that asks for the same output (``--overwrite`` again, or a plain run of its settings);
any other run removes it.

Ray-free; the functions take the output's `pipeline.output.ledger.Ledger`.
"""

from __future__ import annotations

import contextlib
import posixpath
from typing import Any

from pipeline import storage
from pipeline.output.layout import LEDGER_DIR, LedgerError

PENDING = "pending.json"  # the state of a generation that --overwrite is building, until it is switched to
GEN_PREFIX = "gen-"
LEGACY = ("committed.parquet", "shards", "parts")  # generation "": the ledger in _ledger/ itself


def _children(output_uri: str) -> list[str]:
    """The names in the output's _ledger/ folder."""
    root = storage.join(output_uri, LEDGER_DIR)
    if not storage.exists(root):
        return []
    fs, path = storage.get_fs(root)
    try:
        children = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted({posixpath.basename(c.rstrip("/")) for c in children})


def pending(ledger: Any) -> list[Any]:
    """The pending generations of the output (an overwrite running or interrupted), as Ledgers."""
    live = live_generation(ledger.at(None))
    out = []
    for name in _children(ledger.output_uri):
        if name.startswith(GEN_PREFIX) and name[len(GEN_PREFIX):] != live:
            gen = ledger.at(name[len(GEN_PREFIX):], pending=True)
            if storage.exists(gen.dir(PENDING)):
                out.append(gen)
    return out


def live_generation(ledger: Any) -> str | None:
    """The live generation's tag; None when output.json cannot be read (a damaged output)."""
    try:
        return ledger.generation
    except LedgerError:
        return None


def adoptable(ledger: Any, want: dict[str, Any], sharding: dict[str, Any] | None, scope: str,
              normalise: Any) -> Any | None:
    """A pending generation made for exactly this run's settings (``want``, ``sharding``) and the same
    part of the source (``scope``), to resume."""
    for gen in pending(ledger):
        try:
            state = normalise(gen.state())
        except (LedgerError, ValueError, TypeError, KeyError):
            continue
        if _same(state, want, sharding, scope):
            return gen
    return None


def _same(state: dict[str, Any] | None, want: dict[str, Any], sharding: dict[str, Any] | None,
          scope: str) -> bool:
    state = state or {}
    return ({k: state.get(k) for k in want} == want and state.get("sharding") == sharding
            and state.get("scope", "") == scope)


def switched(ledger: Any, live: str | None, want: dict[str, Any], sharding: dict[str, Any] | None,
             scope: str, normalise: Any) -> Any | None:
    """The live generation when an overwrite with these settings switched to it and was killed before it
    removed its pending.json (its rerun finds everything done: the old files go as orphans); else None."""
    if not live:
        return None
    gen = ledger.at(live, pending=True)
    try:
        state = normalise(gen.state())
    except (LedgerError, ValueError, TypeError, KeyError):
        return None
    if state is None or not _same(state, want, sharding, scope):
        return None
    storage.remove(gen.dir(PENDING))
    return ledger.at(live)


def drop_pending(ledger: Any) -> None:
    """Remove the pending generations, their files first (an output that has no live table yet: its
    files would otherwise read as files no run of this tool recorded)."""
    for gen in pending(ledger):
        with contextlib.suppress(LedgerError):
            for rel in gen.files():
                storage.remove(gen.uri(rel))
        storage.remove_tree(gen.dir())


def sweep(ledger: Any, keep: set[str | None]) -> None:
    """Remove the ledger folders of generations not in ``keep`` (an overwrite given up, an old generation
    whose removal a crash cut short); their table files are left for `planning.reconcile`, which removes
    visible files of no committed shard."""
    if None in keep:  # the live generation is unknown (output.json damaged): nothing is removed
        return
    for name in _children(ledger.output_uri):
        gen = name[len(GEN_PREFIX):] if name.startswith(GEN_PREFIX) else ("" if name in LEGACY else None)
        if gen is not None and gen not in keep:
            storage.remove_tree(storage.join(ledger.output_uri, LEDGER_DIR, name))


def live_files(ledger: Any) -> set[str] | None:
    """The files the live generation lists, seen from a pending one (they stay while it is built); None
    when the live ledger is damaged (then no file may be taken for an orphan before the switch)."""
    if not ledger.pending:
        return set()
    try:
        return ledger.at(None).files()
    except LedgerError:
        return None


def pending_files(ledger: Any) -> set[str]:
    """The files the pending generations list (an overwrite in progress: not yet visible to snapshot
    readers, not orphans either)."""
    files: set[str] = set()
    for gen in pending(ledger):
        with contextlib.suppress(LedgerError):
            files |= gen.files()
    return files


def switch(ledger: Any) -> dict[str, Any]:
    """Make the pending generation ``ledger`` the live one (one write of output.json), then remove the old
    generation's files and ledger folder. Returns the old generation's state; the caller then removes any
    other file of no committed shard (`planning.reconcile`)."""
    old = ledger.at(None)
    try:
        old_state = old.live_state() or {}
        old_files = old.files()
    except LedgerError:  # damaged: what it listed is found as files of no committed shard afterwards
        old_state, old_files = {}, set()
    state = {k: v for k, v in (ledger.state() or {}).items() if k != "generation"}
    live = ledger.at(ledger.generation)
    live.write_state(state)  # the switch: readers now read this generation
    for rel in sorted(old_files - live.files()):
        storage.remove(live.uri(rel))
    sweep(live, {ledger.generation})
    storage.remove(live.dir(PENDING))
    return old_state


def new_generation() -> str:
    """A generation tag: sorts by time, unique across runs."""
    import secrets
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S") + secrets.token_hex(3)
