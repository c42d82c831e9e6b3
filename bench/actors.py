"""How many actors a small extract should start: the planner's count against one actor per CPU.

    python -m bench.actors [--images 42,210,510] [--repeats 3] [--model tf_efficientnet_lite0] [--workdir DIR]

For each size, extracts sample textures (112 px, three class folders) with the defaults, in one warm Ray,
side by side: as planned (fewer actors where the images cannot repay an actor's start-up, see
pipeline/plan.py CPU_ACTOR_START_FLOPS) and with as many actors as the node holds (what the planner chose for
any input before). Prints, per run, the actors and the seconds from the call to the run record; then the
medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default="42,210,510", help="comma-separated sizes (multiples of 3)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()

    from pipeline.commands.extract import extract
    from pipeline.config import ExtractConfig
    from pipeline.plan import plan_images
    from pipeline.ray import init_ray
    from pipeline.ray.cluster import cluster_shape
    from pipeline.samples import make_textures

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-actors-"))
    weights = "packaged" if args.model == "tf_efficientnet_lite0" else "none"

    def cfg(src: Path, out: Path, **runtime) -> ExtractConfig:
        return ExtractConfig.model_validate({
            "source": {"uri": str(src), "labels": "folder"},
            "backbone": {"model": args.model, "weights": weights},
            "output": {"uri": str(out)}, "runtime": {"progress": False, **runtime}})

    rt = cfg(work / "src", work / "out").runtime
    init_ray(rt)
    full = plan_images(cluster_shape(rt), rt, images=10**6, input_hw=(224, 224)).runtime.actors  # a long run
    rows = []
    for n in (int(x) for x in args.images.split(",")):
        src = work / f"src-{n}"
        make_textures(src, per_class=n // 3, patch=112, seed=1)
        extract(cfg(src, work / "warm"))  # the first run in a fresh Ray pays for its workers' start
        shutil.rmtree(work / "warm")
        for _ in range(args.repeats):
            for mode, runtime in (("planned", {}), ("one per CPU", {"actors": full})):
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                t = time.perf_counter()
                summary = extract(cfg(src, out, **runtime))
                row = {"images": n, "mode": mode, "actors": summary["plan"]["settings"]["actors"],
                       "seconds": round(time.perf_counter() - t, 1)}
                assert summary["counts"]["embedded"] == 3 * (n // 3), summary["counts"]
                print(json.dumps(row), flush=True)
                rows.append(row)
    for n in sorted({r["images"] for r in rows}):
        med = {m: statistics.median(r["seconds"] for r in rows if r["images"] == n and r["mode"] == m)
               for m in ("planned", "one per CPU")}
        actors = {m: next(r["actors"] for r in rows if r["images"] == n and r["mode"] == m) for m in med}
        print(f"{n:>6} images: planned {actors['planned']} actor(s) {med['planned']:.1f} s, "
              f"{actors['one per CPU']} actors {med['one per CPU']:.1f} s "
              f"(planned/one per CPU {med['planned'] / med['one per CPU']:.2f})")


if __name__ == "__main__":
    main()
