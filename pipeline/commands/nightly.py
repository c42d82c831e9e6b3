"""`pipeline nightly`: embed the shards that are new or changed since the last run, then apply the current
head to that night's rows.

1. `extract --incremental`: the ledger under OUTPUT/_ledger/ says which shards are done; only new or
   changed ones run, and their rows land in OUTPUT/embeddings/run_date=YYYY-MM-DD/. Shards that changed
   lose their old rows, so the output keeps exactly one row per image.
2. `heads predict` with `head:` over that night's partition -> PREDICTIONS/predictions/run_date=YYYY-MM-DD/;
   then the earlier nights' predictions of images that changed or left the source are removed, so that
   the predictions hold one row per embedded image, like the embeddings.
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
    if cfg.head:
        with hold(cfg.predictions or cfg.output.uri, new_run_id(), "nightly predictions", lock):
            result["predictions_reconciled"] = reconcile_predictions(cfg.output.uri,
                                                                     cfg.predictions or cfg.output.uri)
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
    gone = (result.get("predictions_reconciled") or {}).get("rows_removed")
    if gone:
        lines.append(f"  predictions of earlier nights for images that changed or left: {gone} rows removed")
    if result.get("index"):
        from pipeline.commands.index_text import format_add

        lines.append("  index add:  " + format_add(result["index"]).replace("\n", "\n  "))
    return "\n".join(lines)


def reconcile_predictions(output_uri: str, predictions_uri: str) -> dict[str, int]:
    """Predictions follow the embeddings: in each ``run_date=`` partition of PREDICTIONS/predictions/, only
    the rows whose id the output's committed embeddings hold under the same run date stay (an image that
    changed was embedded, and predicted, again on a later night; one that left the source has no row). A
    file is rewritten whole (atomically) or removed. Returns the counts."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.output.layout import PREDICTIONS_DIR, write_parquet
    from pipeline.output.reader import read_embeddings

    counts = {"rows_removed": 0, "files_rewritten": 0, "files_removed": 0}
    root = storage.join(predictions_uri, PREDICTIONS_DIR)
    if not storage.exists(root):
        return counts
    emb = read_embeddings(output_uri, columns=["id", "run_date"])
    live: dict[str, pa.Array] = {}
    if emb.num_rows and "run_date" in emb.column_names:
        days = emb.column("run_date").cast(pa.string())
        for day in pc.unique(days).to_pylist():
            live[day] = pc.filter(emb.column("id"), pc.equal(days, day)).combine_chunks()
    for f in storage.list_files(root):
        part = f.rel.split("/", 1)[0]
        if "/" not in f.rel or not part.startswith("run_date=") or not f.rel.endswith(".parquet"):
            continue
        ids = live.get(part.split("=", 1)[1], pa.array([], pa.string()))
        with storage.open_input(f.uri) as fh:
            have = pq.read_table(fh, columns=["id"]).column("id")
        keep = pc.is_in(have, value_set=ids)
        n = int(pc.sum(keep.cast(pa.int64())).as_py() or 0)
        if n == len(have):
            continue
        counts["rows_removed"] += len(have) - n
        if n == 0:
            storage.remove(f.uri)
            counts["files_removed"] += 1
        else:
            with storage.open_input(f.uri) as fh:
                table = pq.read_table(fh)
            write_parquet(f.uri, table.filter(pc.is_in(table.column("id"), value_set=ids)))
            counts["files_rewritten"] += 1
    return counts
