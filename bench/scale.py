"""Driver scale: listing and planning at 1M and 10M objects, and planning against 100k committed shards.

    python -m bench.scale                      # 1M and 10M objects, 100k committed shards
    python -m bench.scale --objects 1000000    # one size
    python -m bench.scale --nightly            # the 2,000-image ImageFolder add/remove check, end to end
    python -m bench.scale --manifest           # a 10,000-URI manifest (2% missing), end to end

Objects come from a stub filesystem (``scalestub://``) that generates a bucket of N objects in folders of
10,000 on the fly, so that only the driver's own memory is measured. Each measurement runs in a fresh
process and reports its peak RSS (``ru_maxrss``) and wall seconds; RESULTS.md holds the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FOLDER = 10_000


def _tables() -> dict:
    from pipeline.output.spec import EmbeddingSpec

    return {"embeddings": EmbeddingSpec.parse({}).table_key()}


def _register_stub() -> None:
    import fsspec
    from fsspec.spec import AbstractFileSystem

    class ScaleStub(AbstractFileSystem):
        """scalestub://bucket/<N>/dNNNNN/img_NNNNNNNNN.jpg: N objects, FOLDER per folder, generated."""

        protocol = "scalestub"

        @staticmethod
        def _parts(path: str) -> list[str]:
            return self_strip(path).split("/")

        def ls(self, path, detail=True, **kwargs):
            parts = self_strip(path).split("/")
            n = int(parts[1])
            if len(parts) == 2:
                folders = (n + FOLDER - 1) // FOLDER
                return [{"name": f"{parts[0]}/{n}/d{d:05d}", "type": "directory", "size": 0}
                        for d in range(folders)]
            d = int(parts[2][1:])
            lo, hi = d * FOLDER, min(n, (d + 1) * FOLDER)
            base = "/".join(parts[:3])
            return [{"name": f"{base}/img_{i:09d}.jpg", "type": "file", "size": 50_000 + i % 997,
                     "ETag": f"{i * 2654435761 % (1 << 64):016x}"} for i in range(lo, hi)]

        def isfile(self, path):
            return self_strip(path).endswith(".jpg")

        def isdir(self, path):
            return not self.isfile(path)

        def exists(self, path, **kwargs):
            return True

        def invalidate_cache(self, path=None):
            return None

    def self_strip(path: str) -> str:
        return path.split("://", 1)[-1].strip("/")

    fsspec.register_implementation("scalestub", ScaleStub, clobber=True)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_listing(n: int) -> dict:
    """List and cut N objects into shards, then plan them against an empty output (the first run)."""
    _register_stub()
    from pipeline.config import SourceConfig
    from pipeline.output.ledger import Ledger
    from pipeline.sources import SHARDING, list_shards

    base = _peak_mib()
    t0 = time.perf_counter()
    shards, _ = list_shards(SourceConfig(uri=f"scalestub://bucket/{n}/"))
    t_list = time.perf_counter() - t0
    out = tempfile.mkdtemp(prefix="scale-out-")
    plan = Ledger(out).plan(f"scalestub://bucket/{n}/", _tables(), shards, overwrite=False,
                            sharding={"scheme": SHARDING, "depth": 0})
    t_total = time.perf_counter() - t0
    pickled = sum(len(__import__("pickle").dumps(s)) for s in shards[:1000]) / min(1000, len(shards))
    return {"objects": n, "shards": len(shards), "to_run": len(plan.todo),
            "mean_files_per_shard": round(n / len(shards), 1),
            "pickled_bytes_per_shard": round(pickled), "list_s": round(t_list, 1),
            "list_and_plan_s": round(t_total, 1), "peak_rss_mib": round(_peak_mib()),
            "rss_before_mib": round(base)}


def measure_planning(committed: int) -> dict:
    """Plan a rerun against an output whose ledger holds ``committed`` shards (all unchanged)."""
    import pyarrow as pa

    from pipeline.output import ledger as L
    from pipeline.sources import SHARDING, Member, chunk_shard

    out = tempfile.mkdtemp(prefix="scale-ledger-")
    shards = [chunk_shard([Member(f"d{i // 1000:04d}/img_{i:08d}_{k}.jpg", 50_000, "e") for k in range(2)],
                          "scalestub://bucket/") for i in range(committed)]
    entries = [{"key": s.key, "version": s.version, "first": s.first, "rows": 256, "embedded": 255,
                "failed": 1, "error_kinds": {"truncated": 1}, "run_id": "r0",
                "committed_at": "2026-11-30T00:00:00+00:00",
                "files": [f"embeddings/{s.key}-000000000.parquet", f"errors/{s.key}-000000000.parquet"]}
               for s in shards]
    led = L.Ledger(out)
    led.write_state({"source": "scalestub://bucket/", "tables": _tables(),
                     "sharding": {"scheme": SHARDING, "depth": 0}})
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(L._entries_table(entries), buf, compression="zstd")
    Path(out, L.LEDGER_DIR).mkdir(parents=True, exist_ok=True)
    Path(out, L.LEDGER_DIR, L.COMPACT).write_bytes(buf.getvalue())
    del entries, buf
    _ = pa  # the table is read back by the plan
    base = _peak_mib()
    t0 = time.perf_counter()
    plan = led.plan("scalestub://bucket/", _tables(), shards, overwrite=False,
                    sharding={"scheme": SHARDING, "depth": 0})
    took = time.perf_counter() - t0
    assert not plan.todo and plan.done_before == committed
    return {"committed_shards": committed, "plan_s": round(took, 2), "peak_rss_mib": round(_peak_mib()),
            "rss_before_plan_mib": round(base),
            "ledger_bytes": Path(out, L.LEDGER_DIR, L.COMPACT).stat().st_size}


def measure_nightly(images: int = 2000) -> dict:
    """The ImageFolder check end to end: extract a/ b/ c/ d/ (tiny JPEGs), add one image, rerun with
    --incremental; remove one, rerun; count what each rerun embedded and what its partition holds."""
    import io

    import numpy as np
    import pyarrow.dataset as pads
    from PIL import Image

    from pipeline.commands.extract import extract
    from pipeline.config import ExtractConfig

    tmp = Path(tempfile.mkdtemp(prefix="scale-nightly-"))
    src, out = tmp / "src", tmp / "out"
    rng = np.random.default_rng(0)

    def jpeg() -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
        return buf.getvalue()

    for i in range(images):
        p = src / "abcd"[i % 4] / f"{i:05d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(jpeg())
    cfg = ExtractConfig.model_validate({
        "source": {"uri": str(src), "labels": "folder"},
        "backbone": {"model": "tf_efficientnet_lite0", "weights": "packaged"},
        "output": {"uri": str(out)}, "runtime": {"progress": False, "num_cpus": 2}})
    res = {"images": images, "files_per_shard": cfg.source.files_per_shard}
    s = extract(cfg, incremental=True, run_date="2026-11-28")
    res["first_run"] = {"embedded": s["counts"]["embedded"], "shards": s["ledger"]["ran"]}
    (src / "b" / "00500x.jpg").write_bytes(jpeg())
    s = extract(cfg, incremental=True, run_date="2026-11-29")
    night = pads.dataset(out / "embeddings" / "run_date=2026-11-29").count_rows()
    res["after_adding_one"] = {"embedded": s["counts"]["embedded"], "partition_rows": night,
                               "shards_ran": s["ledger"]["ran"],
                               "shards_replaced": s["ledger"]["removed_stale"]}
    (src / "c" / "01002.jpg").unlink()
    s = extract(cfg, incremental=True, run_date="2026-11-30")
    night = pads.dataset(out / "embeddings" / "run_date=2026-11-30").count_rows()
    total = pads.dataset(out / "embeddings", partitioning="hive").count_rows()
    res["after_removing_one"] = {"embedded": s["counts"]["embedded"], "partition_rows": night,
                                 "shards_ran": s["ledger"]["ran"],
                                 "shards_replaced": s["ledger"]["removed_stale"], "output_rows": total}
    return res


def measure_manifest(uris: int = 10_000) -> dict:
    """A CSV manifest of ``uris`` object URIs, 2% of them missing, through extract end to end; then the same
    command again (nothing to do)."""
    import io

    import numpy as np
    from PIL import Image

    from pipeline.commands.extract import extract
    from pipeline.config import ExtractConfig

    tmp = Path(tempfile.mkdtemp(prefix="scale-manifest-"))
    rng = np.random.default_rng(0)
    lines = ["uri,label"]
    for i in range(uris):
        p = tmp / "bucket" / f"c{i % 10}" / f"{i:06d}.jpg"
        if i % 50 != 7:  # every 50th object is named but missing
            p.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
            p.write_bytes(buf.getvalue())
        lines.append(f"{p},c{i % 10}")
    (tmp / "manifest.csv").write_text("\n".join(lines) + "\n")
    cfg = ExtractConfig.model_validate({
        "source": {"uri": str(tmp / "manifest.csv"), "root": str(tmp / "bucket"), "labels": "label"},
        "backbone": {"model": "tf_efficientnet_lite0", "weights": "packaged"},
        "output": {"uri": str(tmp / "out")}, "runtime": {"progress": False, "num_cpus": 2}})
    t0 = time.perf_counter()
    s = extract(cfg)
    took = time.perf_counter() - t0
    again = extract(cfg)
    return {"uris": uris, "counts": s["counts"], "error_kinds": s["error_kinds"],
            "shards": s["ledger"]["ran"], "seconds": round(took, 1), "images_per_s": s["images_per_s"],
            "rerun": {"ran": again["ledger"]["ran"], "done_before": again["ledger"]["done_before"],
                      "inputs": again["counts"]["inputs"]}}


def _child(kind: str, arg: int) -> dict:
    code = (f"import json, bench.scale as b; print(json.dumps(b.measure_{kind}({arg})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONHASHSEED": "0"})
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, nargs="*", default=[1_000_000, 10_000_000])
    ap.add_argument("--committed", type=int, nargs="*", default=[10_000, 100_000])
    ap.add_argument("--nightly", action="store_true", help="only the end-to-end ImageFolder add/remove check")
    ap.add_argument("--manifest", action="store_true", help="only the end-to-end 10,000-URI manifest run")
    args = ap.parse_args()
    if args.nightly or args.manifest:
        print(json.dumps(_child("nightly", 2000) if args.nightly else _child("manifest", 10_000), indent=1))
        return
    for n in args.objects:
        print(json.dumps(_child("listing", n)), flush=True)
    for n in args.committed:
        print(json.dumps(_child("planning", n)), flush=True)


if __name__ == "__main__":
    main()
