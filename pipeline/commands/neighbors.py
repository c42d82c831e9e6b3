"""`pipeline neighbors`: the k nearest rows of an index for each query, as a Ray Data map over an actor pool
that holds the index (memory-mapped where faiss allows).

Queries are images (embedded by the same backbone, weights, layer, pooling and preprocessing as the index's
embeddings, checked on the driver), ids of rows in the index's table, or an embeddings table of the same spec.
Output: ``OUTPUT/neighbors/*.parquet`` (query_id, rank, id, score), failed queries in ``OUTPUT/errors/``.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline import storage
from pipeline.analytics import store
from pipeline.analytics.search import NEIGHBORS_DIR, ImageSearcher, Searcher, search_locally
from pipeline.commands.index import check_spec
from pipeline.commands.run import new_run_id
from pipeline.config import BackboneConfig, NeighborsConfig, RuntimeConfig
from pipeline.output.layout import ERRORS_DIR
from pipeline.output.reader import EmbeddingReader
from pipeline.output.spec import EmbeddingSpec
from pipeline.output.writer import write_run_record

# queries per search call: larger batches amortize faiss's per-call work (1M x 256 IVF-PQ on 2 cores, in
# memory: 10,700 queries/s in batches of 1,024, 12,300 in batches of 8,192)
SEARCH_BATCH = 8192


LOCAL_QUERY_ROWS = 200_000  # query tables up to this many rows are searched in the driver, without Ray


def where_to_search(runtime: RuntimeConfig, rows: int, index_bytes: int) -> str:
    """"driver" for a small query table, an index that fits in memory and no Ray cluster or actor settings
    given: starting Ray and an actor that loads the index costs more than the search (3-5 s here, where
    faiss answers 50,000 queries of a 1M-vector index in 4-5 s); "ray" otherwise."""
    on_cluster = bool(runtime.address or os.environ.get("RAY_ADDRESS"))
    explicit = runtime.actors is not None or runtime.cpus_per_actor is not None
    fits = store.fits_in_memory(index_bytes)
    return "driver" if rows <= LOCAL_QUERY_ROWS and fits and not (on_cluster or explicit) else "ray"


def backbone_for(spec: EmbeddingSpec) -> BackboneConfig:
    """The backbone settings that made the index's embeddings (weights 'packaged:<pkg>' -> packaged)."""
    weights = spec.weights.source or "packaged"
    if weights.startswith("packaged:"):
        weights = "packaged"
    if spec.model is None or weights == "synthetic":
        raise ValueError("this index was not built from `pipeline extract` embeddings (no model in its "
                         "spec): query it with --ids or --embeddings")
    return BackboneConfig(model=spec.model, weights=weights, layer=spec.layer or "final",
                          pool=spec.pool if spec.pool not in (None, "none") else "avg",
                          normalize=spec.normalize)


def read_ids(uri: str) -> list[str]:
    """The id column of a Parquet file or folder; ValueError naming the fix."""
    try:
        files = [f for f in storage.list_files(uri) if f.rel.endswith(".parquet")]
    except storage.StorageError as e:
        raise ValueError(f"cannot read --ids '{uri}' ({e}): pass a Parquet file or folder with an id "
                         "column") from None
    if not files:
        raise ValueError(f"--ids '{uri}' holds no .parquet files: pass a Parquet file or folder with an id "
                         "column")
    fs, _ = storage.get_fs(files[0].uri)
    ds = pads.dataset([storage.get_fs(f.uri)[1] for f in files], filesystem=fs, format="parquet")
    if "id" not in ds.schema.names:
        raise ValueError(f"--ids '{uri}' has no id column (has {ds.schema.names}): name the column id")
    ids = pc.unique(ds.to_table(columns=["id"]).column("id").cast("string")).drop_null().to_pylist()
    if not ids:
        raise ValueError(f"--ids '{uri}' lists no ids: give it at least one")
    return ids


def neighbors(cfg: NeighborsConfig) -> dict[str, Any]:
    """Run the search; returns the run summary (also written to OUTPUT/_runs/)."""
    from pipeline.ray import analytics as ray_analytics

    t0 = time.perf_counter()
    started = datetime.now(timezone.utc).isoformat()
    meta = store.read_meta(cfg.index)
    spec = EmbeddingSpec.parse(meta["spec"])
    storage.check_writable(cfg.output)
    out = {"neighbors": storage.join(cfg.output, NEIGHBORS_DIR),
           "errors": storage.join(cfg.output, ERRORS_DIR)}
    for uri in out.values():  # a rerun replaces the results
        if storage.exists(uri):
            storage.remove_tree(uri)
    runtime = cfg.runtime
    asked: int | None = None
    if cfg.images is not None:
        from pipeline.backbone import build_backbone
        from pipeline.commands.run import estimated_images, plan_for
        from pipeline.embed import EmbedderSpec
        from pipeline.plan import precision_of
        from pipeline.sources import check_source, list_shards

        shards, skipped = list_shards(cfg.images)
        check_source(cfg.images, shards)
        if not shards:
            raise ValueError(f"no images under '{cfg.images.uri}': point --images at a folder of images")
        backbone_cfg = backbone_for(spec)
        backbone = build_backbone(backbone_cfg, "cpu")
        runtime = plan_for(runtime, backbone, estimated_images(shards)).runtime
        check_spec(meta, backbone.spec(precision=precision_of(runtime.autocast)), cfg.index,
                   "the images' embeddings")
        del backbone
        query = {"images": cfg.images.uri, "shards": len(shards), "skipped": skipped}
        counts = ray_analytics.search_images(
            shards, cfg.images, ImageSearcher,
            {"spec": EmbedderSpec(backbone_cfg, runtime, max_bytes=cfg.images.max_bytes),
             "index_uri": cfg.index, "k": cfg.k}, cfg.output, runtime)
    else:
        if cfg.ids is not None:
            ids = read_ids(cfg.ids)
            asked = len(ids)
            reader = EmbeddingReader(meta["embeddings"])
            kwargs: dict[str, Any] = {"keep_ids": ids, "exclude_self": True}
            query = {"ids": cfg.ids, "table": reader.uri}
        else:
            reader = EmbeddingReader(cfg.embeddings)
            same = reader.uri.rstrip("/") == str(meta["embeddings"]).rstrip("/")
            kwargs = {"exclude_self": same}
            query = {"embeddings": reader.uri}
        check_spec(meta, reader.spec, cfg.index, "the query embeddings")
        stage = {"index_uri": cfg.index, "k": cfg.k, **kwargs}
        batch = max(runtime.batch_size or 0, SEARCH_BATCH)
        where = where_to_search(runtime, reader.num_rows, store.index_size(cfg.index, meta))
        query["searched"] = where
        if where == "driver":
            counts = search_locally([f.uri for f in reader.files], stage, cfg.output, batch,
                                    threads=os.cpu_count() or 1, progress=runtime.progress)
        else:
            counts = ray_analytics.search_tables(reader.files, Searcher, stage, cfg.output, runtime, batch)
    summary = {"kind": "neighbors", "index": cfg.index, "output": cfg.output, "started_at": started,
               "query": query, "k": cfg.k, "queries": counts["queries"], "rows": counts["rows"],
               "failed": counts["failed"], "error_kinds": counts["error_kinds"],
               "neighbors": out["neighbors"],
               "index_kind": meta["kind"], "metric": meta["metric"],
               "total_s": round(time.perf_counter() - t0, 3), "config": json.loads(cfg.model_dump_json())}
    if asked is not None:
        summary["ids_not_found"] = asked - counts["queries"]
        if counts["queries"] == 0:
            raise ValueError(f"none of the {asked} ids in '{cfg.ids}' is in the index's table "
                             f"'{meta['embeddings']}': pass ids of its rows")
    summary["run_record"] = write_run_record(cfg.output, new_run_id(), summary)
    return summary


def format_neighbors(s: dict[str, Any]) -> str:
    score = "cosine similarity" if s["metric"] == "cosine" else "L2 distance"
    lines = [f"{s['queries']} queries x {s['k']} neighbours ({s['rows']} rows, score = {score}) -> "
             f"{s['neighbors']} in {s['total_s']:.1f}s"]
    if s.get("ids_not_found"):
        lines.append(f"  not found:  {s['ids_not_found']} of the ids are not in the index's table")
    if s["failed"]:
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(s["error_kinds"].items()))
        lines.append(f"  errors:     {storage.join(s['output'], ERRORS_DIR)} ({kinds})")
    lines.append(f"  run record: {s['run_record']}")
    return "\n".join(lines)
