"""Ray job entry point for fine-tuning: the same config and API as `pipeline finetune`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/finetune.py --config jobs/configs/finetune-local.yaml --set train.epochs=10

A resubmitted job with the same output continues from the last checkpoint (--overwrite starts over).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Fine-tune a pretrained backbone with Ray Train.")
    ap.add_argument("--config", "-c", required=True,
                    help="YAML config (see jobs/configs/finetune-local.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set train.epochs=10 (repeatable)")
    ap.add_argument("--overwrite", action="store_true", help="start over: delete checkpoints and artifacts")
    ap.add_argument("--json", action="store_true", help="print finetune.json")
    args = ap.parse_args(argv)

    from pipeline.cli import format_finetune
    from pipeline.config import merge_sources
    from pipeline.finetune import FinetuneConfig
    from pipeline.runner import finetune

    try:
        cfg = merge_sources(FinetuneConfig, args.config, None, args.overrides)
        report = finetune(cfg, overwrite=args.overwrite)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, default=str) if args.json else format_finetune(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
