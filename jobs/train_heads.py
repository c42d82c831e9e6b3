"""Ray job entry point for head training: the same config and API as `pipeline heads train`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_heads.py --config jobs/configs/heads-local.yaml --set head=mlp --set epochs=50

Training runs in the job's driver process (torch, no Ray tasks): on a cluster, add
`--entrypoint-num-gpus 1` to `ray job submit` so the driver is placed on a GPU node and trains there
(`device: auto` picks CUDA when the process sees one). The embeddings are streamed from storage when the
table has more than `max_rows_in_memory` rows.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train a linear or MLP head on stored embeddings.")
    ap.add_argument("--config", "-c", required=True, help="YAML config (see jobs/configs/heads-local.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set head=mlp --set epochs=50 (repeatable)")
    ap.add_argument("--json", action="store_true", help="print head.json")
    args = ap.parse_args(argv)

    from pipeline.config import merge_sources
    from pipeline.heads import HeadTrainConfig, train_head

    try:
        cfg = merge_sources(HeadTrainConfig, args.config, None, args.overrides)
        meta = train_head(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(meta, indent=2, default=str))
        return 0
    val = meta["metrics"]["validation"] or {}
    print(f"{meta['head']['type']} head on {meta['split']['train']} rows, {len(meta['classes'])} classes: "
          f"validation accuracy {val.get('accuracy', float('nan')):.4f}, macro-F1 "
          f"{val.get('macro_f1', float('nan')):.4f} ({meta['split']['validation']} rows)")
    print(f"  artifacts: {', '.join(meta['output'].values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
