"""`pipeline index build` and `index add` summaries as the CLI prints them."""

from __future__ import annotations

from typing import Any


def recall_text(r: dict[str, Any] | None) -> str:
    if not r or r.get("recall_at_10") is None:
        return "recall@10 not measured"
    if r.get("exact"):
        return "exact search (recall@10 = 1)"
    setting = ", ".join(f"{k} {r[k]}" for k in ("nprobe", "ef_search") if k in r)
    return f"recall@10 {r['recall_at_10']:.3f} vs exact on {r['queries']} held-out queries ({setting})"


def format_build(s: dict[str, Any]) -> str:
    return "\n".join([
        f"index {s['index_kind']} ({s['factory']}, {s['metric']}) of {s['vectors']} vectors x {s['dim']} "
        f"from {s['files']} files in {s['total_s']:.1f}s -> {s['index']}",
        f"  why:        {s['reason']}",
        f"  quality:    {recall_text(s['recall'])}",
        f"  run record: {s['run_record']}"])


def format_add(s: dict[str, Any]) -> str:
    if s.get("note"):
        return f"{s['note']} ({s['vectors']} vectors); run record: {s['run_record']}"
    lines = [f"added {s['added']} vectors from {s['added_files']} files, removed {s['removed']} "
             f"(replaced or deleted files: {s['removed_files']}); the index holds {s['vectors']} "
             f"in {s['total_s']:.1f}s",
             f"  quality:    {recall_text(s['recall'])}"]
    if s.get("warning"):
        lines.append(f"  warning:    {s['warning']}")
    lines.append(f"  run record: {s['run_record']}")
    return "\n".join(lines)
