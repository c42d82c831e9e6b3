"""Analytics benchmark: `pipeline index build` and `pipeline neighbors` against faiss called directly with
the same parameters, and recall@10, on clustered synthetic vectors.

    python -m bench.analytics [--sizes 100000,200000,1000000] [--dim 256] [--files 8] [--queries 10000]

For each size and each index kind (auto's choice, and ivfpq):
  build     the command over Parquet files in a local folder (sampling, training, a Ray task per file to
            encode, merge; the recall measurement, including the exact neighbours the encode tasks find,
            and the write are reported apart), vs faiss: the files read into one matrix, the same factory
            string trained on a sample of the same size and `add` of the whole matrix (the ratio without
            the read in the results file)
  query     `neighbors --embeddings` of a queries table (-k 10) as a user runs it (query tables up to
            200,000 rows are searched in the command's process), and on the Ray path (`runtime.actors=1`:
            Ray Data read -> searcher actor -> Parquet), vs faiss: `index.search` of the same in-memory
            queries with the tuned settings; run at Q and 5Q queries: the ratio over 5Q, and in
            parentheses the steady state (the 4Q queries between the two runs, start-up and index load
            left out) against faiss's rate
  recall    recall@10 as index.json reports it (held-out rows, tuned) and recomputed on fresh rows against
            faiss's exact knn on the whole matrix (independent of the pipeline's code)
  add       ivfpq: `index add` of a second file of n/4 new rows (no retraining), recall again

    python -m bench.analytics --held-out [--sizes 200000] [--dim 112] [--fresh 2000] [--spreads 0.35,1.0]

  held-out  ivfpq, cosine: the recall@10 index.json reports (tuned on one set of held-out rows, measured on
            another) against recall@10 on fresh vectors of the same distribution that are not in the index at
            all, with faiss's exact knn over the whole matrix as the truth; at the tuned nprobe and at each
            nprobe tuning tried
Ratios are faiss's seconds over the pipeline's (1.0 = as fast as faiss directly). Ray is started once; the
pipeline's query seconds include the actors loading the index (memory-mapped) and writing the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def _exact(xn: np.ndarray, q: np.ndarray) -> np.ndarray:
    import faiss

    _, i = faiss.knn(xn[q], xn, 11)
    out = np.zeros((len(q), 10), np.int64)
    for r, row in enumerate(i):
        out[r] = row[row != q[r]][:10]
    return out


def run(n: int, dim: int, files: int, n_queries: int, kind: str, work: Path) -> dict:
    import faiss

    from pipeline.analytics import index as ix
    from pipeline.analytics import store
    from pipeline.analytics.vectors import clustered_vectors, write_embeddings
    from pipeline.commands.index import add, build
    from pipeline.commands.neighbors import neighbors
    from pipeline.config import IndexAddConfig, IndexBuildConfig, NeighborsConfig

    x = clustered_vectors(n, dim, seed=0)
    emb = work / f"emb-{n}"
    if not emb.exists():
        bounds = np.linspace(0, n, files + 1).astype(int)
        for f, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            write_embeddings(str(emb / "embeddings" / f"part-{f:03d}.parquet"), x[a:b],
                             [f"v{i:08d}" for i in range(a, b)])
    qx = clustered_vectors(5 * n_queries, dim, seed=0)
    qdirs = {}
    for m in (1, 5):  # two sizes: their difference is the steady state, start-up left out
        qdirs[m] = work / f"queries-{m * n_queries}"
        if not qdirs[m].exists():
            write_embeddings(str(qdirs[m] / "embeddings" / "q.parquet"), qx[:m * n_queries],
                             [f"q{i:07d}" for i in range(m * n_queries)])
    idx = work / f"idx-{n}-{kind}"
    rt = {"progress": False}
    s = build(IndexBuildConfig(embeddings=str(emb), output=str(idx), kind=kind, runtime=rt))
    t = s["timings"]
    build_s = t["sample_s"] + t["train_s"] + t["encode_s"] + t["merge_s"]
    meta = store.read_meta(str(idx))
    params = ix.IndexParams.from_dict(meta["params"])

    # faiss directly, same factory and search settings: the table read into one matrix (as a script calling
    # faiss would), then train and add
    from pipeline.analytics.vectors import read_vectors

    t0 = time.perf_counter()
    paths = sorted((emb / "embeddings").glob("*.parquet"))
    read = np.concatenate([read_vectors(str(f), dim).x for f in paths])
    direct_read_s = time.perf_counter() - t0
    del read
    xn = ix.prepare(x, params.metric)
    t0 = time.perf_counter()
    direct = faiss.index_factory(dim, params.factory(), faiss.METRIC_L2)
    if params.kind == "ivfpq":
        direct.train(xn[np.random.default_rng(0).choice(n, params.train_size, replace=False)])
    direct.add(xn) if params.kind != "flat" else direct.add_with_ids(xn, np.arange(n, dtype=np.int64))
    direct_build_s = time.perf_counter() - t0
    ix.configure(direct, params)
    qn = ix.prepare(qx, params.metric)
    t0 = time.perf_counter()
    direct.search(qn, 10)
    direct_query_s = time.perf_counter() - t0  # all 5Q queries
    del direct

    paths: dict[str, dict[int, float]] = {}
    for path, prt in (("default", rt), ("ray", {**rt, "actors": "1"})):
        query_s = paths[path] = {}
        for m, qdir in qdirs.items():
            out = work / f"nn-{n}-{kind}-{m}"
            t0 = time.perf_counter()
            q = neighbors(NeighborsConfig(index=str(idx), output=str(out), embeddings=str(qdir), k=10,
                                          runtime=prt))
            query_s[m] = time.perf_counter() - t0
            assert q["queries"] == m * n_queries
            if path == "ray":
                assert q["query"]["searched"] == "ray"
        paths[path]["where"] = q["query"]["searched"]

    def ratios(query_s: dict) -> dict:
        steady_s = query_s[5] - query_s[1]  # 4Q queries past start-up
        # when start-up varies more than the 4Q queries take, the difference measures nothing: n/a
        steady = round((4 * n_queries / steady_s) / (5 * n_queries / direct_query_s), 2) \
            if steady_s > 0.2 * query_s[5] else "n/a"
        return {"where": query_s["where"], "query_s": round(query_s[5], 2),
                "query_ratio": round(direct_query_s / query_s[5], 2), "query_small_s": round(query_s[1], 2),
                "query_steady_ratio": steady}

    recomputed = _recomputed(str(idx), xn)
    after_add = {}
    if params.kind == "ivfpq":  # a second file of n/4 new rows, added without retraining
        x2 = clustered_vectors(n // 4, dim, seed=0)
        write_embeddings(str(emb / "embeddings" / "zz-added.parquet"), x2,
                         [f"v{i:08d}" for i in range(n, n + len(x2))])
        a = add(IndexAddConfig(index=str(idx), runtime=rt))
        both = ix.prepare(np.concatenate([x, x2]), params.metric)
        after_add = {"added": a["added"], "add_s": a["total_s"],
                     "recall_index_json": a["recall"]["recall_at_10"],
                     "recall_recomputed": _recomputed(str(idx), both)}
        (emb / "embeddings" / "zz-added.parquet").unlink()
    return {
        "n": n, "dim": dim, "kind": params.kind, "factory": params.factory(),
        "search": {k: getattr(params, k) for k in ("nprobe", "k_factor", "ef_search") if getattr(params, k)},
        "build_s": round(build_s, 2), "faiss_build_s": round(direct_build_s, 2),
        "faiss_read_s": round(direct_read_s, 2),
        "build_ratio": round((direct_read_s + direct_build_s) / build_s, 2),
        "build_ratio_no_read": round(direct_build_s / build_s, 2), "build_timings": t,
        "faiss_query_s": round(direct_query_s, 2), "queries": 5 * n_queries,
        **ratios(paths["default"]), "ray": ratios(paths["ray"]),
        "recall_index_json": meta["recall"].get("recall_at_10"), "recall_recomputed": recomputed,
        "after_add": after_add,
    }


def held_out(n: int, dim: int, files: int, n_fresh: int, work: Path, spread: float = 0.35) -> dict:
    """index.json's recall@10 against the recall of vectors from outside the index (exact search as truth)."""
    import faiss

    from pipeline.analytics import index as ix
    from pipeline.analytics import store
    from pipeline.analytics.vectors import clustered_vectors, write_embeddings
    from pipeline.commands.index import build
    from pipeline.config import IndexBuildConfig

    x = clustered_vectors(n, dim, spread=spread, seed=0)  # low rank: 32 latent dimensions, a little noise
    emb = work / f"emb-{n}-{dim}-{spread}"
    bounds = np.linspace(0, n, files + 1).astype(int)
    for f, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        write_embeddings(str(emb / "embeddings" / f"part-{f:03d}.parquet"), x[a:b],
                         [f"v{i:08d}" for i in range(a, b)])
    idx = str(work / f"idx-{n}-{dim}-{spread}-held-out")
    s = build(IndexBuildConfig(embeddings=str(emb), output=idx, kind="ivfpq", runtime={"progress": False}))
    meta = store.read_meta(idx)
    params = ix.IndexParams.from_dict(meta["params"])
    index = store.load_index(idx, meta)
    row = np.array([int(v[1:]) if v else -1 for v in store.id_lookup(store.read_ids(idx), n).to_pylist()])
    qn = ix.prepare(clustered_vectors(n_fresh, dim, spread=spread, seed=0), "cosine")  # other draws, same law
    _, exact = faiss.knn(qn, ix.prepare(x, "cosine"), ix.RECALL_K)

    def fresh_recall(nprobe: int) -> float:
        p = ix.IndexParams.from_dict({**params.to_dict(), "nprobe": nprobe})
        ix.configure(index, p)
        _, labels = ix.search(index, p, qn, ix.RECALL_K)
        return round(ix.recall_at_k(np.where(labels >= 0, row[np.maximum(labels, 0)], -1), exact), 4)

    rec = meta["recall"]
    return {"n": n, "dim": dim, "spread": spread, "factory": params.factory(), "nprobe": params.nprobe,
            "build_s": s["total_s"], "recall_index_json": rec["recall_at_10"],
            "standard_error": rec.get("standard_error"), "recall_fresh": fresh_recall(params.nprobe),
            "tried": [{**t, "recall_fresh": fresh_recall(t["nprobe"])} for t in rec.get("tried", [])]}


def _recomputed(idx: str, xn: np.ndarray, n_queries: int = 500) -> float:
    """recall@10 of the stored index on fresh rows (their own row left out) against faiss's exact knn on the
    whole matrix, ids mapped back through ids.parquet."""
    from pipeline.analytics import index as ix
    from pipeline.analytics import store

    meta = store.read_meta(idx)
    params = ix.IndexParams.from_dict(meta["params"])
    index = store.load_index(idx, meta)
    names = store.id_lookup(store.read_ids(idx), meta["next_label"]).to_pylist()
    rows = np.random.default_rng(7).choice(len(xn), n_queries, replace=False)
    _, labels = ix.search(index, params, xn[rows], 11)
    exact = _exact(xn, rows)
    hits = 0
    for r, row in enumerate(labels):
        found = [int(names[lab][1:]) for lab in row if lab >= 0 and int(names[lab][1:]) != rows[r]][:10]
        hits += len(set(found) & set(exact[r].tolist()))
    return round(hits / (10 * n_queries), 4)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,200000,1000000")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--queries", type=int, default=10000, help="Q: queries are run at Q and 5Q")
    ap.add_argument("--kinds", default="auto,ivfpq")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--held-out", action="store_true", help="only the held-out recall check (ivfpq)")
    ap.add_argument("--fresh", type=int, default=2000, help="--held-out: vectors searched from outside")
    ap.add_argument("--spreads", default="0.35,1.0", help="--held-out: clusters' spread (1.0: they overlap)")
    args = ap.parse_args(argv)

    import faiss
    import ray

    from pipeline.analytics import index as ix

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-analytics-"))
    print(f"# {platform.node()} {os.cpu_count()} CPUs, faiss {faiss.__version__} "
          f"({faiss.omp_get_max_threads()} threads), ray {ray.__version__}; work dir {work}")
    if args.held_out:
        return _held_out_table(args, work)
    print("| vectors | kind (factory) | search | build s (faiss: read + build) | build ratio | query s for "
          f"{5 * args.queries} (faiss) | query ratio (steady state) | on Ray: query s, ratio (steady state) "
          "| recall@10 index.json / recomputed |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for n in [int(v) for v in args.sizes.split(",")]:
        seen = set()
        for kind in args.kinds.split(","):
            chosen = ix.choose_params(n, args.dim, kind).kind
            if chosen in seen:
                continue
            seen.add(chosen)
            r = run(n, args.dim, args.files, args.queries, kind, work)
            results.append(r)
            search = ", ".join(f"{k} {v}" for k, v in r["search"].items()) or "exact"
            print(f"| {n:,} | {r['kind']} (`{r['factory']}`) | {search} | {r['build_s']} "
                  f"({r['faiss_read_s']} + {r['faiss_build_s']}) | {r['build_ratio']} | {r['query_s']} "
                  f"({r['faiss_query_s']}) | "
                  f"{r['query_ratio']} ({r['query_steady_ratio']}) | {r['ray']['query_s']}, "
                  f"{r['ray']['query_ratio']} ({r['ray']['query_steady_ratio']}) | "
                  f"{r['recall_index_json']} / {r['recall_recomputed']} |", flush=True)
            if r["after_add"]:
                a = r["after_add"]
                print(f"|   + index add of {a['added']:,} | | | {a['add_s']} s | | | | | "
                      f"{a['recall_index_json']} / {a['recall_recomputed']} |", flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    return 0


def _held_out_table(args: argparse.Namespace, work: Path) -> int:
    print("| vectors x dim, spread | factory | nprobe | recall@10 index.json (± s.e.) | fresh vectors (exact "
          "truth) | difference | per nprobe tried: tuning set / fresh |")
    print("|---|---|---|---|---|---|---|")
    results = []
    runs = [(int(v), float(s)) for v in args.sizes.split(",") for s in args.spreads.split(",")]
    for n, spread in runs:
        r = held_out(n, args.dim, args.files, args.fresh, work, spread)
        results.append(r)
        curve = ", ".join(f"{t['nprobe']}: {t['recall_at_10']} / {t['recall_fresh']}" for t in r["tried"])
        print(f"| {n:,} x {r['dim']}, {spread} | `{r['factory']}` | {r['nprobe']} | {r['recall_index_json']} "
              f"(± {r['standard_error']}) | {r['recall_fresh']} | "
              f"{r['recall_index_json'] - r['recall_fresh']:+.4f} | {curve} |", flush=True)
    (work / "held_out.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
