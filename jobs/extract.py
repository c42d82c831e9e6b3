"""Ray job entry point for extraction: the same config and API as `pipeline extract`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/extract.py --config jobs/configs/s3-gpu.yaml --set source.uri=s3://photos/2026-11-27/
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Embed images with a pretrained backbone; write Parquet.")
    ap.add_argument("--config", "-c", required=True, help="YAML config (see jobs/configs/)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set runtime.actors=1,4 (repeatable)")
    ap.add_argument("--overwrite", action="store_true", help="clear the output and redo every shard")
    ap.add_argument("--incremental", action="store_true",
                    help="new or changed shards only, under embeddings/run_date=YYYY-MM-DD/")
    ap.add_argument("--run-date", help="the run_date of an --incremental run (default: today, UTC)")
    ap.add_argument("--json", action="store_true", help="print the run summary as JSON")
    args = ap.parse_args(argv)

    from pipeline.config import ExtractConfig, merge_sources
    from pipeline.runner import extract, format_summary

    try:
        cfg = merge_sources(ExtractConfig, args.config, None, args.overrides)
        summary = extract(cfg, overwrite=args.overwrite, incremental=args.incremental, run_date=args.run_date)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
