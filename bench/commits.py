"""When an extract's shards commit: while the actors embed, or only once they are all done.

    python -m bench.commits [--per-class 400] [--repeats 2] [--workdir DIR]

Extracts sample textures (3 classes x --per-class images, 160 px) with the defaults, twice per repeat and
side by side in one Ray: write tasks as planned (no CPU asked, pipeline.ray.data.WRITE_TASK_CPUS) and as Ray
Data's default (1 CPU each, no cap). A thread counts the committed shards every 0.5 s. Prints, per run,
the seconds to the first committed shard, the whole run's seconds and images/s; and the medians.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=400)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()

    import pipeline.ray.data as ray_data
    from pipeline.commands.extract import extract
    from pipeline.config import ExtractConfig
    from pipeline.output.ledger import Ledger
    from pipeline.samples import make_textures

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-commits-"))
    make_textures(work / "src", per_class=args.per_class, patch=160, seed=1)
    n = 3 * args.per_class
    planned = (ray_data.WRITE_TASK_CPUS, ray_data.writers)
    modes = {"planned": planned, "ray default (1 CPU)": (1, lambda _actors: None)}

    def run(mode: str) -> dict:
        ray_data.WRITE_TASK_CPUS, ray_data.writers = modes[mode]
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        cfg = ExtractConfig.model_validate({
            "source": {"uri": str(work / "src"), "labels": "folder"},
            "backbone": {"model": "tf_efficientnet_lite0", "weights": "packaged"},
            "output": {"uri": str(out)}, "runtime": {"progress": False}})
        first: list[float] = []
        done = threading.Event()
        t0 = time.perf_counter()

        def poll() -> None:
            while not done.wait(0.5):
                if not first and (out / "_ledger").exists() and Ledger(str(out)).committed():
                    first.append(time.perf_counter() - t0)

        threading.Thread(target=poll, daemon=True).start()
        summary = extract(cfg)
        total = time.perf_counter() - t0
        done.set()
        assert summary["counts"]["embedded"] == n, summary["counts"]
        row = {"mode": mode, "first_commit_s": round(first[0], 1) if first else None,
               "total_s": round(total, 1), "images_per_s": round(n / total, 1)}
        print(json.dumps(row), flush=True)
        return row

    rows = [run(mode) for _ in range(args.repeats) for mode in modes]
    ray_data.WRITE_TASK_CPUS, ray_data.writers = planned
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        first = statistics.median(r["first_commit_s"] or r["total_s"] for r in mine)
        total = statistics.median(r["total_s"] for r in mine)
        print(f"{mode:>20}: {n} images, first shard committed after {first:.1f} s of {total:.1f} s "
              f"(medians), {statistics.median(r['images_per_s'] for r in mine):.1f} images/s")


if __name__ == "__main__":
    main()
