"""`pipeline nightly`: embed the shards that are new or changed since the last run, then apply the current
head to that night's rows.

1. `extract --incremental`: the ledger under OUTPUT/_ledger/ says which shards are done; only new or
   changed ones run, and their rows land in OUTPUT/embeddings/run_date=YYYY-MM-DD/. Shards that changed
   lose their old rows, so the output keeps exactly one row per image.
2. `heads predict` with `head:` over that night's partition -> PREDICTIONS/predictions/run_date=YYYY-MM-DD/.
3. `index add` with `index:`: the night's new embedding files join the index (no retraining); rows of
   replaced shards leave it.

A failed night is finished by running the same command again (same --run-date): finished shards are skipped.
"""

from __future__ import annotations

from typing import Any

from pipeline import storage
from pipeline.commands.extract import extract
from pipeline.commands.heads import predict
from pipeline.commands.run import format_summary, new_run_id
from pipeline.config import ExtractConfig, NightlyConfig
from pipeline.output.layout import EMBEDDINGS_DIR
from pipeline.output.lease import Lease, LockPolicy, hold


def nightly(cfg: NightlyConfig, run_date: str | None = None, lock: LockPolicy | Lease | None = None
            ) -> dict[str, Any]:
    """Returns {"extract": the extract summary, "predict": the predict summary or None, "index": the index
    add summary or None}. The night holds the output's lease throughout (the predictions' and the index's
    folders are leased by their steps)."""
    with hold(cfg.output.uri, new_run_id(), "nightly", lock) as lease:
        return _night(cfg, run_date, lease)


def _night(cfg: NightlyConfig, run_date: str | None, lock: Lease) -> dict[str, Any]:
    extract_cfg = ExtractConfig.model_validate(
        cfg.model_dump(exclude={"head", "predictions", "top_k", "index"}))
    summary = extract(extract_cfg, incremental=True, run_date=run_date, lock=lock)
    result: dict[str, Any] = {"extract": summary, "predict": None}
    partition = summary["partition"]
    night = storage.join(cfg.output.uri, EMBEDDINGS_DIR, partition)
    if cfg.head and storage.exists(night):
        result["predict"] = predict(cfg.head, night, cfg.predictions or cfg.output.uri, top_k=cfg.top_k,
                                    runtime=cfg.runtime, partition=partition, lock=lock)
    result["index"] = None
    if cfg.index:
        from pipeline.commands.index import add
        from pipeline.config import IndexAddConfig

        result["index"] = add(IndexAddConfig(index=cfg.index, embeddings=cfg.output.uri, runtime=cfg.runtime),
                              lock=lock)
    return result


def format_nightly(result: dict[str, Any]) -> str:
    lines = [format_summary(result["extract"])]
    p = result["predict"]
    if p:
        lines.append(f"  predictions: {p['predictions']} ({p['rows']} rows)")
    if result.get("index"):
        from pipeline.commands.index import format_add

        lines.append("  index add:  " + format_add(result["index"]).replace("\n", "\n  "))
    return "\n".join(lines)
