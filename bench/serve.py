"""Serving benchmark: `pipeline serve`'s search by id (GET /api/search?id=ROW&k=K) over an IVF-PQ index and
over exact search, in-process through FastAPI's TestClient.

    python -m bench.serve [--rows 1000000] [--exact-rows 100000] [--dim 256] [--workdir /tmp/bench-serve]

Two extract-like outputs of clustered synthetic vectors (as bench/analytics.py makes them), each with a
ledger (`_ledger/output.json` and one committed entry per file) so that `read_embeddings` sees their rows:
  index     --rows rows and `pipeline index build` (kind auto: IVF-PQ above 100k rows) at OUTPUT-index
  exact     --exact-rows rows and no index: serve searches the table itself (a matrix product per query)
Both are kept under --workdir and reused when there. Each is served in a fresh process (so that its memory
is the app's alone): `make_app(ServeConfig(output=OUT))`, /healthz polled until ready (load s: make_app to
ready; the catalog's own loaded_s beside it), then --warmup searches and --queries searches of random row
ids: client wall time and the server's took_ms, p50/p95/p99 in ms; RSS after load and the peak (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def make_output(out: Path, n: int, dim: int, files: int) -> bool:
    """An extract-like output: embeddings/part-*.parquet and a ledger listing them as committed shards;
    False when one is there already."""
    from pipeline.analytics.vectors import clustered_vectors, synthetic_spec, write_embeddings
    from pipeline.output.ledger import Ledger

    if (out / "_ledger" / "committed.parquet").exists():
        return False
    x = clustered_vectors(n, dim, seed=0)
    spec = synthetic_spec(dim)
    ledger = Ledger(str(out), "bench-serve")
    ledger.write_state({"source": "synthetic", "tables": {"embeddings": spec.table_key()}})
    bounds = np.linspace(0, n, files + 1).astype(int)
    for f, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        rel = f"embeddings/part-{f:03d}.parquet"
        write_embeddings(str(out / rel), x[a:b], [f"v{i:08d}" for i in range(a, b)], spec)
        rows = int(b - a)
        ledger.write_entry({"key": f"part-{f:03d}", "version": "1", "rows": rows, "embedded": rows,
                            "failed": 0, "error_kinds": {}, "files": [rel], "run_id": "bench-serve"})
    ledger.fold()  # the entries into committed.parquet, as the end of a run leaves them
    return True


def build_index(out: Path) -> float | None:
    """`pipeline index build` at OUT-index (kind auto) unless it is there; its seconds, None when reused."""
    import ray

    from pipeline.commands.index import build
    from pipeline.config import IndexBuildConfig

    idx = Path(f"{out}-index")
    if (idx / "index.json").exists():
        return None
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        s = build(IndexBuildConfig(embeddings=str(out), output=str(idx), runtime={"progress": False}))
    finally:
        ray.shutdown()
    return s["total_s"]


def _mem() -> dict[str, float]:
    f = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(f[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}  # MiB


def _pct(v: list[float]) -> list[float]:
    return [round(float(p), 2) for p in np.percentile(v, [50, 95, 99])]


def measure(out: str, queries: int, warmup: int, k: int, seed: int) -> dict:
    """Serve OUT in this process and time search by id (run in a fresh process: see main)."""
    from fastapi.testclient import TestClient

    from pipeline.commands.serve import make_app
    from pipeline.config.serve import ServeConfig

    before = _mem()["VmRSS"]
    t0 = time.perf_counter()
    client = TestClient(make_app(ServeConfig(output=out)), base_url="http://127.0.0.1:8000")
    while not client.get("/healthz").json()["ready"]:
        time.sleep(0.05)
    load_s = time.perf_counter() - t0
    status = client.get("/api/status").json()
    mem = _mem()
    n = status["rows"]
    ids = [f"v{i:08d}" for i in np.random.default_rng(seed).integers(0, n, warmup + queries)]
    wall, took, hits = [], [], []
    for j, rid in enumerate(ids):
        t = time.perf_counter()
        r = client.get("/api/search", params={"id": rid, "k": k})
        dt = 1000 * (time.perf_counter() - t)
        r.raise_for_status()
        if j >= warmup:
            body = r.json()
            wall.append(dt)
            took.append(body["took_ms"])
            hits.append(len(body["results"]))
    index = status["index"] or {}
    return {"rows": n, "search": status["search"], "kind": index.get("kind"), "load_s": round(load_s, 2),
            "loaded_s": status["loaded_s"], "rss_before_mib": round(before), "rss_mib": round(mem["VmRSS"]),
            "peak_mib": round(mem["VmHWM"]), "wall_ms": _pct(wall), "took_ms": _pct(took),
            "min_hits": min(hits), "recall": index.get("recall", {}).get("recall_at_10")}


def measure_in_child(out: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "bench.serve", "--measure", str(out), "--queries", str(args.queries),
           "--warmup", str(args.warmup), "--k", str(args.k)]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def prepare(args: argparse.Namespace, work: Path) -> dict[str, tuple[Path, float | None, float | None]]:
    """The two outputs (made or reused), the index built on the large one: name -> (out, build s, write s),
    None where reused."""
    made = {}
    for name, n in (("index", args.rows), ("exact", args.exact_rows)):
        out = work / f"{name}-{n}"
        t0 = time.perf_counter()
        make_s = time.perf_counter() - t0 if make_output(out, n, args.dim, args.files) else None
        build_s = build_index(out) if name == "index" else None
        made[name] = (out, build_s, make_s)
    return made


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the output served with its index")
    ap.add_argument("--exact-rows", type=int, default=100_000, help="rows of the output without an index")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--workdir", default="/tmp/bench-serve")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # the child: one output, JSON out
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.queries, args.warmup, args.k, seed=1)))
        return 0

    import faiss

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"# {platform.node()} {os.cpu_count()} CPUs, faiss {faiss.__version__}; work dir {work}; "
          f"{args.queries} searches by id (k={args.k}) after {args.warmup} warm-up", flush=True)
    made = prepare(args, work)
    for name, (out, build_s, make_s) in made.items():
        print(f"# {name}: {out} " + ("reused" if make_s is None else f"written in {make_s:.1f} s")
              + ("" if name == "exact" else " ; index reused" if build_s is None else
                 f" ; index built in {build_s:.1f} s"), flush=True)
    print("| table | search | load s (catalog) | RSS MiB before / after load (peak) "
          "| wall ms p50 / p95 / p99 | took_ms p50 / p95 / p99 | min hits |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for name, (out, _, _) in made.items():
        r = results[name] = measure_in_child(out, args)
        search = f"{r['kind']} (recall@10 {r['recall']})" if r["kind"] else r["search"]
        print(f"| {r['rows']:,} x {args.dim} | {search} | {r['load_s']} ({r['loaded_s']}) | "
              f"{r['rss_before_mib']:,} / {r['rss_mib']:,} ({r['peak_mib']:,}) | "
              f"{' / '.join(map(str, r['wall_ms']))} | {' / '.join(map(str, r['took_ms']))} | "
              f"{r['min_hits']} |", flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
