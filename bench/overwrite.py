"""What a reader sees while `pipeline extract --overwrite` replaces an output's table.

    python -m bench.overwrite [--per-class 8] [--interval 0.02] [--workdir DIR]

Extracts sample textures (3 classes x --per-class images) into an output, then overwrites it with other
settings (L2-normalized embeddings) while a thread calls `read_embeddings` every --interval seconds, and
counts the reads that found the whole old table, the whole new one, no rows, anything else (part of a
table, a mix), or failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--interval", type=float, default=0.02)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()

    from pipeline.commands.extract import extract
    from pipeline.config import ExtractConfig
    from pipeline.output.reader import read_embeddings
    from pipeline.samples import make_textures

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-overwrite-"))
    make_textures(work / "src", per_class=args.per_class, patch=64, seed=0)
    n = 3 * args.per_class

    def cfg(normalize: bool) -> ExtractConfig:
        return ExtractConfig.model_validate({
            "source": {"uri": str(work / "src"), "labels": "folder"},
            "backbone": {"model": "tf_efficientnet_lite0", "weights": "packaged", "normalize": normalize},
            "output": {"uri": str(work / "out")}, "runtime": {"progress": False}})

    def digest() -> str:
        """The snapshot's rows, as one hash ('none' when it has none)."""
        t = read_embeddings(str(work / "out"))
        if not t.num_rows:
            return "none"
        t = t.sort_by("id")
        emb = np.asarray(t["embedding"].combine_chunks().flatten())
        return hashlib.sha1("\n".join(t["id"].to_pylist()).encode() + emb.tobytes()).hexdigest()

    extract(cfg(False), overwrite=True)
    old = digest()
    seen: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(digest())
            except Exception:  # noqa: BLE001 - counted
                seen.append("failed")
            time.sleep(args.interval)

    thread = threading.Thread(target=reader)
    thread.start()
    t0 = time.perf_counter()
    extract(cfg(True), overwrite=True)
    took = time.perf_counter() - t0
    stop.set()
    thread.join()
    new = digest()
    counts = {"old": seen.count(old), "new": seen.count(new), "none": seen.count("none"),
              "failed": seen.count("failed")}
    counts["other"] = len(seen) - sum(counts.values())  # part of a table, or a mix of the two
    print(json.dumps({"images": n, "overwrite_s": round(took, 1), "reads": len(seen), **counts}))


if __name__ == "__main__":
    main()
