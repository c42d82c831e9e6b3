"""Reuse benchmark: `pipeline compare` on the demo's texture patches and on ImageNet-named photo crops, and
fine-tuning from the pretrained weights against the same fine-tuning from random init.

    python -m bench.reuse [--workdir /tmp/bench-reuse] [--epochs 2] [--per-class 30]

  compare   the command as a user runs it (default settings but --val-fraction 0.5, the demo's), on the
            textures (brick/grass/gravel: no ImageNet class, the classifier arm not applicable) and on
            crops of the bundled cat and coffee photos in folders named by their ImageNet classes (tabby,
            coffee_mug); prints each table and the wall time of each arm
  init      `pipeline finetune` (whole network, --epochs E, the same split) with --weights packaged and with
            --weights none on the textures: validation accuracy and seconds of each
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path


def _compare(src: Path, out: Path, model: str, epochs: int) -> dict:
    from pipeline.commands.compare import compare
    from pipeline.commands.compare_rules import format_compare
    from pipeline.config.compare import CompareConfig

    cfg = CompareConfig.model_validate({
        "source": {"uri": str(src)}, "output": {"uri": str(out)}, "backbone": {"model": model},
        "runtime": {"progress": False}, "val_fraction": 0.5, "epochs": epochs})
    report = compare(cfg, overwrite=True, progress=False)
    print(format_compare(report))
    print("wall seconds per arm:", json.dumps(report["wall_s"]))
    return report


def _finetune(src: Path, out: Path, model: str, weights: str, epochs: int) -> dict:
    from pipeline.commands.finetune import finetune
    from pipeline.config import FinetuneConfig

    cfg = FinetuneConfig.model_validate({
        "source": {"uri": str(src)}, "output": {"uri": str(out)},
        "backbone": {"model": model, "weights": weights},
        "train": {"epochs": epochs, "val_fraction": 0.5}})
    t = time.perf_counter()
    report = finetune(cfg, overwrite=True, progress=False)
    val = report["validation"] or {}
    return {"weights": weights, "val_accuracy": val.get("accuracy"), "macro_f1": val.get("macro_f1"),
            "seconds": round(time.perf_counter() - t, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/bench-reuse")
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--per-class", type=int, default=30)
    args = ap.parse_args(argv)

    import ray

    from pipeline import samples

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    textures, photos = work / "textures", work / "imagenet-named"
    samples.make_textures(textures, per_class=args.per_class, patch=96, seed=0)
    samples.make_imagenet_named(photos, per_class=max(args.per_class, 40), patch=128, seed=0)
    ray.init(num_cpus=None, include_dashboard=False, log_to_driver=False)
    print(f"machine: {platform.processor() or platform.machine()}, model {args.model}, epochs {args.epochs}")
    for name, src in (("textures", textures), ("ImageNet-named photos", photos)):
        print(f"\n== compare on {name} ({src})")
        _compare(src, work / f"compare-{src.name}", args.model, args.epochs)
    print(f"\n== fine-tuning the whole network on the textures, {args.epochs} epochs")
    rows = [_finetune(textures, work / f"finetune-{w}", args.model, w, args.epochs)
            for w in ("packaged", "none")]
    for r in rows:
        print(f"  weights {r['weights']:<9} val accuracy {r['val_accuracy']:.3f}  macro-F1 "
              f"{r['macro_f1']:.3f}  {r['seconds']:.1f} s")
    ray.shutdown()
    return 0 if rows[0]["val_accuracy"] > rows[1]["val_accuracy"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
