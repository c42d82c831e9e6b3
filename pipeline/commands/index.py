"""`pipeline index build` and `pipeline index add`: a faiss index over an embeddings table, in object storage.

build: sample every file (a Ray task each) -> train the quantizers on the driver, on sampled rows apart from
two sets of held-out queries -> encode each file into an index part (a task each; the same task finds the
exact nearest neighbours of the queries among its rows) -> merge the parts in label order -> tune the search
setting on one query set to recall@10 >= 0.95 with a margin -> measure recall@10 on the other -> write.
add: the files the index does not hold yet (new, or replaced since: the replaced rows leave the index) are
encoded with the trained quantizers and merged; recall@10 is measured again with the same settings.
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.analytics import index as ix
from pipeline.analytics import store
from pipeline.commands.run import new_run_id
from pipeline.config import IndexAddConfig, IndexBuildConfig, RuntimeConfig
from pipeline.output.lease import Lease, LockPolicy, hold
from pipeline.output.reader import EmbeddingReader
from pipeline.output.spec import EmbeddingSpec, package_version
from pipeline.output.writer import write_run_record

TRAINED_FILE = "trained.faiss"  # the empty trained index: new files are encoded with it


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _faiss_version() -> str:
    return str(getattr(ix.faiss_module(), "__version__", "unknown"))


def _reader(uri: str) -> EmbeddingReader:
    reader = EmbeddingReader(uri)
    if reader.num_rows == 0:
        raise ValueError(f"the embeddings table '{reader.uri}' has no rows: run `pipeline extract` into it "
                         "first, or point --embeddings at a table with rows")
    if not reader.dim:
        raise ValueError(f"the embeddings at '{reader.uri}' record no dimension: re-extract them")
    return reader


def _firsts(rows: list[int], start: int) -> list[int]:
    return [int(x) for x in start + np.concatenate([[0], np.cumsum(rows)[:-1]])] if rows else []


def _proportional(total: int, rows: list[int]) -> list[int]:
    n = sum(rows)
    return [min(r, math.ceil(total * r / n)) if n else 0 for r in rows]


def _queries_table(labels: np.ndarray, x: np.ndarray) -> pa.Table:
    dim = x.shape[1]
    return pa.table({"label": pa.array(labels, pa.int64()),
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim)})


def _read_queries(index_uri: str, dim: int, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    name = store.objects(meta).get("queries")
    uri = storage.join(index_uri, name) if name else ""
    if not name or not storage.exists(uri):
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    t = pq.read_table(storage.open_input(uri))
    x = np.asarray(t.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False), np.float32)
    return t.column("label").to_numpy(), np.ascontiguousarray(x.reshape(-1, dim))


def _recall(index: Any, params: ix.IndexParams, reader: EmbeddingReader, firsts: dict[str, int],
            q_labels: np.ndarray, queries: np.ndarray, truth: ix.TopK | None, runtime: RuntimeConfig,
            tune: bool, tuning: ix.QuerySet | None = None) -> dict[str, Any]:
    """recall@10 on the held-out queries (tuned first on ``tuning``); the exact neighbours are computed per
    file unless given."""
    if params.kind == "flat":
        return {"recall_at_10": 1.0, "queries": 0, "exact": True}
    if len(queries) == 0:
        return {"recall_at_10": None, "queries": 0}
    if truth is None:
        from pipeline.ray.analytics import map_files

        parts = map_files(store.truth_file,
                          [((f.uri, reader.dim, params.metric, firsts[f.rel]), {}) for f in reader.files],
                          runtime, "exact search for recall", shared={"queries": queries})
        truth = ix.TopK.empty(len(queries), ix.RECALL_K + 1)
        for p in parts:
            truth = truth.merge(p)
    rep = ix.measure(index, params, queries, q_labels, truth, tune=tune, tuning=tuning)
    return {**rep.to_dict(), "target": ix.TARGET_RECALL, "floor": ix.RECALL_FLOOR}


def _counts(index: Any, params: ix.IndexParams, meta_files: dict[str, Any], next_label: int
            ) -> dict[str, int]:
    live = ix.live_count(index, params)
    return {"vectors": live, "files": len(meta_files), "labels": next_label,
            "unused_codes": next_label - live if params.kind == "ivfpq" and params.refine else 0}


def _encode_files(files: list[storage.FileInfo], firsts: list[int], rows: list[int], dim: int,
                  params: ix.IndexParams, runtime: RuntimeConfig, what: str, shared: dict[str, Any],
                  kwargs: list[dict[str, Any]] | None = None) -> list[store.FilePart]:
    """Encode each file into an index part with the trained quantizers (``shared["template"]``), a Ray task
    each; ``kwargs``: per file, the extra arguments of store.encode_file."""
    from pipeline.ray.analytics import map_files

    return map_files(store.encode_file,
                     [((f.uri, f.rel, dim, params.to_dict(), first, n), kwargs[i] if kwargs else {})
                      for i, (f, first, n) in enumerate(zip(files, firsts, rows))],
                     runtime, what, shared=shared)


def _merge_built(template: bytes, params: ix.IndexParams, parts: list[store.FilePart], n_queries: int
                 ) -> tuple[Any, ix.TopK, list[pa.Table]]:
    """The trained index with every part merged in label order, the queries' exact neighbours over all
    parts, and the parts' id tables; each part's bytes are dropped once merged."""
    index = ix.deserialize(template)
    truth = ix.TopK.empty(n_queries, ix.RECALL_K + 1)
    id_parts: list[pa.Table] = []
    for p in parts:
        ix.merge_part(index, params, p.part, p.labels)
        p.part = b""
        if p.truth is not None:
            truth = truth.merge(p.truth)
        id_parts.append(store.ids_table([p.labels], [p.ids], [p.rel]))
    return index, truth, id_parts


def _split_queries(q: int, labels: np.ndarray, x: np.ndarray, truth: ix.TopK
                   ) -> tuple[ix.QuerySet, ix.QuerySet]:
    """The build's 2q held-out queries as (the set that tunes the search setting, the set recall is reported
    on, kept in the index folder for later adds)."""
    return (ix.QuerySet(x[:q], labels[:q], ix.TopK(truth.d[:q], truth.labels[:q])),
            ix.QuerySet(np.ascontiguousarray(x[q:]), labels[q:], ix.TopK(truth.d[q:], truth.labels[q:])))


def _build_meta(cfg: IndexBuildConfig, params: ix.IndexParams, reader: EmbeddingReader, index: Any,
                firsts: list[int], next_label: int, recall: dict[str, Any], times: dict[str, float],
                started: str) -> dict[str, Any]:
    """index.json of a new index (generation 1)."""
    meta_files = {f.rel: {"version": f.version, "size": f.size, "rows": rows, "first_label": first}
                  for f, rows, first in zip(reader.files, reader.rows, firsts)}
    build_s = times["sample_s"] + times["train_s"] + times["encode_s"] + times["merge_s"]
    return {
        "format": 1, "kind": params.kind, "metric": params.metric, "factory": params.factory(),
        "params": params.to_dict(), "spec": reader.spec.to_dict(), "embeddings": reader.uri,
        "files": meta_files, "next_label": next_label, "generation": 1,
        "counts": _counts(index, params, meta_files, next_label),
        "recall": {**recall, "measured_at": _now(), "generation": 1},
        "recall_history": [{"generation": 1, "at": _now(), "recall_at_10": recall.get("recall_at_10"),
                            "vectors": ix.live_count(index, params), "kind": "build"}],
        "build": {"seconds": {k: round(v, 3) for k, v in times.items()},
                  "vectors_per_s": round(reader.num_rows / build_s, 1) if build_s > 0 else None,
                  "seed": cfg.seed, "recall_queries": cfg.recall_queries, "max_memory": cfg.max_memory},
        "created_at": started, "updated_at": _now(),
        "versions": {"faiss": _faiss_version(), "pipeline": package_version("pipeline")},
    }


def build(cfg: IndexBuildConfig, lock: LockPolicy | Lease | None = None) -> dict[str, Any]:
    """Build an index over the embeddings table; returns the run summary (index.json holds the rest). The
    build holds the index folder's lease (pipeline/output/lease.py)."""
    with hold(cfg.output, new_run_id(), "index build", lock):
        return _build(cfg)


def _build(cfg: IndexBuildConfig) -> dict[str, Any]:
    from pipeline.ray.analytics import map_files

    t0, started = time.perf_counter(), _now()
    reader = _reader(cfg.embeddings)
    n, dim = reader.num_rows, reader.dim
    params = ix.choose_params(n, dim, cfg.kind, cfg.metric, cfg.max_memory)
    storage.check_writable(cfg.output)
    files = reader.files
    firsts = _firsts(reader.rows, 0)
    times: dict[str, float] = {}

    # 1. a sample: training vectors, and apart from them two sets of held-out queries (tuning, reported)
    n_queries = 0 if params.kind == "flat" else min(cfg.recall_queries, n // 4)
    n_sample = min(n, (params.train_size if params.kind == "ivfpq" else 0) + 2 * n_queries)
    t = time.perf_counter()
    sample_labels, sample_x = np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    if n_sample:
        counts = _proportional(n_sample, reader.rows)
        samples = map_files(store.sample_file, [((f.uri, f.rel, dim, params.metric, first, c, cfg.seed), {})
                                                for f, first, c in zip(files, firsts, counts) if c],
                            cfg.runtime, "sampling")
        sample_labels = np.concatenate([s.labels for s in samples])
        sample_x = np.concatenate([s.x for s in samples])
    perm = np.random.default_rng(cfg.seed).permutation(len(sample_labels))
    pick, rest = perm[:2 * n_queries], np.sort(perm[2 * n_queries:])[:params.train_size]
    q_labels, queries = sample_labels[pick], np.ascontiguousarray(sample_x[pick])  # tuning, then reported
    times["sample_s"] = time.perf_counter() - t

    # 2. train on the driver (GPUs when faiss has them), the queries left out
    t = time.perf_counter()
    template = ix.train(params, sample_x[rest] if params.kind == "ivfpq" else sample_x[:0])
    del sample_x
    times["train_s"] = time.perf_counter() - t

    # 3. encode each file into a part (and its exact neighbours of the queries), a task each
    t = time.perf_counter()
    parts = _encode_files(files, firsts, reader.rows, dim, params, cfg.runtime, "encoding files",
                          {"template": template, "queries": queries if n_queries else None})
    wall = time.perf_counter() - t
    # the tasks also found the held-out queries' exact neighbours: that share of the wall time is recall's
    truth_share = sum(p.truth_s for p in parts) / max(sum(p.seconds for p in parts), 1e-9)
    times["encode_s"] = wall * (1 - truth_share)
    exact_s = wall * truth_share

    # 4. merge in label order
    t = time.perf_counter()
    index, truth, id_parts = _merge_built(template, params, parts, len(queries))
    del parts
    next_label = firsts[-1] + reader.rows[-1]
    times["merge_s"] = time.perf_counter() - t

    # 5. tune the search setting on the first query set, measure recall@10 on the second
    t = time.perf_counter()
    tuning, reported = _split_queries(n_queries, q_labels, queries, truth)
    q_labels, queries = reported.labels, reported.x
    recall = _recall(index, params, reader, {}, q_labels, queries, reported.truth if n_queries else None,
                     cfg.runtime, tune=True, tuning=tuning)
    times["recall_s"] = time.perf_counter() - t + exact_s

    t = time.perf_counter()
    meta = _build_meta(cfg, params, reader, index, firsts, next_label, recall, times, started)
    storage.write_bytes(storage.join(cfg.output, TRAINED_FILE), template)
    previous = None
    if storage.exists(storage.join(cfg.output, store.META_FILE)):  # a rebuild: the old generation goes after
        old = store.read_meta(cfg.output)
        previous = store.objects(old)
        meta["generation"] = int(old.get("generation", 0)) + 1
    store.write_index(cfg.output, index, pa.concat_tables(id_parts), meta,
                      _queries_table(q_labels, queries) if n_queries else None, previous)
    times["write_s"] = time.perf_counter() - t

    summary = {"kind": "index build", "index": cfg.output, "embeddings": reader.uri, "started_at": started,
               "index_kind": params.kind, "factory": params.factory(), "reason": params.reason,
               "vectors": meta["counts"]["vectors"], "files": len(files), "dim": dim, "metric": params.metric,
               "recall": recall, "timings": {k: round(v, 3) for k, v in times.items()},
               "total_s": round(time.perf_counter() - t0, 3), "config": json.loads(cfg.model_dump_json())}
    summary["run_record"] = write_run_record(cfg.output, new_run_id(), summary)
    return summary


def check_spec(meta: dict[str, Any], spec: EmbeddingSpec, index_uri: str, what: str) -> None:
    """ValueError naming each feature field where ``spec`` differs from the index's."""
    mine = EmbeddingSpec.parse(meta["spec"])
    diff = mine.feature_differences(spec, mine="index", theirs=what)
    if diff:
        raise ValueError(
            f"{what} do not match index '{index_uri}': {'; '.join(diff)}. Use {what} made with the index's "
            f"settings (--model {mine.model} --layer {mine.layer} --pool {mine.pool}, same weights), or "
            "build an index from them with `pipeline index build`")


def plan_add(meta: dict[str, Any], reader: EmbeddingReader) -> tuple[list[int], list[tuple[int, int]], dict]:
    """(indexes into reader.files to add, label ranges to remove, the files the index keeps): new files are
    added; a file whose version or size changed is replaced (old rows removed, new ones added); a file gone
    from the table loses its rows."""
    held = meta["files"]
    now = {f.rel: i for i, f in enumerate(reader.files)}
    todo, remove, keep = [], [], {}
    for rel, info in held.items():
        i = now.get(rel)
        f = reader.files[i] if i is not None else None
        if f is not None and f.version == info["version"] and f.size == info["size"]:
            keep[rel] = info
        else:
            remove.append((info["first_label"], info["first_label"] + info["rows"]))
    for rel, i in now.items():
        if rel not in keep:
            todo.append(i)
    return sorted(todo), remove, keep


def _kept_queries(cfg: IndexAddConfig, params: ix.IndexParams, meta: dict[str, Any],
                  remove: list[tuple[int, int]]) -> tuple[int, np.ndarray, np.ndarray]:
    """How many held-out queries to keep, and the stored ones whose rows stay in the index."""
    n_queries = 0 if params.kind == "flat" else (
        cfg.recall_queries if cfg.recall_queries is not None else meta["build"]["recall_queries"])
    q_labels, queries = _read_queries(cfg.index, params.dim, meta)
    if len(q_labels) and remove:
        gone = np.zeros(len(q_labels), bool)
        for a, b in remove:
            gone |= (q_labels >= a) & (q_labels < b)
        q_labels, queries = q_labels[~gone], queries[~gone]
    return n_queries, q_labels, queries


def _held_ids(index_uri: str, meta: dict[str, Any], keep: dict[str, Any], remove: list[tuple[int, int]]
              ) -> pa.Table:
    """The index's ids table without the rows of the files it no longer keeps."""
    ids = store.read_ids(index_uri, meta)
    if remove:
        dead = pa.array(sorted(set(meta["files"]) - set(keep)), pa.string())
        ids = ids.filter(pc.invert(pc.is_in(ids.column("file"), value_set=dead)))
    return ids


def _merge_added(index: Any, params: ix.IndexParams, parts: list[store.FilePart], ids: pa.Table
                 ) -> tuple[list[pa.Table], list[np.ndarray], list[np.ndarray]]:
    """Merge the new parts into ``index`` in label order (each part's bytes dropped once merged); returns the
    id tables (``ids`` first) and the new files' sampled query labels and vectors."""
    id_parts = [ids]
    new_q_labels, new_queries = [], []
    for p in parts:
        ix.merge_part(index, params, p.part, p.labels)
        p.part = b""
        id_parts.append(store.ids_table([p.labels], [p.ids], [p.rel]))
        if p.sample is not None and len(p.sample.labels):
            new_q_labels.append(p.sample.labels)
            new_queries.append(p.sample.x)
    return id_parts, new_q_labels, new_queries


def _mix_queries(seed: int, n_queries: int, q_labels: np.ndarray, queries: np.ndarray,
                 new_q_labels: list[np.ndarray], new_queries: list[np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The new files' sampled queries, topped up to ``n_queries`` with a random share of the kept ones."""
    rng = np.random.default_rng(seed)
    keep_old = max(0, n_queries - sum(len(x) for x in new_q_labels))
    old = np.sort(rng.permutation(len(q_labels))[:keep_old])
    return (np.concatenate([q_labels[old], *new_q_labels]),
            np.ascontiguousarray(np.concatenate([queries[old], *new_queries])))


def _files_after_add(keep: dict[str, Any], reader: EmbeddingReader, todo: list[int], firsts: list[int],
                     new_rows: list[int]) -> dict[str, Any]:
    """index.json's files: the kept ones, then the added ones with their first labels."""
    files_meta = dict(keep)
    for i, first, rows in zip(todo, firsts, new_rows):
        f = reader.files[i]
        files_meta[f.rel] = {"version": f.version, "size": f.size, "rows": rows, "first_label": first}
    return files_meta


def _update_meta(meta: dict[str, Any], files_meta: dict[str, Any], next_label: int, index: Any,
                 params: ix.IndexParams, reader: EmbeddingReader, recall: dict[str, Any]) -> None:
    """index.json after an add: the next generation, its files, counts and recall."""
    generation = int(meta["generation"]) + 1
    r = recall.get("recall_at_10")
    meta.update({
        "files": files_meta, "next_label": next_label, "generation": generation,
        "counts": _counts(index, params, files_meta, next_label), "embeddings": reader.uri,
        "recall": {**recall, "measured_at": _now(), "generation": generation},
        "recall_history": [*meta.get("recall_history", []),
                           {"generation": generation, "at": _now(), "recall_at_10": r,
                            "vectors": ix.live_count(index, params), "kind": "add"}],
        "updated_at": _now(),
    })
    meta.setdefault("versions", {})["faiss"] = _faiss_version()


def add(cfg: IndexAddConfig, lock: LockPolicy | Lease | None = None) -> dict[str, Any]:
    """Add the embedding files the index does not hold yet (no retraining); returns the run summary. Holds
    the index folder's lease."""
    with hold(cfg.index, new_run_id(), "index add", lock):
        return _add(cfg)


def _add(cfg: IndexAddConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    started = _now()
    meta = store.read_meta(cfg.index)
    previous = store.objects(meta)  # this generation's files: deleted once the next one is committed
    params = ix.IndexParams.from_dict(meta["params"])
    reader = _reader(cfg.embeddings or meta["embeddings"])
    check_spec(meta, reader.spec, cfg.index, "embeddings")
    todo, remove, keep = plan_add(meta, reader)
    if remove and params.kind == "hnsw":
        ix.remove_labels(None, params, remove)  # raises: hnsw cannot drop rows
    summary: dict[str, Any] = {"kind": "index add", "index": cfg.index, "embeddings": reader.uri,
                               "started_at": started, "added_files": len(todo), "added": 0,
                               "removed_files": len(remove), "removed": 0}
    if not todo and not remove:
        summary.update({"vectors": meta["counts"]["vectors"], "recall": meta.get("recall"),
                        "note": "nothing to add: the index holds every file of the table",
                        "total_s": round(time.perf_counter() - t0, 3)})
        summary["run_record"] = write_run_record(cfg.index, new_run_id(), summary)
        return summary
    storage.check_writable(cfg.index)
    times: dict[str, float] = {}
    next_label = int(meta["next_label"])
    new_rows = [reader.rows[i] for i in todo]
    firsts = _firsts(new_rows, next_label)

    # queries: keep the stored ones still in the index, replace a share by rows of the new files
    n_queries, q_labels, queries = _kept_queries(cfg, params, meta, remove)
    total = sum(reader.rows)
    n_new_q = min(n_queries, math.ceil(n_queries * sum(new_rows) / total)) if total else 0
    per_file = _proportional(n_new_q, new_rows)

    t = time.perf_counter()
    template = storage.read_bytes(storage.join(cfg.index, TRAINED_FILE))
    seed = int(meta["build"].get("seed", 0)) + int(meta["generation"])
    parts = _encode_files([reader.files[i] for i in todo], firsts, new_rows, params.dim, params, cfg.runtime,
                          "encoding new files", {"template": template},
                          [{"sample_count": c, "seed": seed} for c in per_file])
    times["encode_s"] = time.perf_counter() - t

    t = time.perf_counter()
    index = store.load_for_update(cfg.index, meta)
    removed = ix.remove_labels(index, params, remove)
    id_parts, new_q_labels, new_queries = _merge_added(index, params, parts,
                                                       _held_ids(cfg.index, meta, keep, remove))
    added = sum(len(p.labels) for p in parts)
    next_label = firsts[-1] + new_rows[-1] if todo else next_label
    times["merge_s"] = time.perf_counter() - t
    if new_q_labels:
        q_labels, queries = _mix_queries(seed, n_queries, q_labels, queries, new_q_labels, new_queries)

    t = time.perf_counter()
    files_meta = _files_after_add(keep, reader, todo, firsts, new_rows)
    all_firsts = {rel: info["first_label"] for rel, info in files_meta.items()}
    recall = _recall(index, params, reader, all_firsts, q_labels, queries, None, cfg.runtime, tune=False)
    times["recall_s"] = time.perf_counter() - t

    r = recall.get("recall_at_10")
    _update_meta(meta, files_meta, next_label, index, params, reader, recall)
    t = time.perf_counter()
    flat = params.kind == "flat"  # exact: its build's queries stay
    store.write_index(cfg.index, index, pa.concat_tables(id_parts), meta,
                      None if flat else _queries_table(q_labels, queries), previous,
                      carry=("queries",) if flat else ())
    times["write_s"] = time.perf_counter() - t

    summary.update({"added": added, "removed": removed, "vectors": meta["counts"]["vectors"],
                    "recall": recall,
                    "timings": {k: round(v, 3) for k, v in times.items()},
                    "total_s": round(time.perf_counter() - t0, 3)})
    if r is not None and r < ix.RECALL_FLOOR:
        summary["warning"] = (
            f"recall@10 is {r:.3f}, below {ix.RECALL_FLOOR}: the new vectors fit the trained quantizers "
            f"poorly. Rebuild: pipeline index build --embeddings {reader.uri} --output {cfg.index}")
    summary["run_record"] = write_run_record(cfg.index, new_run_id(), summary)
    return summary
