"""Nightly job: embed the shards that are new or changed since the last run, then apply the current head.

    python jobs/nightly.py --config jobs/configs/nightly-local.yaml [--run-date 2026-11-28] [--set k=v]

1. `extract --incremental`: the ledger under OUTPUT/_ledger/ says which shards are done; only new or
   changed ones run, and their rows land in OUTPUT/embeddings/run_date=YYYY-MM-DD/. Shards that changed
   lose their old rows, so the output keeps exactly one row per image.
2. `heads predict` with `head:` over that night's partition -> PREDICTIONS/predictions/run_date=YYYY-MM-DD/.

A failed night is fixed by running the same command again (same --run-date): finished shards are skipped.
Exit status: 0 done (bad images are rows in errors/), 2 bad configuration, 1 the run failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def run(cfg, run_date: str | None = None) -> dict[str, Any]:
    from pipeline import storage
    from pipeline.config import ExtractConfig
    from pipeline.runner import extract, predict

    extract_cfg = ExtractConfig.model_validate(cfg.model_dump(exclude={"head", "predictions", "top_k"}))
    summary = extract(extract_cfg, incremental=True, run_date=run_date)
    result: dict[str, Any] = {"extract": summary, "predict": None}
    partition = summary["partition"]
    night = storage.join(cfg.output.uri, "embeddings", partition)
    if cfg.head and storage.exists(night):
        result["predict"] = predict(cfg.head, night, cfg.predictions or cfg.output.uri, top_k=cfg.top_k,
                                    runtime=cfg.runtime, partition=partition)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Incremental extract + predictions with the current head.")
    ap.add_argument("--config", "-c", required=True, help="YAML config (see jobs/configs/nightly-local.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set source.uri=s3://photos/ (repeatable)")
    ap.add_argument("--run-date", help="YYYY-MM-DD partition for this run (default: today, UTC)")
    ap.add_argument("--json", action="store_true", help="print the summaries as JSON")
    args = ap.parse_args(argv)

    from pipeline.config import NightlyConfig, merge_sources
    from pipeline.runner import format_summary

    try:
        cfg = merge_sources(NightlyConfig, args.config, None, args.overrides)
        result = run(cfg, args.run_date)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line for the scheduler's log; rerun to resume
        print(f"error: run failed: {type(e).__name__}: {e} (rerun the same command to resume)",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(format_summary(result["extract"]))
        p = result["predict"]
        if p:
            print(f"  predictions: {p['predictions']} ({p['rows']} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
