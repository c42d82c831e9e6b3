"""Planning a run at an output (`Ledger.plan`), and the invariant that readers see exactly the files of the
committed shards: what a run has to do, the output's state checked against this run's, and the repair of
what a crash or a damaged file left (docs/operations.md, "The output as a system of record").

Ray-free; the functions take the output's `pipeline.output.ledger.Ledger`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.output import generations
from pipeline.output.kept import keep_removed
from pipeline.output.layout import ERRORS_DIR
from pipeline.output.spec import EmbeddingSpec, dict_differences


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
class Work:
    """What a run has to do at an output: the shards to run and the counts the run record reports."""

    todo: list[Any]  # the listed shards (sources.Shard) that are not committed
    listed: int
    done_before: int
    recovered: int  # shards of an interrupted run committed from their staged parts
    removed_stale: int  # committed shards that changed or left the source, their rows removed
    rows_before: dict[str, int]  # rows (embedded, failed) the output held before this run
    kept: int = 0  # shards that left the source whose rows stay (on_removed=keep), marked gone this run
    scope: str = ""  # the prefix under the source root this run read ('' for all of it)
    orphans_removed: int = 0  # visible files no committed shard listed (an interrupted commit's), removed
    damaged: int = 0  # committed shards whose files were missing or not as written: forgotten, to run again
    ledger: Any = None  # the ledger the run commits to: the live generation's, or one --overwrite builds

    def counts(self) -> dict[str, Any]:
        return {"listed": self.listed, "to_run": len(self.todo), "done_before": self.done_before,
                "recovered": self.recovered, "removed_stale": self.removed_stale, "kept_removed": self.kept,
                "scope": self.scope, "orphans_removed": self.orphans_removed, "damaged": self.damaged,
                **({"generation": self.ledger.generation} if self.ledger is not None and self.ledger.pending
                   else {})}


def plan(ledger: Any, source_uri: str, tables: dict[str, dict[str, Any]], shards: list[Any], *,
         overwrite: bool, scope: str = "", on_removed: str = "delete",
         sharding: dict[str, Any] | None = None) -> Work:
    """Decide what a run has to do here. ``tables``: subdir -> the spec its rows are made with
    (without library versions); ``scope``: the prefix under the source root this run listed (committed
    shards outside it are left alone); ``sharding``: how loose files were cut into shards (scheme and
    folder depth), None for one shard per file.

    A rerun resumes: committed shards whose version is unchanged are skipped, and leftovers of an
    interrupted run are committed when complete or dropped. Shards that changed lose their old rows;
    rows of images that left the source are deleted, or kept and marked gone with
    ``on_removed="keep"``. An output made from another source, with another spec or with shards cut
    another way is refused unless ``overwrite``, which builds a new generation beside it
    (pipeline/output/generations.py): the returned Work's ledger.
    """
    import pyarrow.compute as pc

    ledger, fresh = check_state(ledger, source_uri, tables, overwrite=overwrite, sharding=sharding,
                                scope=scope)

    listed = {s.key: s for s in shards}
    recovered = 0
    if not fresh:
        known = set(ledger.index()["key"].to_pylist())
        for key in ledger.leftover_keys():
            if key in listed and key not in known:
                entry = ledger.try_commit(key, version=listed[key].version)
                if entry:
                    recovered += 1
    ledger.clear_staging()
    table = ledger.index()  # cleared by an overwrite
    orphans, damaged = reconcile(ledger, list(tables), table)
    if damaged:
        table = table.filter(pc.invert(pc.is_in(table["key"], pa.array(sorted(damaged), pa.string()))))
    done, stale, gone = sort_out(table, listed, scope)
    removed: set[str] = set(damaged)
    kept = 0
    if on_removed == "keep":
        todo = [s for s in shards if s.key not in done]
        gave_way, kept = keep_removed(ledger, stale, gone, todo)
        removed |= gave_way
    else:
        for entry in [*stale, *gone]:
            ledger.remove_shard(entry)
            removed.add(entry["key"])
    after = ledger.fold(drop=removed)
    return Work(todo=[s for s in shards if s.key not in done], listed=len(shards),
                done_before=len(done), recovered=recovered,
                removed_stale=len(removed - damaged), kept=kept, scope=scope,
                orphans_removed=len(orphans), damaged=len(damaged), ledger=ledger,
                rows_before={"embedded": int(pc.sum(after["embedded"]).as_py() or 0),
                             "failed": int(pc.sum(after["failed"]).as_py() or 0)})


def _normalised(state: dict[str, Any] | None) -> dict[str, Any] | None:
    """A stored state with its specs read as the current version reads them (defaults filled)."""
    if state is None:
        return None
    return {**state, "tables": {k: EmbeddingSpec.parse(v).table_key()
                                for k, v in (state.get("tables") or {}).items()}}


def check_state(ledger: Any, source_uri: str, tables: dict[str, dict[str, Any]], *, overwrite: bool,
                sharding: dict[str, Any] | None, scope: str = "") -> tuple[Any, bool]:
    """Refuse an output made from another source, with another spec or with shards cut another way
    (unless ``overwrite``); then record what this run writes. Returns (the ledger to run into, whether it
    starts empty): with ``overwrite``, a new generation beside the live one, or an interrupted overwrite
    of the same settings and scope, resumed (also by a run without ``overwrite`` that the live table
    would refuse, or on an output with no live table yet)."""
    storage.check_writable(ledger.output_uri)
    want = storage.redact({"source": source_uri, "tables": tables})  # as output.json records it
    state = None if overwrite else _normalised(ledger.state())
    live = generations.live_generation(ledger)
    if overwrite:
        done = generations.switched(ledger, live, want, sharding, scope, _normalised)
        if done is not None:
            generations.sweep(ledger, {live})
            return done, False
    if overwrite or state is None or {k: state.get(k) for k in want} != want:
        resumed = generations.adoptable(ledger, want, sharding, scope, _normalised)
        if resumed is not None or overwrite:
            new = resumed or ledger.at(generations.new_generation(), pending=True)
            generations.sweep(ledger, {live, new.generation})
            if live is not None:  # the live generation's staged parts: their files go with _staging/
                storage.remove_tree(ledger.at(live).dir("parts"))
            if resumed is None:
                new.write_state({**want, **({"sharding": sharding} if sharding else {}),
                                 **({"scope": scope} if scope else {})})
            return new, resumed is None
    if state is None:
        generations.drop_pending(ledger)  # an overwrite of other settings that died on a new output
    subdirs = [*tables, ERRORS_DIR]
    if state is None:
        clear_or_refuse(ledger.output_uri, subdirs, overwrite=False,
                        what=" that no run of this tool recorded")
    elif {k: state.get(k) for k in want} != want:
        diff = dict_differences({k: state.get(k) for k in want}, want)
        raise ConfigError(
            f"output '{ledger.output_uri}' holds rows made differently ({'; '.join(diff[:3])}"
            f"{'; ...' if len(diff) > 3 else ''}): pass --overwrite to replace them, or choose a new "
            "--output")
    recorded = (state or {}).get("sharding")
    if not overwrite and state is not None and sharding is not None and recorded != sharding:
        if recorded is None and ledger.index().num_rows:
            raise ConfigError(
                f"output '{ledger.output_uri}' was written with loose files cut into fixed runs of "
                "consecutive paths, under which one added file redoes every later shard: pass "
                "--overwrite once to rebuild it with shards cut by path, or choose a new --output")
        if recorded is not None:
            raise ConfigError(
                f"output '{ledger.output_uri}' cuts loose files into shards at folder depth "
                f"{recorded.get('depth')}, this run at {sharding.get('depth')} (source.split_depth): "
                "drop source.split_depth to use the output's, or pass --overwrite to rebuild it")
    generations.sweep(ledger, {ledger.generation})  # an overwrite given up: its files are orphans now
    if storage.exists(ledger.dir(generations.PENDING)):  # an overwrite killed just after its switch
        storage.remove(ledger.dir(generations.PENDING))
    ledger.write_state({**want, **({"sharding": sharding or recorded} if sharding or recorded else {})})
    return ledger, False


def sort_out(table: pa.Table, listed: dict[str, Any], scope: str
              ) -> tuple[set[str], list[dict[str, Any]], list[dict[str, Any]]]:
    """(keys done, stale entries, gone entries) among the committed shards inside ``scope``: done when
    listed with the same version; stale when changed or no longer listed; gone when kept after their
    images left the source (such an entry never counts as done)."""
    done: set[str] = set()
    stale, gone = [], []
    cols = [table[c].to_pylist() for c in ("key", "version", "first", "gone", "entry")]
    for key, version, first, left, entry in zip(*cols, strict=True):
        if scope and (first is None or not first.startswith(scope)):
            continue  # outside this run's prefix (entries from before scopes were recorded: a root run's)
        if left is not None:
            gone.append(json.loads(entry))
        elif key in listed and listed[key].version == version:
            done.add(key)
        else:
            stale.append(json.loads(entry))
    return done, stale, gone


def visible_files(ledger: Any, tables: list[str]) -> dict[str, int]:
    """The Parquet files readers of the output see (under its tables and errors/), with their sizes."""
    out: dict[str, int] = {}
    for sub in dict.fromkeys([*tables, ERRORS_DIR]):
        root = ledger.uri(sub)
        if storage.exists(root):
            out.update({f"{sub}/{f.rel}": f.size for f in storage.list_files(root)
                        if f.rel.endswith(".parquet")})
    return out


def differences(ledger: Any, tables: list[str], table: pa.Table | None = None,
                also: set[str] | frozenset[str] = frozenset()) -> tuple[list[str], dict[str, list[str]]]:
    """Where the visible files and the committed shards disagree: (visible files no committed shard
    lists, {key: its files that are missing or not the size they were written at}). ``also``: files that
    are not orphans though ``table`` does not list them (the live generation's, while one is built)."""
    table = ledger.index() if table is None else table
    visible = visible_files(ledger, tables)
    listed: set[str] = set(also)
    bad: dict[str, list[str]] = {}
    for raw in table["entry"].to_pylist():
        entry = json.loads(raw)
        sizes = entry.get("sizes") or {}
        for rel in entry["files"]:
            listed.add(rel)
            if rel not in visible or (rel in sizes and visible[rel] != sizes[rel]):
                bad.setdefault(entry["key"], []).append(rel)
    return sorted(set(visible) - listed), bad


def reconcile(ledger: Any, tables: list[str], table: pa.Table) -> tuple[list[str], set[str]]:
    """Make the visible files exactly the committed shards' (the invariant, docs/operations.md): remove
    visible files that no committed shard lists (what an interrupted commit, a crash in the middle of
    replacing a shard or an older writer left), and forget committed shards whose files are missing or
    damaged, their other files removed, so that they run again. Returns (orphans removed, keys
    forgotten); the caller drops those keys from the ledger."""
    live = generations.live_files(ledger)
    orphans, bad = differences(ledger, tables, table, also=live or set())
    if live is None:  # a damaged live table, being overwritten: its files go at the switch
        orphans = []
    for rel in orphans:
        storage.remove(ledger.uri(rel))
    if bad:
        entries = {k: json.loads(e) for k, e in zip(table["key"].to_pylist(), table["entry"].to_pylist(),
                                                    strict=True) if k in bad}
        for entry in entries.values():
            ledger.remove_shard(entry)
    return orphans, set(bad)
